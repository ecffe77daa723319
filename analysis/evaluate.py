"""Agreement of a space with labels, measured with the one neighbour vote (:func:`analysis.neighbours.vote`).

* :func:`knn_predictions` / :func:`knn_label_accuracy`: leave-one-out kNN labels within one space of a store;
* :func:`knn_accuracy`: held-out kNN accuracy of queries against a separate gallery (the mapper's validation);
* :func:`reconstruction_species_agreement`: how often the pretrained encoder puts a VAE reconstruction in the
  species of its original (the VAE's validation).

All use cosine similarity over L2-normalised rows and exact search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from analysis.neighbours import encoder_for_store, search_vectors, top_label
from indexer.store import Store, schema, unit_rows


def _exact_knn(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery rows) of the k nearest gallery rows of each query; equal similarities keep gallery
    order (faiss' exact search is deterministic)."""
    g = unit_rows(gallery)
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index.search(unit_rows(queries), min(k, len(g)))


def knn_predictions(vectors: np.ndarray, labels: np.ndarray, *, k: int = 10, weighted: bool = True) -> np.ndarray:
    """Leave-one-out kNN label of every row: the :func:`~analysis.neighbours.vote` of its k nearest other rows."""
    sims, nbrs = _exact_knn(vectors, vectors, k + 1)
    preds = np.empty(len(vectors), dtype=object)
    for i in range(len(vectors)):
        # Drop the query itself by position, not by rank: exact duplicates may outrank it.
        keep = nbrs[i] != i
        nb, sm = nbrs[i][keep][:k], sims[i][keep][:k]
        preds[i] = top_label([labels[j] for j in nb], sm, weighted=weighted)
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


def knn_accuracy(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray,
                 query_labels: Sequence[str], k: int = 10) -> float:
    """kNN accuracy of queries against a separate (held-out) gallery: the protocol of :func:`knn_predictions`."""
    if len(queries) == 0:
        return 0.0
    sims, nbrs = _exact_knn(gallery, queries, k)
    hits = sum(top_label([gallery_labels[int(j)] for j in nbrs[i]], sims[i]) == query_labels[i]
               for i in range(len(queries)))
    return hits / len(queries)


@torch.inference_mode()
def reconstruction_species_agreement(store: Store, vae: Any, images: torch.Tensor, ids: list[str],
                                     k: int = 10) -> float | None:
    """How often the pretrained encoder puts a VAE reconstruction in the same species as its original.

    Each reconstruction is embedded with the store's encoder and given the species voted by its k nearest
    indexed photos (the original excluded); compared with the original's label.  None when no original has one.
    """
    from indexer.extract import embed
    from indexer.models.vae import decode_latents, encode_images, to_pil

    species = store.images.set_index("id").loc[ids, "species"]
    keep = [row for row, s in enumerate(species) if isinstance(s, str)]
    if not keep:
        return None
    enc = encoder_for_store(store)
    recon = decode_latents(vae, encode_images(vae, images[keep]))
    batch = torch.stack([enc.preprocess(im) for im in to_pil(recon)])
    vecs = embed(enc.model, batch, torch.device("cpu"))
    hits = 0
    for row, nbrs in zip(keep, search_vectors(store, vecs, k=k, space=schema.ENCODER_SPACE,
                                              exclude_ids=[ids[r] for r in keep]), strict=True):
        hits += top_label([n.species for n in nbrs], [n.similarity for n in nbrs]) == species.iloc[row]
    return hits / len(keep)
