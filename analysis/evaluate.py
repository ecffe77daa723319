"""Agreement of a space with labels, measured with the one neighbour vote (:func:`analysis.neighbours.vote`).

* :func:`knn_predictions` / :func:`knn_label_accuracy`: leave-one-out kNN labels within one space of a store;
* :func:`knn_accuracy`: held-out kNN accuracy of queries against a separate gallery (the mapper's validation);
* :func:`reconstruction_report`: how often the pretrained encoder puts a VAE reconstruction in the species and
  the breed of its original, and how far reconstructions' features lie from real ones (the VAE's validation).

All use cosine similarity over L2-normalised rows and exact search.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from analysis.neighbours import encoder_for_store, top_label
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


def labelled_votes(gallery: np.ndarray, gallery_labels: Sequence[Any] | np.ndarray, gallery_ids: Sequence[str],
                   queries: np.ndarray, exclude_ids: Sequence[str], *, k: int = 10) -> list[str | None]:
    """The :func:`~analysis.neighbours.vote` of each query's k nearest *labelled* gallery rows (exact search),
    leaving out the gallery row whose id is the query's ``exclude_ids`` entry (its own original).

    Unlabelled rows (a label that is not a string) are left out of the gallery rather than allowed to abstain: in
    a store that is mostly unlabelled (the 11k shared photos hold 1k labelled ones) most queries would otherwise
    have no labelled neighbour at all, and a missing vote counts as a miss.  None only when no row is labelled.
    """
    labelled = np.flatnonzero([isinstance(v, str) for v in gallery_labels])
    if len(labelled) == 0 or len(queries) == 0:
        return [None] * len(queries)
    sims, nbrs = _exact_knn(gallery[labelled], queries, k + 1)
    votes: list[str | None] = []
    for q in range(len(queries)):
        keep = [j for j in range(nbrs.shape[1])
                if nbrs[q, j] >= 0 and gallery_ids[labelled[nbrs[q, j]]] != exclude_ids[q]][:k]
        votes.append(top_label([str(gallery_labels[labelled[nbrs[q, j]]]) for j in keep],
                               [float(sims[q, j]) for j in keep]))
    return votes


def frechet_distance(a: np.ndarray, b: np.ndarray, dims: int = 64) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows (FID's formula), in the first
    ``dims`` principal components of ``a``: a few hundred photos cannot estimate a 1280-d covariance."""
    from scipy import linalg

    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    centre = a64.mean(0)
    d = max(1, min(dims, len(a64) - 1, a64.shape[1]))
    _, _, vt = np.linalg.svd(a64 - centre, full_matrices=False)
    pa, pb = (a64 - centre) @ vt[:d].T, (b64 - centre) @ vt[:d].T
    ca, cb = np.atleast_2d(np.cov(pa, rowvar=False)), np.atleast_2d(np.cov(pb, rowvar=False))
    covmean = linalg.sqrtm(ca @ cb)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = pa.mean(0) - pb.mean(0)
    return float(diff @ diff + np.trace(ca + cb - 2 * covmean))


def _majority_rate(labels: Sequence[str]) -> float:
    return max(Counter(labels).values()) / len(labels) if labels else 0.0


@torch.inference_mode()
def reconstruction_report(store: Store, vae: Any, images: torch.Tensor, ids: list[str],
                          k: int = 10) -> dict[str, float]:
    """How the pretrained encoder sees a VAE's reconstructions of photos the store holds (``images``, ``ids``).

    Each reconstruction is embedded with the store's encoder and given the species and the breed voted by its k
    nearest indexed photos *that have that label* (the original excluded; exact search), compared with the
    original's labels:
    ``species_agreement`` / ``breed_agreement``, next to the rate a constant majority answer would get
    (``species_majority_rate`` / ``breed_majority_rate``, the trivial baseline).  ``frechet_distance`` compares
    the originals' stored embeddings with the reconstructions' (:func:`frechet_distance`).  Keys whose labels
    no photo has are left out.
    """
    from indexer.extract import embed
    from indexer.models.vae import decode_latents, encode_images, to_pil

    enc = encoder_for_store(store)
    recon = decode_latents(vae, encode_images(vae, images))
    batch = torch.stack([enc.preprocess(im) for im in to_pil(recon)])
    vecs = embed(enc.model, batch, torch.device("cpu"), **enc.run_options)
    sp = store.space(schema.ENCODER_SPACE)
    by_id = store.images.set_index("id")
    labels = by_id.loc[ids, ["species", "breed"]]
    out: dict[str, float] = {}
    for col in ("species", "breed"):
        rows = [r for r, v in enumerate(labels[col]) if isinstance(v, str)]
        if not rows:
            continue
        votes = labelled_votes(sp.vectors, by_id.loc[sp.ids, col].to_numpy(), sp.ids, vecs[rows],
                               [ids[r] for r in rows], k=k)
        truth = [str(labels[col].iloc[r]) for r in rows]
        out[f"{col}_agreement"] = sum(v == t for v, t in zip(votes, truth, strict=True)) / len(rows)
        out[f"{col}_majority_rate"] = _majority_rate(truth)
    row_of = {i: r for r, i in enumerate(sp.ids)}
    real = sp.vectors[[row_of[i] for i in ids if i in row_of]]
    if len(real) > 2:
        out["frechet_distance"] = frechet_distance(real, vecs)
    return out
