"""Neighbours: the nearest images and breed votes of a query, and neighbour-based measures of a whole space.

The queries themselves live in :mod:`indexer.query` (the ``mammals query`` command uses them too) and are
re-exported here, so the analysis library has one import for them:

* ``query_ids(store, ids, space=..., exclude_self=True)``: an indexed image, from its stored vector;
* ``query_images(store, paths, space=...)``: new photo files, projected by the store's own models;
* ``query_texts(store, prompts)``: text prompts, for stores built with an open_clip encoder.

Each returns :class:`QueryResult` objects (neighbours ranked by cosine similarity plus ``breed_votes``).
"""

from __future__ import annotations

import faiss
import numpy as np

from indexer.query import BreedVote, Neighbour, QueryResult, breed_votes, query_ids, query_images, query_texts
from indexer.store import Store, schema

__all__ = ["BreedVote", "Neighbour", "QueryResult", "breed_votes", "knn_label_accuracy", "knn_predictions",
           "query_ids", "query_images", "query_texts"]


def knn_predictions(
    vectors: np.ndarray, labels: np.ndarray, *, k: int = 10, weighted: bool = True
) -> np.ndarray:
    """Leave-one-out kNN label of every row: a (similarity-weighted) vote of its k nearest other rows.

    ``vectors`` are L2-normalised so inner product is cosine similarity.  Ties go to the label of the nearest
    neighbour among the tied labels, which keeps the result deterministic.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    kk = min(k + 1, len(x))
    sims, nbrs = index.search(x, kk)
    preds = np.empty(len(x), dtype=object)
    for i in range(len(x)):
        # Drop the query itself by position, not by rank: exact duplicates may outrank it.
        keep = nbrs[i] != i
        nb, sm = nbrs[i][keep][:k], sims[i][keep][:k]
        scores: dict[object, float] = {}
        first_seen: dict[object, int] = {}
        for rank, (j, s) in enumerate(zip(nb, sm, strict=True)):
            lab = labels[j]
            scores[lab] = scores.get(lab, 0.0) + (max(float(s), 0.0) if weighted else 1.0)
            first_seen.setdefault(lab, rank)
        preds[i] = max(scores, key=lambda lab: (scores[lab], -first_seen[lab]))
    return preds


def knn_label_accuracy(store: Store, *, label: str = "breed", space: str = schema.ENCODER_SPACE, k: int = 10) -> float:
    """Leave-one-out kNN accuracy of ``label`` among the images that have it, in one space of the store."""
    sp = store.space(space)
    labels = store.images.set_index("id").loc[sp.ids, label]
    mask = labels.notna().to_numpy()
    if mask.sum() < 2:
        raise ValueError(f"{label!r}: fewer than two labelled images")
    y = labels[mask].astype(str).to_numpy()
    pred = knn_predictions(sp.vectors[mask], y, k=k)
    return float((pred == y).mean())

