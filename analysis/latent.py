"""Latent operations on a store's trained models: VAE interpolation and decoding, mapper paths and swaps.

Images are named by their store id (``images.parquet`` ``id``); results come back as PIL images or as the
nearest indexed photos (with breed votes) in the encoder space, where the mapper decodes to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis.neighbours import BreedVote, Neighbour, breed_votes, search_vectors
from indexer.images import load_image
from indexer.latents import TrainedModels, load_trained_models
from indexer.store import Store, StoreError, schema

_MODELS: dict[tuple[str, str], TrainedModels] = {}


def trained_models(store: Store) -> TrainedModels:
    """The store's models, loaded once per manifest version (retraining changes the key)."""
    key = (str(store.path.resolve()), str(store.manifest.get("models")))
    if key not in _MODELS:
        _MODELS[key] = load_trained_models(store)
    return _MODELS[key]


def _require(models: TrainedModels, name: str, store: Store) -> None:
    if getattr(models, name) is None:
        raise StoreError(f"{store.path}: no trained {name} (run `mammals train {name} --store {store.path}`)")


def _row(store: Store, image_id: str) -> int:
    pos = np.flatnonzero(store.images["id"].to_numpy() == image_id)
    if not len(pos):
        raise StoreError(f"{store.path}: no image with id {image_id!r}")
    return int(pos[0])


def _vae_input(store: Store, image_id: str, image_size: int) -> torch.Tensor:
    from indexer.models.vae import vae_transform

    _, img = load_image(Path(store.images["path"].iloc[_row(store, image_id)]))
    return vae_transform(image_size)(img)


def vae_interpolate(store: Store, id_a: str, id_b: str, *, steps: int = 8, mode: str = "linear") -> list[Image.Image]:
    """Decoded images along the VAE latent path from photo a to photo b (``linear`` or ``slerp``), ends included."""
    from indexer.models.vae import interpolate, to_pil

    models = trained_models(store)
    _require(models, "vae", store)
    size = models.vae_image_size
    a, b = _vae_input(store, id_a, size), _vae_input(store, id_b, size)
    return to_pil(interpolate(models.vae, a, b, steps, mode=mode))


def vae_decode(store: Store, z: np.ndarray) -> list[Image.Image]:
    """Decode latent vectors ``(n, latent_dim)`` (e.g. rows of the ``vae_mu`` space) to images."""
    from indexer.models.vae import decode_latents, to_pil

    models = trained_models(store)
    _require(models, "vae", store)
    return to_pil(decode_latents(models.vae, np.atleast_2d(z)))


def _encoder_vector(store: Store, image_id: str) -> np.ndarray:
    sp = store.space(schema.ENCODER_SPACE)
    return sp.vectors[_row(store, image_id)][None, :]


def mapper_path(store: Store, id_a: str, id_b: str, *, steps: int = 8, k: int = 5) -> list[list[Neighbour]]:
    """Nearest indexed photos (encoder space) of each point on the mapper's path from photo a to photo b."""
    from indexer.models.mapper import interpolate

    models = trained_models(store)
    _require(models, "mapper", store)
    path = interpolate(models.mapper, _encoder_vector(store, id_a), _encoder_vector(store, id_b), steps)
    return search_vectors(store, path, k=k)


@dataclass
class SwapResult:
    """Identity of a with the attributes of b, decoded to the encoder space and looked up there."""

    classifier_breed: str  # what the mapper's frozen breed classifier reads the swap as
    neighbours: list[Neighbour]
    breed_votes: list[BreedVote]


def mapper_swap(store: Store, id_a: str, id_b: str, *, k: int = 10) -> SwapResult:
    """Swap: breed (z_id) of photo a, pose/appearance (z_attr) of photo b; nearest photos and their breeds."""
    from indexer.models.mapper import predict_breeds, swap

    models = trained_models(store)
    _require(models, "mapper", store)
    breeds = models.mapper_meta["breeds"]
    x = swap(models.mapper, models.mapper_classifier, breeds, _encoder_vector(store, id_a),
             _encoder_vector(store, id_b))
    nbrs = search_vectors(store, x, k=k)[0]
    return SwapResult(predict_breeds(models.mapper_classifier, breeds, x)[0], nbrs, breed_votes(nbrs))
