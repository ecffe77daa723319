"""The VAE's loss terms, per image: reconstruction (Bernoulli or Gaussian likelihood) and the KL divergence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
