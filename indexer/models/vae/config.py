"""The VAE's settings (``VAEConfig``, saved beside the weights), the image sizes it supports, and its error type."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from indexer.errors import UsageError
from indexer.models.config_docs import check_config_keys

IMAGE_SIZES = (64, 128)
BOTTOM = 4  # spatial side of the last encoder feature map, whatever the input size
# Encoder channels per halving, by (image size, latent grid side; 0: a vector latent read at 4 x 4).
_DEFAULT_CHANNELS = {
    (64, 0): (32, 64, 128, 256), (128, 0): (32, 64, 128, 256, 256),
    (64, 8): (64, 128, 256), (128, 8): (32, 64, 128, 256),
    (64, 16): (64, 128), (128, 16): (32, 64, 128),
}
LATENT_GRIDS = (8, 16)
_ACTIVATIONS = ("leaky_relu", "relu")
_RECON_LOSSES = ("bce", "mse")
_LR_SCHEDULES = ("cosine", "constant")


class VAEError(UsageError):
    """A VAE file or argument that cannot be used (wrong format, shapes that do not match, bad settings)."""


def check_image_size(image_size: int) -> None:
    if image_size not in IMAGE_SIZES:
        raise VAEError(f"image_size must be one of {IMAGE_SIZES}, not {image_size}")


def _n_blocks(image_size: int, bottom: int = BOTTOM) -> int:
    return int(math.log2(image_size)) - int(math.log2(bottom))


_SAVED_WITHOUT: dict[str, Any] = {"latent_grid": 0, "max_steps": 0, "perceptual_crop": 0}


@dataclass
class VAEConfig:
    """Everything that defines a trained VAE: architecture, loss and training settings (saved beside the weights).

    The defaults train on the 1,140 shared 64 px photos in about 6 minutes on a loaded 2-core CPU (372 s in
    bench_latents, 2026-12-04, where the old defaults took 634 s; 990 steps), and take at most 1,500 steps on any
    store, so at most about 10 minutes whatever its size.

    Measured on the pets photos (912 train, 228 held out; this CPU): how often the pretrained encoder puts a
    held-out reconstruction in its original's species / breed (majority rates 0.61 / 0.06), the Fréchet distance
    of encoder features, and the train time:

    =========================================================  =======  =====  ======  =====
    VAE                                                        species  breed  FD      train
    =========================================================  =======  =====  ======  =====
    vector z (64), beta 1, 20 epochs (the old defaults)        0.42     0.02   0.55    38 s
    vector z, + perceptual (weight 200, 20 epochs)             0.53     0.04   0.6     7 min
    grid z 16 x 16 x 4, beta 1, 20 epochs                      0.53     0.07   0.44    22 s
    grid z, channels 64-128, beta 0.1, 40 epochs               0.77     0.25   0.26    112 s
    grid z, beta 0.02 (0.005 gives the same)                   0.80     0.26   0.24    114 s
    grid z, beta 0.02, + perceptual 50, crop 128               0.84     0.36   0.20    8.5 min
    grid z, beta 0.02, + perceptual 50, crop 96                0.85     0.35   0.20    4.5 min
    =========================================================  =======  =====  ======  =====

    The last setting and two cheaper ones, measured on 2026-12-04 on the default split (1,026 train, 114 held out:
    majority rates 0.58 / 0.06), with the fused 64 px preprocessing, in one afternoon and evening on a loaded VM
    (so the times are slower than above, and comparable with each other only):

    =========================================================  =======  =====  ======  =====
    VAE                                                        species  breed  FD      train
    =========================================================  =======  =====  ======  =====
    crop 96, 40 epochs (1,320 steps)                           0.89     0.46   0.25    10.6 min
    crop 64, 40 epochs                                         0.90     0.42   0.26    8.3 min
    crop 64, 30 epochs (990 steps; the defaults)               0.89     0.39   0.27    6.5 min
    =========================================================  =======  =====  ======  =====

    The defaults take the cheapest: species agreement (what the explorer's warning and the tests read) does not
    move, breed agreement loses 7 points (1.5 standard errors on 114 photos) and training takes 60% of the time.

    For scale, real photos shrunk to 64 px reach 0.99 / 0.69, and a Gaussian blur of 1.5 px on them drops
    species to 0.79: the encoder reads texture, so blur, not resolution, is what a VAE has to beat.
    """

    image_size: int = 64
    """Side of the square input and output images: 64 or 128 (128 adds a fifth block)."""
    latent_dim: int = 1024
    """Size of the latent code z (the posterior mean is the photo's vector in the ``vae_mu`` space); with a
    ``latent_grid``, a multiple of its square (1024 = 16 x 16 places x 4 channels)."""
    latent_grid: int = 16
    """0: z is one vector, read from the 4 x 4 feature map by a linear layer. 8 or 16: z is a spatial grid
    (``latent_dim / latent_grid**2`` channels at each of ``latent_grid`` x ``latent_grid`` places, from 1 x 1
    convolutions), as in the autoencoders of latent diffusion: each place codes its own patch, so far more detail
    survives for the same training time, and the encoder stops halving at that side.

    16 by default because only a grid gives reconstructions a person (and the encoder) recognises (class table
    above). The price: a grid code is a picture of the photo, so ``vae_mu`` neighbours are photos that look
    alike (colour, layout), interpolations cross-fade more than they morph, and samples from the prior are
    textures, not animals. ``latent_grid=0, latent_dim=64`` is the global code for those uses."""
    beta: float = 0.02
    """KL weight; 1 is the true ELBO. Below 1 the code keeps more of each photo (a beta-VAE with beta < 1):
    with the grid code, beta 1 left reconstructions blurred past recognition (species 0.53) and 0.02 or 0.005
    gave the same sharpness (0.80)."""
    kl_warmup_epochs: float = 0.0
    """Raise the KL weight linearly from 0 to ``beta`` over this many epochs (0: full weight from the first step)."""
    epochs: int = 30
    """Passes over the training images (at most ``max_steps`` steps in all)."""
    max_steps: int = 1500
    """Stop after this many optimiser steps whatever ``epochs`` says (0: no limit), so that training time stops
    growing with the store: the 1,140 pets take 990 steps at the defaults, the ~11k shared photos would take
    about 9,300 (30 passes over 90% of 11,034 in batches of 32), and a few passes over many photos teach as much
    as many passes over few."""
    batch_size: int = 32
    """Images per Adam step (32: twice the steps of 64 for the same passes, which a small store needs)."""
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
    perceptual_weight: float = 50.0
    """Weight of the perceptual term (feature matching through the store's frozen encoder, summed relative
    errors over its stages plus 1 - cosine of the embeddings; Hou et al. 2017) next to the summed pixel loss;
    0 turns it off. It raised held-out species agreement from 0.80 to 0.85 and breed agreement from 0.26 to 0.35
    (class table) for 2.5x the training time; at 2000 the term swamped the pixels (grey textures)."""
    perceptual_size: int = 0
    """Side the images are enlarged to (bicubic) before the frozen encoder computes the perceptual term; 0: the
    encoder's own resize side (256 for efficientnet-lite0), so that the encoder sees textures at the scale it sees
    them when the store embeds a reconstruction."""
    perceptual_crop: int = 64
    """Side of the random window (the same for a reconstruction and its original) that the frozen encoder reads
    out of the enlarged image; 0: all of it. The cost grows with the square of this; 96 of 256 did as well as 128
    (species 0.85 against 0.84) in half the time, and 64 as well as 96 (0.90 against 0.89, second table) in 80% of
    it: a 64 px window of 256 still covers a sixteenth of the photo, an eye or an ear at the encoder's scale."""
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
        bottom = self.latent_grid or BOTTOM
        if self.latent_grid and (self.latent_grid not in LATENT_GRIDS or self.latent_grid >= self.image_size):
            raise VAEError(f"latent_grid must be 0 or one of {LATENT_GRIDS} (below image_size), "
                           f"not {self.latent_grid}")
        if self.latent_grid and self.latent_dim % self.latent_grid**2:
            raise VAEError(f"latent_dim must be a multiple of latent_grid**2 = {self.latent_grid**2}, "
                           f"got {self.latent_dim}")
        need = _n_blocks(self.image_size, bottom)
        self.channels = tuple(int(c) for c in self.channels) or _DEFAULT_CHANNELS[self.image_size, self.latent_grid]
        if len(self.channels) != need:
            raise VAEError(
                f"{self.image_size} px needs {need} encoder blocks (one per halving down to {bottom} px), "
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
        if self.epochs < 1 or self.batch_size < 1 or self.num_threads < 1 or self.max_steps < 0:
            raise VAEError("epochs, batch_size and num_threads must be at least 1, max_steps not negative")
        if not self.lr > 0 or self.beta < 0 or self.kl_warmup_epochs < 0:
            raise VAEError("lr must be positive; beta and kl_warmup_epochs must not be negative")
        if self.perceptual_weight < 0 or self.perceptual_size < 0 or self.perceptual_crop < 0:
            raise VAEError("perceptual_weight, perceptual_size and perceptual_crop must not be negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise VAEError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        check_config_keys(cls, d, VAEError, "VAE")
        # VAEs saved before these settings existed have a vector latent and trained without a step limit.
        kwargs = {**_SAVED_WITHOUT, **d}
        if "channels" in kwargs:
            kwargs["channels"] = tuple(kwargs["channels"])
        return cls(**kwargs)
