"""Latent operations on a store's trained models: VAE interpolation and decoding, mapper paths and swaps, and
what the models' own validation reports say about how far to trust them.

Images are named by their store id (``images.parquet`` ``id``); results come back as PIL images or as the
nearest indexed photos (with breed votes) in the encoder space, where the mapper decodes to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from analysis.neighbours import BreedVote, Neighbour, breed_votes, search_vectors
from indexer.images import load_image
from indexer.latents import TrainedModels, load_trained_models
from indexer.store import Store, StoreError, schema

_MODELS: dict[tuple[str, str], TrainedModels] = {}

# Below these, a model's validation report says its output should not be taken at face value (model_warnings).
VAE_MIN_SPECIES_AGREEMENT = 0.8  # share of held-out reconstructions the encoder's kNN puts in the photo's species
MAPPER_MIN_SWAP_ACC = 0.8  # share of held-out swaps the frozen breed classifier reads as the identity photo's breed


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


def _vae_batch(store: Store, ids: Sequence[str], image_size: int) -> torch.Tensor:
    return torch.stack([_vae_input(store, i, image_size) for i in ids])


def vae_originals(store: Store, ids: Sequence[str]) -> list[Image.Image]:
    """The photos as the VAE sees them (shorter side resized to its image size, centre crop): what its
    reconstructions are to be compared with."""
    from indexer.models.vae import to_pil

    models = trained_models(store)
    _require(models, "vae", store)
    return to_pil(_vae_batch(store, ids, models.vae_image_size)) if ids else []


def vae_reconstructions(store: Store, ids: Sequence[str]) -> list[Image.Image]:
    """Each photo decoded from its posterior mean: what the VAE keeps of it (the ends of ``vae_interpolate``)."""
    from indexer.models.vae import decode_latents, encode_images, to_pil

    models = trained_models(store)
    _require(models, "vae", store)
    if not ids:
        return []
    mu = encode_images(models.vae, _vae_batch(store, ids, models.vae_image_size))
    return to_pil(decode_latents(models.vae, mu))


def _encoder_vector(store: Store, image_id: str) -> np.ndarray:
    sp = store.space(schema.ENCODER_SPACE)
    return sp.vectors[_row(store, image_id)][None, :]


def mapper_path(store: Store, id_a: str, id_b: str, *, steps: int = 8, k: int = 5) -> list[list[Neighbour]]:
    """Nearest indexed photos (encoder space) of each point on the mapper's path from photo a to photo b."""
    return search_vectors(store, _mapper_path_vectors(store, id_a, id_b, steps), k=k)


def _mapper_path_vectors(store: Store, id_a: str, id_b: str, steps: int) -> np.ndarray:
    """The decoded, L2-normalised embeddings ``(steps, D)`` along the mapper's path from photo a to photo b."""
    from indexer.models.mapper import interpolate

    models = trained_models(store)
    _require(models, "mapper", store)
    return interpolate(models.mapper, _encoder_vector(store, id_a), _encoder_vector(store, id_b), steps)


def breed_probabilities(store: Store, vectors: np.ndarray) -> list[dict[str, float]]:
    """The mapper's frozen breed classifier on embeddings ``(N, D)`` (e.g. decoded by the mapper): per row, every
    breed's softmax probability, highest first.  Rows are L2-normalised first, as ``predict_breeds`` does, so the
    first breed of a row is what ``predict_breeds`` reads it as."""
    models = trained_models(store)
    _require(models, "mapper", store)
    clf = models.mapper_classifier
    breeds = [str(b) for b in models.mapper_meta["breeds"]]
    x = torch.nn.functional.normalize(torch.as_tensor(np.atleast_2d(np.asarray(vectors, dtype=np.float32))), dim=1)
    with torch.no_grad():
        probs = torch.softmax(clf(x.to(next(clf.parameters()).device)), dim=1).cpu().numpy()
    return [{breeds[int(j)]: float(row[j]) for j in np.argsort(-row, kind="stable")} for row in probs]


@dataclass
class PathStep:
    """One point of the mapper's path from a to b, decoded to the encoder space."""

    step: int  # 0 is a's decoded embedding, the last step b's
    t: float  # position along the path, 0 to 1
    probabilities: dict[str, float]  # the frozen breed classifier's reading: every breed, highest first
    neighbours: list[Neighbour]  # nearest indexed photos (encoder space)
    breed_votes: list[BreedVote]  # their similarity-weighted breed vote

    def top_breeds(self, n: int = 3) -> list[tuple[str, float]]:
        return list(self.probabilities.items())[:n]


def mapper_path_steps(store: Store, id_a: str, id_b: str, *, steps: int = 8, k: int = 10) -> list[PathStep]:
    """The mapper's path from photo a to photo b, each step with the breed classifier's probabilities and the
    nearest photos (with their breed vote) of its decoded embedding."""
    path = _mapper_path_vectors(store, id_a, id_b, steps)
    probs = breed_probabilities(store, path)
    nbrs = search_vectors(store, path, k=k)
    last = max(len(path) - 1, 1)
    return [PathStep(i, i / last, p, n, breed_votes(n)) for i, (p, n) in enumerate(zip(probs, nbrs, strict=True))]


@dataclass
class PathStop:
    """An indexed photo that is the nearest photo of one or more steps of a path."""

    neighbour: Neighbour  # as found at its first step
    steps: list[int]  # the steps it is nearest to, ascending

    @property
    def step_label(self) -> str:
        return ("step " if len(self.steps) == 1 else "steps ") + step_ranges(self.steps)


