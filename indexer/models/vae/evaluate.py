"""The VAE's own validation measures: reconstruction error from the posterior mean, KL and loss per image."""

from __future__ import annotations

import torch

from indexer.models.scoped import eval_mode
from indexer.models.vae.losses import kl_per_image, recon_per_image
from indexer.models.vae.model import EVAL_BATCH, ConvVAE, as_float_images


def evaluate_vae(model: ConvVAE, images: torch.Tensor, kind: str) -> dict[str, float]:
    """Mean per-pixel squared error (reconstructing from the mean), mean KL per image and the loss, on images.

    ``kind`` is the reconstruction loss (``VAEConfig.recon_loss``); eval mode, so BatchNorm uses its running
    statistics and every epoch is measured the same way.
    """
    sq = kl = recon = 0.0
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(images), EVAL_BATCH):
            x = as_float_images(images[start : start + EVAL_BATCH].to(device))
            mu, logvar = model.encode(x)
            logits = model.decode_logits(mu)
            sq += (torch.sigmoid(logits) - x).pow(2).sum().item()
            kl += kl_per_image(mu, logvar).sum().item()
            recon += recon_per_image(logits, x, kind).sum().item()
    n = len(images)
    return {"recon_mse": sq / (n * images[0].numel()), "kl": kl / n, "recon": recon / n}
