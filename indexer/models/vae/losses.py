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
    Images in [0, 1] are resized to ``size`` (bicubic, as the encoder's own preprocessing enlarges a small
    reconstruction: then the encoder sees textures at the scale it sees them when the store embeds a
    reconstruction), cut to a random ``crop`` x ``crop`` window, the same for a reconstruction and its original
    (0: the whole image; a crop keeps the scale and pays for a quarter of the pixels), and normalised with the
    encoder's ``mean``/``std``.  Each layer's squared error is divided by its target's mean square, so that every
    depth counts alike whatever its scale.  The frozen network runs channels-last, which is 2-3x faster on CPUs.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], size: int,
                 layers: Sequence[nn.Module] | None = None, crop: int = 0) -> None:
        super().__init__()
        self.net = net.eval().to(memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.size = size
        self.crop = crop if 0 < crop < size else 0
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

    def _window(self, images: torch.Tensor, at: tuple[int, int] | None) -> torch.Tensor:
        """Enlarge to ``size`` and cut the crop at ``at`` (in source pixels; default: the centre)."""
        side = images.shape[-1]
        if not self.crop:
            if side == self.size:
                return images
            return F.interpolate(images, size=self.size, mode="bicubic", align_corners=False)
        src = self.window_side(side)
        if not src:  # no whole-pixel window: enlarge everything, then cut
            big = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False)
            top, left = (self.size - self.crop) // 2, (self.size - self.crop) // 2
            return big[..., top : top + self.crop, left : left + self.crop]
        scale = self.size // side
        top, left = at if at is not None else ((side - src) // 2, (side - src) // 2)
        # Cut first, with a margin of 2 source pixels (what bicubic reads on each side, so the window comes out as
        # it would from the whole enlarged image), enlarge only the window: 1/16 of the work for 128 of 256.
        t0, l0 = max(0, top - 2), max(0, left - 2)
        t1, l1 = min(side, top + src + 2), min(side, left + src + 2)
        big = F.interpolate(images[..., t0:t1, l0:l1], scale_factor=scale, mode="bicubic", align_corners=False)
        dt, dl = (top - t0) * scale, (left - l0) * scale
        return big[..., dt : dt + self.crop, dl : dl + self.crop]

    def window_side(self, side: int) -> int:
        """Side of the source window that one crop covers in an image of side ``side`` (the whole image: 0)."""
        if not self.crop or self.size % side or self.crop % (self.size // side):
            return 0
        return self.crop // (self.size // side)

    def features(self, images: torch.Tensor, at: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The hooked layers' outputs then the embedding, for images ``(N, 3, S, S)`` in [0, 1]; ``at`` is the
        top-left corner of the crop in source pixels (default: the centre)."""
        x = ((self._window(images, at) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        self._outputs = []
        emb = self.net(x)
        out, self._outputs = [*self._outputs, emb.flatten(1)], []
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """One loss value per image: the sum over layers of the relative squared error, plus 1 - cosine of the
        embeddings; the crop's place is drawn from ``generator``."""
        at = None
        src = self.window_side(target.shape[-1])
        if src:
            top, left = torch.randint(0, target.shape[-1] - src + 1, (2,), generator=generator).tolist()
            at = (top, left)
        with torch.no_grad():
            want = self.features(target, at)
        got = self.features(recon, at)
        loss = 1.0 - F.cosine_similarity(got[-1], want[-1], dim=1)
        for g, w in zip(got[:-1], want[:-1], strict=True):
            scale = w.pow(2).mean().clamp_min(1e-8)
            loss = loss + (g - w).pow(2).flatten(1).mean(dim=1) / scale
        return loss
