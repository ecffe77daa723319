"""Neighbours: the nearest indexed images of a query and the breed votes they cast (`mammals query`).

* ``query_ids(store, ids, space=..., exclude_self=True)``: an indexed image, from its stored vector;
* ``query_images(store, paths, space=...)``: new photo files, projected by the store's own models;
* ``query_texts(store, prompts)``: text prompts, for stores built with an open_clip encoder;
* ``search_vectors(store, vectors, k=..., space=...)``: any vectors already in a space.

Each query returns :class:`QueryResult` objects (neighbours ranked by cosine similarity plus ``breed_votes``).
:func:`vote` is the one kNN vote every measure here and in :mod:`analysis.evaluate` uses.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
from PIL import Image

from indexer import defaults
from indexer.encoders import Encoder, has_text_tower, load_encoder, resolve_device
from indexer.extract import embed
from indexer.images import ImageError, load_image
from indexer.latents import MAPPER, SPACE_MODEL, TrainedModels, load_trained_models, mapper_vectors, vae_vectors
from indexer.store import Store, StoreError, schema, unit_rows

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


QueryKind = Literal["image", "id", "text", "vector"]


@dataclass
class QueryResult:
    query: str  # the photo path, the indexed id or the prompt, as given
    neighbours: list[Neighbour] = field(default_factory=list)
    breed_votes: list[BreedVote] = field(default_factory=list)
    error: str | None = None
    kind: QueryKind = "image"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


L = TypeVar("L", bound=Hashable)


@dataclass(frozen=True)
class Vote(Generic[L]):
    label: L
    votes: int  # neighbours with this label
    score: float  # sum of their (non-negative) similarities, or ``votes`` when unweighted
    share: float  # score / total score of all labelled neighbours
    nearest: int  # 0-based rank of its nearest neighbour


def vote(labels: Sequence[L | None], similarities: Sequence[float], *, weighted: bool = True) -> list[Vote[L]]:
    """The one neighbour vote of this package: labels ranked by similarity-weighted votes of ranked neighbours.

    ``labels[i]`` and ``similarities[i]`` belong to the i-th nearest neighbour.  Unlabelled neighbours (None)
    abstain.  Negative similarities count as zero: an image pointing away from the query is no evidence for its
    label.  Ranked by score, then by number of votes, then by the rank of the nearest neighbour holding the label
    (ties go to the nearer one, so the result is deterministic).  Every kNN measure here uses this function:
    query breed votes, leave-one-out and held-out kNN accuracy, and the species of a VAE reconstruction.
    """
    scores: dict[L, float] = {}
    counts: dict[L, int] = {}
    nearest: dict[L, int] = {}
    for rank, (lab, sim) in enumerate(zip(labels, similarities, strict=True)):
        if lab is None:
            continue
        scores[lab] = scores.get(lab, 0.0) + (max(float(sim), 0.0) if weighted else 1.0)
        counts[lab] = counts.get(lab, 0) + 1
        nearest.setdefault(lab, rank)
    total = sum(scores.values())
    ranked = sorted(scores, key=lambda lab: (-scores[lab], -counts[lab], nearest[lab]))
    return [Vote(lab, counts[lab], scores[lab], scores[lab] / total if total > 0 else 0.0, nearest[lab])
            for lab in ranked]


def top_label(labels: Sequence[L | None], similarities: Sequence[float], *, weighted: bool = True) -> L | None:
    """The winner of :func:`vote`, or None when no neighbour is labelled."""
    ranked = vote(labels, similarities, weighted=weighted)
    return ranked[0].label if ranked else None


def breed_votes(neighbours: Sequence[Neighbour]) -> list[BreedVote]:
    """Breeds ranked by :func:`vote` among the neighbours (a breed is its (species, breed) pair)."""
    labels = [(n.species, n.breed) if n.breed else None for n in neighbours]
    return [BreedVote(v.label[0], v.label[1], v.votes, v.score, v.share)
            for v in vote(labels, [n.similarity for n in neighbours])]


def search_vectors(
    store: Store, vectors: np.ndarray, *, k: int, space: str = schema.ENCODER_SPACE,
    exclude_ids: Sequence[str] | None = None,
) -> list[list[Neighbour]]:
    """The k nearest indexed images of each row of ``vectors`` in ``space``.

    ``exclude_ids`` (one per row) drops that image from its row's neighbours: by id, not by rank, because an exact
    duplicate may tie with or outrank the image itself.
    """
    if exclude_ids is not None and len(exclude_ids) != len(vectors):
        raise ValueError(f"exclude_ids has {len(exclude_ids)} ids for {len(vectors)} vectors")
    index = store.vector_index(space)
    kk = min(k + (1 if exclude_ids is not None else 0), index.ntotal)
    if kk == 0:
        return [[] for _ in range(len(vectors))]
    sims, fids = index.search(unit_rows(vectors), kk)
    lookup = store.image_lookup()
    rows = lookup.positions(fids).reshape(fids.shape)
    out: list[list[Neighbour]] = []
    for q, (row_sims, row_pos) in enumerate(zip(sims, rows, strict=True)):
        found = []
        for s, p in zip(row_sims.tolist(), row_pos.tolist(), strict=True):
            if p < 0:  # padding (fewer rows than k), or an index row the images table lacks
                continue
            image_id = str(lookup.id[p])
            if exclude_ids is not None and image_id == exclude_ids[q]:
                continue
            found.append(Neighbour(0, image_id, str(lookup.path[p]), lookup.species[p], lookup.breed[p], s))
        for r, n in enumerate(found[:k], start=1):
            n.rank = r
        out.append(found[:k])
    return out


def encoder_for_store(store: Store, device: str = "cpu", given: Encoder | None = None) -> Encoder:
    """The store's own encoder: ``given`` (already loaded by the caller) or loaded now; either way refused when its
    name or weights differ from those that built the store."""
    enc = given if given is not None else load_encoder(store.encoder["name"], device=device)
    store.check_encoder(enc.describe())
    return enc


def query_images(store: Store, images: Sequence[Path], *, k: int = defaults.K, space: str = schema.ENCODER_SPACE,
                 encoder: Encoder | None = None, device: str = "auto") -> list[QueryResult]:
    """Project each query photo into ``space`` with the store's own models; return neighbours and breed votes."""
    check_space(store, space)
    dev = resolve_device(device)
    encoder = encoder_for_store(store, str(dev), encoder)
    models = load_trained_models(store, dev) if space != schema.ENCODER_SPACE else None
    results: list[QueryResult] = []
    for path in images:
        try:
            _, img = load_image(Path(path))
        except ImageError as e:
            results.append(QueryResult(str(path), error=e.reason))
            continue
        results.append(query_image(store, str(path), img, k=k, space=space, encoder=encoder, models=models,
                                   device=dev))
    return results


