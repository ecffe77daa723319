"""Nearest indexed images and breed votes for new photos (`mammals query`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from indexer import defaults, schema
from indexer.encoders import Encoder, load_encoder
from indexer.encoders.registry import resolve_device
from indexer.extract import embed
from indexer.images import ImageError, load_image
from indexer.latents import MAPPER, SPACE_MODEL, TrainedModels, load_trained_models, mapper_vectors, vae_vectors
from indexer.store import Store, StoreError, unit_rows

# Bump when the JSON layout of `mammals query --json` changes (documented in README.md).
QUERY_JSON_SCHEMA = "mammals.query/1"


@dataclass
class Neighbour:
    rank: int
    id: str
    path: str
    species: str | None
    breed: str | None
    similarity: float


@dataclass
class BreedVote:
    species: str | None
    breed: str
    votes: int  # neighbours of this breed
    score: float  # sum of their (non-negative) cosine similarities
    share: float  # score / total score of all labelled neighbours


@dataclass
class QueryResult:
    query: str
    neighbours: list[Neighbour] = field(default_factory=list)
    breed_votes: list[BreedVote] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _none_if_na(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else v


def breed_votes(neighbours: Sequence[Neighbour]) -> list[BreedVote]:
    """Breeds ranked by similarity-weighted votes among the neighbours; unlabelled neighbours abstain.

    Negative similarities count as zero: an image pointing away from the query is no evidence for its breed.
    """
    scores: dict[tuple[str | None, str], list[float]] = {}
    for n in neighbours:
        if n.breed:
            scores.setdefault((n.species, n.breed), []).append(max(n.similarity, 0.0))
    total = sum(sum(v) for v in scores.values())
    votes = [
        BreedVote(sp, br, len(v), float(sum(v)), float(sum(v) / total) if total > 0 else 0.0)
        for (sp, br), v in scores.items()
    ]
    return sorted(votes, key=lambda b: (-b.score, -b.votes, b.breed))


def search_vectors(
    store: Store, vectors: np.ndarray, *, k: int, space: str = schema.ENCODER_SPACE, exclude_self: bool = False
) -> list[list[Neighbour]]:
    """The k nearest indexed images of each row of ``vectors`` in ``space``."""
    index = store.faiss_index(space)
    by_fid = store.images.set_index("faiss_id")
    kk = min(k + (1 if exclude_self else 0), index.ntotal)
    if kk == 0:
        return [[] for _ in range(len(vectors))]
    sims, fids = index.search(unit_rows(vectors), kk)
    out: list[list[Neighbour]] = []
    for row_sims, row_fids in zip(sims, fids, strict=True):
        found = []
        for s, f in zip(row_sims, row_fids, strict=True):
            if f < 0:
                continue
            img = by_fid.loc[int(f)]
            found.append(Neighbour(0, str(img["id"]), str(img["path"]), _none_if_na(img["species"]),
                                   _none_if_na(img["breed"]), float(s)))
        if exclude_self:
            found = found[1:]
        for r, n in enumerate(found[:k], start=1):
            n.rank = r
        out.append(found[:k])
    return out


def encoder_for_store(store: Store, device: str = "cpu") -> Encoder:
    """Load the store's own encoder, refusing one whose weights differ from those that built the store."""
    enc = load_encoder(store.encoder["name"], device=device)
    store.check_encoder(enc.describe())
    return enc


def query_images(
    store: Store,
    images: Sequence[Path],
    *,
    k: int = defaults.K,
    space: str = schema.ENCODER_SPACE,
    encoder: Encoder | None = None,
    device: str = "auto",
) -> list[QueryResult]:
    """Project each query photo into ``space`` with the store's own models; return neighbours and breed votes."""
    if space not in store.space_names():
        raise StoreError(f"{store.path}: no space {space!r} (spaces: {', '.join(store.space_names())}; "
                         "train a model and run `mammals index` to add its spaces)")
    dev = resolve_device(device)
    if encoder is None:
        encoder = encoder_for_store(store, str(dev))
    else:
        store.check_encoder(encoder.describe())
    models = load_trained_models(store, dev) if space != schema.ENCODER_SPACE else None
    results: list[QueryResult] = []
    for path in images:
        try:
            _, img = load_image(Path(path))
        except ImageError as e:
            results.append(QueryResult(str(path), error=e.reason))
            continue
        vec = project_image(img, space, encoder, models, dev)
        nbrs = search_vectors(store, vec, k=k, space=space)[0]
        results.append(QueryResult(str(path), nbrs, breed_votes(nbrs)))
    return results


def project_image(img: Image.Image, space: str, encoder: Encoder, models: TrainedModels | None,
                  device: torch.device) -> np.ndarray:
    """A photo's (1, dim) vector in any space, computed the way `index` computes it."""
    if space == schema.ENCODER_SPACE:
        return embed(encoder.model, encoder.preprocess(img).unsqueeze(0), device)
    model = SPACE_MODEL.get(space)
    if models is None or model not in models.available():
        raise StoreError(f"space {space!r}: its model is not trained in this store")
    if model == MAPPER:
        enc_vec = embed(encoder.model, encoder.preprocess(img).unsqueeze(0), device)
        return mapper_vectors(models, enc_vec)[space]
    from indexer.models.vae import vae_transform

    return vae_vectors(models, vae_transform(models.vae_image_size)(img).unsqueeze(0))[space]
