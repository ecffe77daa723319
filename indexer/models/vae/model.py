"""The convolutional VAE network, its trained result, its files, and inference: images <-> latents, latent walks,
tensors -> PIL images."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from indexer.models.checkpoint import CheckpointFormat, read_checkpoint, save_checkpoint
from indexer.models.interpolate import lerp, slerp
from indexer.models.scoped import eval_mode
from indexer.models.vae.config import BOTTOM, VAEConfig, VAEError

FORMAT = "mammals-space-vae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "vae.safetensors"
META_FILE = "vae.json"
EVAL_BATCH = 256  # images per forward pass outside training

CHECKPOINT = CheckpointFormat(FORMAT, FORMAT_VERSION, WEIGHTS_FILE, META_FILE, VAEError, "VAE")


def _activation(name: str) -> nn.Module:
    # A fresh module per use: sparsity hooks need one module per layer, not a shared (or functional) one.
    return nn.LeakyReLU(0.2) if name == "leaky_relu" else nn.ReLU()


class ConvVAE(nn.Module):
    """The convolutional VAE. Inputs and outputs are float images ``(N, 3, S, S)`` in [0, 1].

    BatchNorm layers make train and eval mode differ: call ``eval()`` before inference (the helpers in this
    package do, and put the model back in the mode they found it in).
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        ch = config.channels
        blocks: list[tuple[str, nn.Module]] = []
        prev = 3
        for i, c in enumerate(ch):
            # k=4, s=2, p=1 halves the side exactly; no conv bias because BatchNorm's shift replaces it.
            blocks.append(
                (
                    f"block{i}",
                    nn.Sequential(
                        OrderedDict(
                            conv=nn.Conv2d(prev, c, 4, 2, 1, bias=False),
                            bn=nn.BatchNorm2d(c),
                            act=_activation(config.activation),
                        )
                    ),
                )
            )
            prev = c
        self.encoder = nn.Sequential(OrderedDict(blocks))
        self.fc_mu: nn.Module
        self.fc_logvar: nn.Module
        self.fc_decode: nn.Module
        if config.latent_grid:
            # A spatial latent: 1 x 1 convolutions at every place of the last feature map.
            c_lat = config.latent_dim // config.latent_grid**2
            self.fc_mu = nn.Conv2d(ch[-1], c_lat, 1)
            self.fc_logvar = nn.Conv2d(ch[-1], c_lat, 1)
            self.fc_decode = nn.Conv2d(c_lat, ch[-1], 1)
        else:
            flat = ch[-1] * BOTTOM * BOTTOM
            self.fc_mu = nn.Linear(flat, config.latent_dim)
            self.fc_logvar = nn.Linear(flat, config.latent_dim)
            self.fc_decode = nn.Linear(config.latent_dim, flat)
        self.decode_act = _activation(config.activation)
        up: list[tuple[str, nn.Module]] = []
        rev = list(reversed(ch))
        for i in range(len(rev) - 1):
            up.append(
                (
                    f"block{i}",
                    nn.Sequential(
                        OrderedDict(
                            conv=nn.ConvTranspose2d(rev[i], rev[i + 1], 4, 2, 1, bias=False),
                            bn=nn.BatchNorm2d(rev[i + 1]),
                            act=_activation(config.activation),
                        )
                    ),
                )
            )
        # The last layer has no BatchNorm: it produces pixel logits, whose scale must be free.
        up.append(("out", nn.ConvTranspose2d(rev[-1], 3, 4, 2, 1)))
        self.decoder = nn.Sequential(OrderedDict(up))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 3, S, S)`` in [0, 1] -> posterior mean and log-variance, each ``(N, latent_dim)``."""
        h = self.encoder(x)
        if not self.config.latent_grid:
            h = h.flatten(1)
        return self.fc_mu(h).flatten(1), self.fc_logvar(h).flatten(1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, latent_dim)`` -> pixel logits ``(N, 3, S, S)`` (the BCE loss wants logits for stability)."""
        grid = self.config.latent_grid
        if grid:
            h = self.decode_act(self.fc_decode(z.view(len(z), -1, grid, grid)))
        else:
            h = self.decode_act(self.fc_decode(z)).view(-1, self.config.channels[-1], BOTTOM, BOTTOM)
        out: torch.Tensor = self.decoder(h)
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, latent_dim)`` -> images ``(N, 3, S, S)`` in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct through a sampled latent in training mode and through the mean in eval mode.

        Returns ``(x_hat, mu, logvar)``; ``x_hat`` is in [0, 1].
        """
        mu, logvar = self.encode(x)
        z = reparameterise(mu, logvar, None) if self.training else mu
        return self.decode(z), mu, logvar

    def activation_layers(self, *, include_decoder: bool = False) -> list[tuple[str, nn.Module]]:
        """The encoder's activation modules in execution order, as ``(qualified name, module)``.

        For per-layer activation sparsity via forward hooks. With LeakyReLU no output is exactly zero: count the
        negative outputs instead (they are exactly the units whose pre-activation was negative).
        """
        modules = list(self.encoder.named_modules(prefix="encoder"))
        if include_decoder:
            modules += [("decode_act", self.decode_act), *self.decoder.named_modules(prefix="decoder")]
        return [(name, m) for name, m in modules if isinstance(m, nn.ReLU | nn.LeakyReLU)]


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A sample ``z = mu + sigma * eps`` of the posterior, differentiable in mu and logvar."""
    # The noise comes from the run's generator so that training is reproducible.
    # Drawn where the generator lives (the CPU one of a training run, also when the model is on a GPU), so that
    # a seed gives the same noise on every device.
    where = generator.device if generator is not None else mu.device
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=where).to(mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass
class VAEResult:
    """A trained VAE (in eval mode) with its config, seeded split, summary report and per-epoch history."""

    model: ConvVAE
    config: VAEConfig
    split: dict[str, str]
    """Image id -> ``"train"`` or ``"val"``."""
    report: dict[str, float | str]  # figures, and the device it trained on
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- tensors


def as_float_images(images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images, one ``(3, S, S)`` or a batch -> float32 batch in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise VAEError(f"images must be a torch.Tensor, got {type(images).__name__}")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise VAEError(f"images must be (N, 3, S, S) or (3, S, S), got {tuple(images.shape)}")
    if image_size is not None and (x.shape[2] != image_size or x.shape[3] != image_size):
        raise VAEError(f"images are {x.shape[3]}x{x.shape[2]} px, the model takes {image_size}x{image_size}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise VAEError(f"images must be uint8 or float, got {x.dtype}")
    return x.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images in [0, 1] (or uint8), ``(N, 3, S, S)`` or ``(3, S, S)`` -> RGB PIL images."""
    x = as_float_images(images.detach().cpu())
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


# ------------------------------------------------------------------------------------------------ save/load


def save_vae(result: VAEResult, directory: Path) -> dict[str, Any]:
    """Write ``vae.safetensors`` (weights) and ``vae.json`` (format, config, split, report, history, weights
    sha256), each atomically, weights first (see :mod:`indexer.models.checkpoint`); ``load_vae`` checks that
    sha256, so a reader that catches an overwrite half-way gets a clear error instead of another run's weights.

    Returns ``{"sha256": <weights sha256>, "weights": path, "meta": path}``.
    """
    return save_checkpoint(CHECKPOINT, directory, result.model.state_dict(), {
        "config": result.config.to_dict(),
        "split": result.split,
        "report": result.report,
        "history": result.history,
    })


def load_vae(directory: Path) -> tuple[ConvVAE, dict[str, Any]]:
    """Read a VAE written by ``save_vae``: ``(model in eval mode, the vae.json contents)``.

    Only safetensors are read (no pickles). Raises ``VAEError`` when a file is missing, the format is unknown,
    a tensor's name or shape does not match the config, or the weights are not the ones the JSON names.
    """
    ckpt = read_checkpoint(CHECKPOINT, directory)
    try:
        config = VAEConfig.from_dict(ckpt.meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise VAEError(f"{ckpt.meta_path}: bad config ({e})") from None
    model = ConvVAE(config)
    ckpt.load_into(model.state_dict(), needs="the config")
    model.load_state_dict(ckpt.state)
    model.eval()
    return model, ckpt.meta


# ------------------------------------------------------------------------------------------------ inference


def encode_images(model: ConvVAE, images: torch.Tensor) -> np.ndarray:
    """Posterior means ``(N, latent_dim)`` float32 for images ``(N, 3, S, S)`` (the VAE's embedding of a photo)."""
    out = []
    with eval_mode(model):
        for start in range(0, len(images), EVAL_BATCH):
            mu, _ = model.encode(as_float_images(images[start : start + EVAL_BATCH], model.image_size))
            out.append(mu)
    if not out:
        return np.zeros((0, model.latent_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def decode_latents(model: ConvVAE, z: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Latents ``(N, latent_dim)`` or one ``(latent_dim,)`` (tensor or numpy) -> images ``(N, 3, S, S)`` in [0, 1]."""
    zt = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).detach().cpu().float()
    if zt.dim() == 1:
        zt = zt.unsqueeze(0)
    if zt.dim() != 2 or zt.shape[1] != model.latent_dim:
        raise VAEError(f"latents must be (N, {model.latent_dim}), got {tuple(zt.shape)}")
    out = []
    with eval_mode(model):
        for start in range(0, len(zt), EVAL_BATCH):
            out.append(model.decode(zt[start : start + EVAL_BATCH]))
    if not out:
        s = model.image_size
        return torch.zeros((0, 3, s, s))
    return torch.cat(out)


def interpolate(model: ConvVAE, a: torch.Tensor, b: torch.Tensor, steps: int, mode: str = "linear") -> torch.Tensor:
    """Walk from image a to image b through the latent space: ``(steps, 3, S, S)`` in [0, 1].

    a and b ``(3, S, S)`` (uint8 or float) are encoded to their posterior means; the walk is a straight line
    (``linear``) or a great-circle arc (``slerp``, which keeps the norm typical of Gaussian latents instead of
    cutting through the low-norm middle). The first and last images are the reconstructions of a and b.
    """
    if steps < 2:
        raise VAEError(f"steps must be at least 2 (both ends are included), got {steps}")
    if mode not in ("linear", "slerp"):
        raise VAEError(f"mode must be 'linear' or 'slerp', not {mode!r}")
    for name, img in (("a", a), ("b", b)):
        if img.dim() != 3:
            raise VAEError(f"{name} must be one image (3, S, S), got {tuple(img.shape)}")
    mus = torch.from_numpy(encode_images(model, torch.stack([as_float_images(a)[0], as_float_images(b)[0]])))
    t = torch.linspace(0.0, 1.0, steps)
    z = lerp(mus[0], mus[1], t) if mode == "linear" else slerp(mus[0], mus[1], t)
    return decode_latents(model, z)
