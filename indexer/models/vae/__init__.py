"""A convolutional variational autoencoder trained on the photos themselves (the classic CNN-VAE).

The VAE gives the project a latent space learned from pixels alone, to compare with the pretrained encoders'
embedding spaces: reconstructions, samples from the prior, walks between two photos, and per-layer activation
sparsity of the encoder.

Model: ``log2(S) - 2`` stride-2 convolution blocks (conv -> BatchNorm -> activation) take an S x S photo down to
4 x 4, one linear layer each gives the posterior mean and log-variance, and a mirrored stack of transposed
convolutions with a sigmoid output decodes a latent vector back to an image in [0, 1].

Loss per image: ``recon + beta * KL(q(z|x) || N(0, I))``, both summed over an image (pixels, latent dims) and
averaged over the batch, so ``beta = 1`` is the real evidence lower bound. The reconstruction term is a Bernoulli
likelihood (binary cross-entropy on the decoder logits) by default; a Gaussian one (summed squared error) is an
option. Whichever is trained, the reported quality is the same comparable number: the validation mean squared
error per pixel, reconstructing from the posterior mean.

Determinism: one seed fixes the train/val split, the initial weights, the batch order, the flips and the
reparameterisation noise (the weights from ``torch.manual_seed(seed)``, every later draw from one seeded
``torch.Generator``). On the CPU the same seed,
thread count (``VAEConfig.num_threads``) and torch build give bit-identical weights; a different thread count or
torch build may change the float summation order and so the last bits.

Modules: :mod:`~indexer.models.vae.config` (``VAEConfig``), :mod:`~indexer.models.vae.model` (the network, its
files and inference helpers), :mod:`~indexer.models.vae.photos` (the input transform and the photo loader),
:mod:`~indexer.models.vae.losses`, :mod:`~indexer.models.vae.train`, :mod:`~indexer.models.vae.evaluate` (the
validation measures) and :mod:`~indexer.models.vae.grids` (PNG grids). The names callers use are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexer.lazy import lazy_attributes

if TYPE_CHECKING:
    from indexer.models.vae.config import VAEConfig, VAEError
    from indexer.models.vae.evaluate import evaluate_vae
    from indexer.models.vae.grids import save_reconstruction_grid, save_sample_grid
    from indexer.models.vae.losses import FeatureMatch
    from indexer.models.vae.model import (
        FORMAT,
        FORMAT_VERSION,
        META_FILE,
        WEIGHTS_FILE,
        ConvVAE,
        VAEResult,
        decode_latents,
        encode_images,
        interpolate,
        load_vae,
        save_vae,
        to_pil,
    )
    from indexer.models.vae.photos import load_images, vae_transform
    from indexer.models.vae.train import train_vae

# name -> submodule; loaded on first use (indexer/lazy.py), so that reading a config does not import torch.
_WHERE = {
    "ConvVAE": "model",
    "FORMAT": "model",
    "FeatureMatch": "losses",
    "FORMAT_VERSION": "model",
    "META_FILE": "model",
    "VAEConfig": "config",
    "VAEError": "config",
    "VAEResult": "model",
    "WEIGHTS_FILE": "model",
    "decode_latents": "model",
    "encode_images": "model",
    "evaluate_vae": "evaluate",
    "interpolate": "model",
    "load_images": "photos",
    "load_vae": "model",
    "save_reconstruction_grid": "grids",
    "save_sample_grid": "grids",
    "save_vae": "model",
    "to_pil": "model",
    "train_vae": "train",
    "vae_transform": "photos",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