def query_image(store: Store, name: str, img: Image.Image, *, k: int, space: str, encoder: Encoder,
                models: TrainedModels | None, device: torch.device) -> QueryResult:
    """One decoded photo's neighbours and breed votes, with models the caller holds (``mammals serve`` loads them
    once); ``name`` is what the result calls the query."""
    check_space(store, space)
    vec = project_image(img, space, encoder, models, device)
    nbrs = search_vectors(store, vec, k=k, space=space)[0]
    return QueryResult(name, nbrs, breed_votes(nbrs))


def check_space(store: Store, space: str) -> None:
    """A StoreError naming the spaces there are, when ``space`` is not one of the store's."""
    if space not in store.space_names():
        raise StoreError(f"{store.path}: no space {space!r} (spaces: {', '.join(store.space_names())}; "
                         "train a model and run `mammals index` to add its spaces)")


MIN_ID_PREFIX = 6


def resolve_id(sorted_ids: list[str], prefix: str) -> tuple[str, str]:
    """``(full id, "")`` for a full id or a unique prefix of at least ``MIN_ID_PREFIX`` characters; else
    ``("", why)``."""
    i = bisect.bisect_left(sorted_ids, prefix)
    matches: list[str] = []
    while i < len(sorted_ids) and sorted_ids[i].startswith(prefix) and len(matches) < 2:
        matches.append(sorted_ids[i])
        i += 1
    if matches and matches[0] == prefix:
        return prefix, ""
    if len(prefix) < MIN_ID_PREFIX:
        return "", f"id {prefix!r} is too short (give at least {MIN_ID_PREFIX} characters)"
    if not matches:
        return "", f"no indexed image with id {prefix!r}"
    if len(matches) > 1:
        return "", f"id prefix {prefix!r} is ambiguous"
    return matches[0], ""


