"""The VAE's loss terms, per image: reconstruction (Bernoulli or Gaussian likelihood), the KL divergence and the
perceptual (feature-matching) term through a frozen encoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kl_per_image(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, one value per image (closed form)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def recon_per_image(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Reconstruction loss summed over pixels, one value per image: ``bce`` on the logits or ``mse``."""
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    return per_pixel.flatten(1).sum(dim=1)


class FeatureMatch(nn.Module):
    """Perceptual (feature-matching) loss through a frozen image network, as in deep-feature-consistent VAEs
    (Hou et al. 2017): a reconstruction should excite the network's intermediate layers as its original does.

    ``net`` is the store's frozen encoder; ``layers`` the modules whose outputs are compared (for timm and
    open_clip models: every stage of ``net.blocks`` when there is one), plus the final embedding by cosine.
    Images in [0, 1] are resized to ``size`` and normalised with the encoder's ``mean``/``std``.  Each layer's
    squared error is divided by its target's mean square, so that every depth counts alike whatever its scale.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], size: int,
                 layers: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.size = size
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        if layers is None:
            blocks = getattr(net, "blocks", None)
            layers = list(blocks) if isinstance(blocks, nn.Sequential) else []
        self._outputs: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._keep) for m in layers]

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        del module, inputs
        self._outputs.append(output)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The hooked layers' outputs then the embedding, for images ``(N, 3, S, S)`` in [0, 1]."""
        x = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        self._outputs = []
        emb = self.net((x - self.mean) / self.std)
        out, self._outputs = [*self._outputs, emb.flatten(1)], []
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One loss value per image: the sum over layers of the relative squared error, plus 1 - cosine of the
        embeddings."""
        with torch.no_grad():
            want = self.features(target)
        got = self.features(recon)
        loss = 1.0 - F.cosine_similarity(got[-1], want[-1], dim=1)
        for g, w in zip(got[:-1], want[:-1], strict=True):
            scale = w.pow(2).mean().clamp_min(1e-8)
            loss = loss + (g - w).pow(2).flatten(1).mean(dim=1) / scale
        return loss
