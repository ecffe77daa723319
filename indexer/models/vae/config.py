"""The VAE's settings (``VAEConfig``, saved beside the weights), the image sizes it supports, and its error type."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from indexer.errors import UsageError
from indexer.models.config_docs import check_config_keys

IMAGE_SIZES = (64, 128)
BOTTOM = 4  # spatial side of the last encoder feature map, whatever the input size
_DEFAULT_CHANNELS = {64: (32, 64, 128, 256), 128: (32, 64, 128, 256, 256)}
_ACTIVATIONS = ("leaky_relu", "relu")
_RECON_LOSSES = ("bce", "mse")
_LR_SCHEDULES = ("cosine", "constant")


class VAEError(UsageError):
    """A VAE file or argument that cannot be used (wrong format, shapes that do not match, bad settings)."""


def check_image_size(image_size: int) -> None:
    if image_size not in IMAGE_SIZES:
        raise VAEError(f"image_size must be one of {IMAGE_SIZES}, not {image_size}")


def _n_blocks(image_size: int) -> int:
    return int(math.log2(image_size)) - int(math.log2(BOTTOM))


@dataclass
class VAEConfig:
    """Everything that defines a trained VAE: architecture, loss and training settings (saved beside the weights).

    The defaults train on the 1,140 shared 64 px photos in about a minute and a half on a 2-core CPU.
    """

    image_size: int = 64
    """Side of the square input and output images: 64 or 128 (128 adds a fifth block)."""
    latent_dim: int = 64
    """Size of the latent code z (the posterior mean is the photo's vector in the ``vae_mu`` space)."""
    beta: float = 1.0
    """KL weight; 1 is the true ELBO (with sums over pixels the KL is small next to the reconstruction term)."""
    kl_warmup_epochs: float = 0.0
    """Raise the KL weight linearly from 0 to ``beta`` over this many epochs (0: full weight from the first step)."""
    epochs: int = 25
    """Passes over the training images."""
    batch_size: int = 64
    """Images per Adam step."""
    lr: float = 2e-3
    """Adam learning rate (at the start, with the cosine schedule)."""
    lr_schedule: str = "cosine"
    """``cosine`` (decay per step to 5% of ``lr`` by the end: the last epochs settle instead of jittering) or
    ``constant``."""
    channels: tuple[int, ...] = ()
    """Encoder channels per stride-2 block, one per halving down to 4 x 4; empty means the default for the size
    (64 px: 32-64-128-256, 128 px: 32-64-128-256-256). The decoder mirrors them."""
    activation: str = "leaky_relu"
    """``leaky_relu`` (slope 0.2, the usual VAE/GAN choice) or ``relu`` (exact zeros, for sparsity studies)."""
    recon_loss: str = "bce"
    """``bce`` (Bernoulli likelihood on the logits) or ``mse`` (summed squared error, a fixed-variance Gaussian).

    BCE by default: its gradient per logit is ``p - x`` where the squared error's, through the sigmoid, is
    ``2 (p - x) p (1 - p)``, so it drives pixels harder against the KL term and never stalls on saturated pixels.
    On the 1,140 pets (25 epochs, constant lr) it reached a val MSE per pixel of 0.020 against 0.031 with the
    summed squared error, whose first epoch also blew up the KL. (Pixel targets in (0, 1) are not binary, so the
    BCE has a nonzero floor; only its gradient matters, and MSE is what the report compares.)"""
    perceptual_weight: float = 0.0
    """Weight of the perceptual term (feature matching through the store's frozen encoder, summed relative
    errors over its stages plus 1 - cosine of the embeddings) next to the summed pixel loss; 0 turns it off.

    Off by default because it has not earned its cost yet: on the 1,140 pets at 64 px, weight 2000 for 20 epochs
    took 13 min on this 2-core CPU (25 s a run without it) and put reconstructions in their original's species
    42% of the time (39% without; a constant "dog" gets 58%), at a val MSE per pixel of 0.063 (0.020 without)."""
    perceptual_size: int = 64
    """Side the images are resized to before the frozen encoder computes the perceptual term (its cost grows
    with the square of this)."""
    hflip: bool = True
    """Random horizontal flips of training images: pets are left-right symmetric, so this is free extra data."""
    val_fraction: float = 0.1
    """Share of the images held out (seeded) to measure reconstruction after every epoch."""
    seed: int = 0
    """Seeds the split, the initial weights, the batch order, the flips and the reparameterisation noise."""
    num_threads: int = 2
    """CPU threads while training; part of the config because it is part of what makes a run reproducible."""

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        self.channels = tuple(int(c) for c in self.channels) or _DEFAULT_CHANNELS[self.image_size]
        need = _n_blocks(self.image_size)
        if len(self.channels) != need:
            raise VAEError(
                f"{self.image_size} px needs {need} encoder blocks (one per halving down to {BOTTOM} px), "
                f"got channels={self.channels}"
            )
        if any(c < 1 for c in self.channels):
            raise VAEError(f"channels must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise VAEError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if self.activation not in _ACTIVATIONS:
            raise VAEError(f"activation must be one of {_ACTIVATIONS}, not {self.activation!r}")
        if self.recon_loss not in _RECON_LOSSES:
            raise VAEError(f"recon_loss must be one of {_RECON_LOSSES}, not {self.recon_loss!r}")
        if self.lr_schedule not in _LR_SCHEDULES:
            raise VAEError(f"lr_schedule must be one of {_LR_SCHEDULES}, not {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_threads < 1:
            raise VAEError("epochs, batch_size and num_threads must be at least 1")
        if not self.lr > 0 or self.beta < 0 or self.kl_warmup_epochs < 0:
            raise VAEError("lr must be positive; beta and kl_warmup_epochs must not be negative")
        if self.perceptual_weight < 0 or self.perceptual_size < 32:
            raise VAEError("perceptual_weight must not be negative and perceptual_size must be at least 32")
        if not 0.0 < self.val_fraction < 1.0:
            raise VAEError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        check_config_keys(cls, d, VAEError, "VAE")
        kwargs = dict(d)
        if "channels" in kwargs:
            kwargs["channels"] = tuple(kwargs["channels"])
        return cls(**kwargs)