def query_ids(
    store: Store, ids: Sequence[str], *, k: int = defaults.K, space: str = schema.ENCODER_SPACE,
    exclude_self: bool = False,
) -> list[QueryResult]:
    """Neighbours and breed votes of indexed images, from their stored vectors (no model is loaded).

    An id may be abbreviated to a unique prefix (like a git hash).  Without ``exclude_self`` the image itself ranks
    first (similarity 1); with it the k others are returned, which is what a "nearest breeds" vote about an indexed
    photo should count.  An unknown or ambiguous id is an error in its result, not an exception.
    """
    check_space(store, space)
    sorted_ids = store.sorted_space_ids(space)
    results: list[QueryResult] = []
    found: list[tuple[int, str]] = []  # (position in ids, full id) of the ids that resolved
    for pos, given in enumerate(ids):
        image_id, problem = resolve_id(sorted_ids, given.strip().lower())
        results.append(QueryResult(given, error=None if image_id else f"{problem} in space {space!r}", kind="id"))
        if image_id:
            found.append((pos, image_id))
    if found:  # one search for all of them
        hits = [image_id for _, image_id in found]
        # From the index files, not store.space(): a million-row space is 5 GB in memory, one row is 5 kB.
        vectors = store.vector_index(space).vectors_of([schema.faiss_id_of(i) for i in hits])
        for (pos, _), nbrs in zip(found, search_vectors(store, vectors, k=k, space=space,
                                                        exclude_ids=hits if exclude_self else None), strict=True):
            results[pos] = QueryResult(ids[pos], nbrs, breed_votes(nbrs), kind="id")
    return results


def query_texts(store: Store, prompts: Sequence[str], *, k: int = defaults.K, space: str = schema.ENCODER_SPACE,
                encoder: Encoder | None = None, device: str = "auto") -> list[QueryResult]:
    """Nearest images of text prompts, for stores built with an open_clip encoder (its text tower).

    Only the encoder space shares the text tower's embedding space: the mapper and the VAE were trained on image
    embeddings and photos, so a prompt has no meaning in their spaces and is refused rather than projected.
    """
    if space != schema.ENCODER_SPACE:
        raise StoreError(f"text prompts search the {schema.ENCODER_SPACE!r} space only, not {space!r} "
                         "(the mapper and VAE spaces are made from images)")
    if not has_text_tower(store.encoder["name"]):
        raise StoreError(f"{store.path}: encoder {store.encoder['name']!r} has no text tower; text prompts need a "
                         "store built with an open_clip encoder")
    encoder = encoder_for_store(store, device, encoder)  # load_encoder resolves "auto" itself
    if encoder.encode_text is None:  # the name said open_clip, so this is a bug, not a user error
        raise RuntimeError(f"{encoder.name}: open_clip encoder loaded without its text tower")
    texts = [p.strip() for p in prompts]
    results: list[QueryResult] = [QueryResult(p, error="empty prompt", kind="text") for p in prompts]
    wanted = [i for i, t in enumerate(texts) if t]
    if wanted:
        vecs = encoder.encode_text([texts[i] for i in wanted]).numpy()
        for i, nbrs in zip(wanted, search_vectors(store, vecs, k=k, space=space), strict=True):
            results[i] = QueryResult(prompts[i], nbrs, breed_votes(nbrs), kind="text")
    return results


def project_image(img: Image.Image, space: str, encoder: Encoder, models: TrainedModels | None,
                  device: torch.device) -> np.ndarray:
    """A photo's (1, dim) vector in any space, computed the way `index` computes it."""
    if space == schema.ENCODER_SPACE:
        return embed(encoder.model, encoder.preprocess(img).unsqueeze(0), device, **encoder.run_options)
    model = SPACE_MODEL.get(space)
    if models is None or model not in models.available():
        raise StoreError(f"space {space!r}: its model is not trained in this store")
    if model == MAPPER:
        enc_vec = embed(encoder.model, encoder.preprocess(img).unsqueeze(0), device, **encoder.run_options)
        return mapper_vectors(models, enc_vec)[space]
    from indexer.models.vae import vae_transform

    return vae_vectors(models, vae_transform(models.vae_image_size)(img).unsqueeze(0))[space]


def query_photo_bytes(
    store: Store, data: bytes, name: str, *, k: int = defaults.K, space: str = schema.ENCODER_SPACE,
    encoder: Encoder | None = None, device: str = "auto",
) -> QueryResult:
    """Like :func:`query_images` for one uploaded photo held in memory (``name`` is only for messages): decoded by
    the indexer's safe decoder; bytes that are not a usable image give a result with ``error`` set."""
    from indexer.images import decode_image

    check_space(store, space)
    try:
        img = decode_image(data, name)
    except ImageError as e:
        return QueryResult(name, error=e.reason)
    dev = resolve_device(device)
    encoder = encoder_for_store(store, str(dev), encoder)
    models = load_trained_models(store, dev) if space != schema.ENCODER_SPACE else None
    nbrs = search_vectors(store, project_image(img, space, encoder, models, dev), k=k, space=space)[0]
    return QueryResult(name, nbrs, breed_votes(nbrs))


def accepts_text(store: Store) -> bool:
    """Whether the store's encoder has a text tower (open_clip), i.e. whether :func:`query_texts` can answer."""
    return has_text_tower(store.encoder["name"])