def step_ranges(steps: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0–2, 5"``."""
    runs: list[list[int]] = []
    for s in sorted(set(steps)):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def distinct_nearest(neighbours: Sequence[Sequence[Neighbour]]) -> list[PathStop]:
    """The nearest photo of every step (``neighbours[step]``, ranked), each photo once with the steps it is
    nearest to, in the order of their first step.  Steps without neighbours are left out."""
    stops: dict[str, PathStop] = {}
    for step, row in enumerate(neighbours):
        if not row:
            continue
        first = row[0]
        if first.id in stops:
            stops[first.id].steps.append(step)
        else:
            stops[first.id] = PathStop(first, [step])
    return list(stops.values())


@dataclass
class SwapResult:
    """Identity of a with the attributes of b, decoded to the encoder space and looked up there."""

    classifier_breed: str  # what the mapper's frozen breed classifier reads the swap as
    neighbours: list[Neighbour]
    breed_votes: list[BreedVote]
    top_breeds: list[tuple[str, float]] = field(default_factory=list)  # the classifier's top breeds, probability
    identity_breed: str | None = None  # a's breed label: what a faithful swap reads as (None: unlabelled)


def mapper_swap(store: Store, id_a: str, id_b: str, *, k: int = 10) -> SwapResult:
    """Swap: breed (z_id) of photo a, pose/appearance (z_attr) of photo b; nearest photos and their breeds."""
    from indexer.models.mapper import predict_breeds, swap

    models = trained_models(store)
    _require(models, "mapper", store)
    breeds = models.mapper_meta["breeds"]
    x = swap(models.mapper, models.mapper_classifier, breeds, _encoder_vector(store, id_a),
             _encoder_vector(store, id_b))
    nbrs = search_vectors(store, x, k=k)[0]
    top = list(breed_probabilities(store, x)[0].items())[:3]
    label = store.images["breed"].iloc[_row(store, id_a)]
    return SwapResult(predict_breeds(models.mapper_classifier, breeds, x)[0], nbrs, breed_votes(nbrs), top,
                      label if isinstance(label, str) and label else None)


# ------------------------------------------------------------------------------------------------ trust
def _number(report: Mapping[str, Any], key: str) -> float | None:
    v = report.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _percent(*values: float) -> list[str]:
    """Values as percentages, with as few decimals (up to 2) as keep unequal values apart: 0.795 against a
    threshold of 0.8 reads 79.5%, not 80%."""
    for digits in range(3):
        out = [f"{v:.{digits}%}" for v in values]
        if len(set(out)) == len(set(values)):
            return out
    return out


def vae_warnings(report: Mapping[str, Any]) -> list[str]:
    """What a VAE's validation report says is weak, in words (``[]``: nothing)."""
    agreement = _number(report, "val_species_agreement")
    if agreement is None:
        return ["The VAE's report does not say how often its reconstructions keep their original's species "
                "(none of its held-out photos had a species label, or it was trained before this was measured): "
                "nothing here shows that its images are reliable."]
    if agreement < VAE_MIN_SPECIES_AGREEMENT:
        p, th = _percent(agreement, VAE_MIN_SPECIES_AGREEMENT)
        return [f"The VAE's reconstructions are put in their original's species only {p} of the time "
                f"(below {th}): its images are not reliable.  (Measured on its held-out photos: each "
                "reconstruction, embedded by the store's encoder, gets the species of its nearest indexed photos.)"]
    return []


def mapper_warnings(report: Mapping[str, Any]) -> list[str]:
    """What a mapper's validation report says is weak, in words (``[]``: nothing)."""
    out = []
    z_id, raw = _number(report, "val_knn_breed_acc_z_id"), _number(report, "val_knn_breed_acc_raw")
    if z_id is None or raw is None:
        out.append("The mapper's report does not compare the kNN breed accuracy of its identity code (z_id) with "
                   "the encoder's: nothing here shows that its identity space is a better breed space.")
    elif z_id <= raw:
        p_id, p_raw = _percent(z_id, raw)
        out.append(f"The mapper's identity code (z_id) finds a held-out photo's breed from its nearest neighbours "
                   f"{p_id} of the time, no better than the encoder's own embeddings ({p_raw}): its identity "
                   "space adds nothing for breed, so its path and swaps are not reliable breed changes.")
    swap_acc = _number(report, "swap_acc")
    if swap_acc is None:
        out.append("The mapper's report does not say how often its swaps keep the identity photo's breed: "
                   "nothing here shows that its swaps are reliable.")
    elif swap_acc < MAPPER_MIN_SWAP_ACC:
        p, th = _percent(swap_acc, MAPPER_MIN_SWAP_ACC)
        out.append(f"The mapper's swaps are read as the identity photo's breed only {p} of the time (below {th}, "
                   "by its own breed classifier on held-out photos): its swaps are not reliable.")
    return out


_JUDGES = {"vae": vae_warnings, "mapper": mapper_warnings}


def model_warnings(store: Store, model: str | None = None) -> list[str]:
    """In words, what the trained models' validation reports (in the store manifest) say is weak: of ``model``
    (``vae`` or ``mapper``), or of every trained model.  ``[]`` when nothing is, or the model is not trained."""
    if model is not None and model not in _JUDGES:
        raise ValueError(f"model must be one of {sorted(_JUDGES)}, not {model!r}")
    trained: Mapping[str, Any] = store.manifest.get("models", {})
    out: list[str] = []
    for name, judge in _JUDGES.items():
        if (model is None or model == name) and name in trained:
            report = trained[name].get("report")
            out += judge(report if isinstance(report, Mapping) else {})
    return out
