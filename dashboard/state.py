"""Cached loaders: everything the pages compute goes through here, so a widget change recomputes only what it feeds.

Two caches, two lifetimes:

* ``st.cache_resource`` for objects that are shared, not copied: the open :class:`~indexer.store.Store`, the
  store's encoder and the id -> path map.  They are keyed on :class:`StoreKey` (the store path plus the
  store's version number, which every commit raises), so re-indexing or retraining while the app runs opens a
  fresh store instead of serving stale vectors.
* ``st.cache_data`` for results (tables, maps, thumbnails, decoded images): pickled per caller, keyed on the same
  ``StoreKey`` and the parameters that shape the result, never on widget state that does not.

Functions take the ``StoreKey`` (hashable, two strings) rather than a Store, because Streamlit hashes every
argument of a cached function and a Store is not hashable.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
import streamlit as st

from indexer.store import Store, StoreError, schema

if TYPE_CHECKING:
    from analysis.clusters import ClusterParams
    from analysis.latent import PathStep, PathStop, SwapResult
    from analysis.maps import MapParams
    from analysis.neighbours import BreedVote, Encoder, Neighbour, QueryResult

STORE_ENV = "MAMMALS_STORE"
THUMB_SIDE = 160  # px: big enough to recognise a breed, small enough for a gallery of 50 at once


class StoreKey(NamedTuple):
    """What identifies the store's contents for caching: its resolved path and its published version."""

    path: str
    version: str


# ------------------------------------------------------------------------------------------------ the store
def store_path_from(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """The store path: ``--store`` after streamlit's ``--`` (``mammals dashboard`` passes it), else $MAMMALS_STORE.

    ``parse_known_args`` with ``allow_abbrev=False`` because under a test runner argv holds the runner's own
    options, and e.g. pytest's ``--strict`` must not be taken for ``--store``.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--store", type=Path)
    known, _ = parser.parse_known_args(argv)
    if known.store is not None:
        return Path(known.store)
    value = environ.get(STORE_ENV)
    return Path(value) if value else None


def store_version(path: Path) -> str:
    """The store's version number (every commit raises it; a timestamp of 1 s resolution would miss commits),
    with its creation time (a store deleted and made anew at the same path starts counting again).  Read on each
    rerun: one small JSON file."""
    try:
        manifest = json.loads((path / schema.MANIFEST).read_text("utf-8"))
        return f"{manifest['created_at']}#{int(manifest['version'])}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: not a readable Mammals Space store ({e.__class__.__name__}: {e})") from None


# Two entries: an open store holds its spaces in memory (100k x 1280 floats is 0.5 GB), and after a re-index
# only the new version and the one still being served to a session mid-run are worth keeping.
@st.cache_resource(max_entries=2, show_spinner="Opening the store…")
def open_store(path: str, version: str) -> Store:
    """The store, opened once per (path, version) and shared by every session (read-only use)."""
    del version  # part of the cache key only
    return Store.open(Path(path))


def current_key() -> StoreKey:
    """The key of the store this app serves, or an error box and ``st.stop()`` when there is none."""
    path = store_path_from(sys.argv[1:], os.environ)
    if path is None:
        st.error(f"No store given: start the app with `mammals dashboard STORE`, or set ${STORE_ENV}.")
        st.stop()
    try:
        resolved = path.expanduser().resolve()
        return StoreKey(str(resolved), store_version(resolved))
    except StoreError as e:
        st.error(str(e))
        st.stop()
    raise AssertionError("unreachable")  # st.stop() raises; this keeps type checkers honest


def store_for(key: StoreKey) -> Store:
    """The open store for a key (errors become an error box, not a traceback)."""
    try:
        return open_store(key.path, key.version)
    except StoreError as e:
        st.error(str(e))
        st.stop()
    raise AssertionError("unreachable")


def trained_models(store: Store) -> set[str]:
    """Names of the models the manifest lists as trained (``mapper``, ``vae``)."""
    return set(store.manifest.get("models", {}))


def label_columns(store: Store) -> list[str]:
    from analysis.labels import label_columns

    return label_columns(store)


def is_categorical(series: pd.Series) -> bool:
    from analysis.labels import is_categorical

    return is_categorical(series)


@st.cache_resource(max_entries=4, show_spinner=False)
def _id_paths(path: str, version: str) -> dict[str, str]:
    """id -> file path of every indexed image: the only files the app ever reads for display."""
    images = open_store(path, version).images
    return dict(zip(images["id"].astype(str), images["path"].astype(str), strict=True))


@st.cache_resource(max_entries=4, show_spinner=False)
def relpath_index(path: str, version: str) -> tuple[list[str], dict[str, str]]:
    """Sorted relpaths (for pickers) and relpath -> id."""
    images = open_store(path, version).images
    by_rel = dict(zip(images["relpath"].astype(str), images["id"].astype(str), strict=True))
    return sorted(by_rel), by_rel


# ------------------------------------------------------------------------------------------------ thumbnails
def _placeholder(side: int, text: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (225, 225, 225))
    ImageDraw.Draw(img).text((8, side // 2 - 6), text, fill=(90, 90, 90))
    return _jpeg(img)


def _jpeg(img: Any, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@st.cache_data(max_entries=20_000, show_spinner=False)
def thumbnail(key: StoreKey, image_id: str, side: int = THUMB_SIDE, square: bool = False) -> bytes:
    """A JPEG thumbnail of one *indexed* image, looked up by id; ``square``: its centre square (galleries line
    up in even rows), else the whole photo.

    Security: the file is found through the store's own id -> path table and read with the indexer's safe
    loader; nothing a user types or uploads ever becomes a path here.  An id the store does not hold, or a
    file that has since moved or broken, gives a grey placeholder instead of an error.
    """
    from analysis import photos

    file = _id_paths(key.path, key.version).get(image_id)
    if file is None:
        return _placeholder(side, "not in store")
    img = photos.square_thumbnail(file, side) if square else photos.thumbnail(file, side)
    return _placeholder(side, img[:24]) if isinstance(img, str) else _jpeg(img)


@st.cache_data(max_entries=16, show_spinner=False)
def upload_preview(data: bytes, name: str, side: int = 2 * THUMB_SIDE) -> bytes:
    """A JPEG preview of an uploaded photo, decoded by the indexer's safe decoder (a placeholder if it cannot)."""
    from analysis import photos

    img = photos.preview(data, name, side)
    return _placeholder(side, img[:24]) if isinstance(img, str) else _jpeg(img)


def image_bytes(images: list[Any]) -> list[bytes]:
    """PIL images as PNG bytes: what ``st.cache_data`` stores cheaply and ``st.image`` shows."""
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ maps, clusters
def map_params(space: str, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "cosine",
               n_components: int = 2) -> MapParams:
    from analysis.maps import MapParams

    return MapParams(space=space, n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist,
                     metric=metric)


@st.cache_data(max_entries=32, show_spinner=False)
def map_frame(key: StoreKey, space: str, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "cosine",
              n_components: int = 2) -> pd.DataFrame:
    """The UMAP coordinates (id, x, y[, z]) of a space; analysis.maps also caches them on disk in the store."""
    from analysis.maps import compute_map

    params = map_params(space, n_neighbors, min_dist, metric, n_components)
    return compute_map(store_for(key), params).frame


def cluster_params(space: str, on: str = "map", min_cluster_size: int = 15) -> ClusterParams:
    from analysis.clusters import ClusterParams

    return ClusterParams(space=space, on=on, min_cluster_size=min_cluster_size, soft=True,
                         map=map_params(space))


@st.cache_data(max_entries=32, show_spinner=False)
def clusters_frame(key: StoreKey, space: str, on: str = "map", min_cluster_size: int = 15) -> pd.DataFrame:
    """HDBSCAN clusters (id, cluster, probability, soft_cluster, outlier_score); cluster -1 is noise."""
    from analysis.clusters import compute_clusters

    return compute_clusters(store_for(key), cluster_params(space, on, min_cluster_size)).frame


@st.cache_data(max_entries=32, show_spinner=False)
def cluster_tables(key: StoreKey, space: str, on: str = "map", min_cluster_size: int = 15,
                   label: str = "breed") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-cluster summary: size, purity, majority, …; agreement with every label: NMI, ARI, …)."""
    from analysis.clusters import cluster_summary, label_agreement

    store = store_for(key)
    frame = clusters_frame(key, space, on, min_cluster_size)
    return cluster_summary(store, frame, label=label), label_agreement(store, frame)


# ------------------------------------------------------------------------------------------------ sparsity
@st.cache_data(max_entries=8, show_spinner=False)
def sparsity_choices(key: StoreKey) -> dict[str, list[str]]:
    """model -> metrics recorded for it (empty when the store was indexed with --no-sparsity)."""
    from analysis import sparsity_stats

    return sparsity_stats.recorded_metrics(store_for(key))


def default_metric(metrics: list[str]) -> int:
    """Index of the metric to show first: Hoyer's (scale-free, no threshold) when recorded, as `mammals export`."""
    return metrics.index("hoyer") if "hoyer" in metrics else 0


@st.cache_data(max_entries=64, show_spinner=False)
def depth_curves(key: StoreKey, model: str, metric: str, label: str) -> pd.DataFrame:
    from analysis import sparsity_stats

    return sparsity_stats.depth_curves(store_for(key), model, metric, label)


@st.cache_data(max_entries=64, show_spinner=False)
def group_tests(key: StoreKey, model: str, metric: str, label: str, alpha: float = 0.05) -> pd.DataFrame:
    from analysis import sparsity_stats

    return sparsity_stats.group_tests(store_for(key), model, metric, label, alpha=alpha)


@st.cache_data(max_entries=64, show_spinner=False)
def numeric_correlations(key: StoreKey, model: str, metric: str, label: str, alpha: float = 0.05) -> pd.DataFrame:
    from analysis import sparsity_stats

    return sparsity_stats.numeric_correlations(store_for(key), model, metric, label, alpha=alpha)


@st.cache_data(max_entries=64, show_spinner=False)
def breed_heatmap(key: StoreKey, model: str, metric: str, label: str = "breed") -> pd.DataFrame:
    from analysis import sparsity_stats

    return sparsity_stats.breed_heatmap(store_for(key), model, metric, label)


# ------------------------------------------------------------------------------------------------ queries
@st.cache_resource(max_entries=2, show_spinner="Loading the store's encoder…")
def encoder(path: str, version: str) -> Encoder:
    """The store's own encoder (refusing other weights), loaded once per store version."""
    from analysis.neighbours import encoder_for_store

    return encoder_for_store(open_store(path, version), "auto")


@st.cache_data(max_entries=256, show_spinner=False)
def neighbours_of_indexed(key: StoreKey, image_id: str, space: str, k: int, exclude_self: bool = False
                          ) -> list[Neighbour]:
    """The k nearest images of an indexed image in a space, from its stored vector (``query_ids``): without
    ``exclude_self`` it ranks first itself."""
    from analysis.neighbours import query_ids

    result = query_ids(store_for(key), [image_id], k=k, space=space, exclude_self=exclude_self)[0]
    if result.error:  # the picker only offers indexed ids, so this is a store changed under the page
        raise StoreError(result.error)
    return result.neighbours


@st.cache_data(max_entries=64, show_spinner=False)
def neighbours_of_upload(key: StoreKey, data: bytes, name: str, space: str, k: int) -> QueryResult:
    """An uploaded photo's neighbours in ``space`` (``analysis.neighbours.query_photo_bytes``): bytes that are not
    a usable image give a result with ``error``; a space whose model is missing raises ``StoreError``."""
    from analysis.neighbours import query_photo_bytes

    return query_photo_bytes(store_for(key), data, name, k=k, space=space, encoder=encoder(key.path, key.version))


@st.cache_data(max_entries=64, show_spinner=False)
def neighbours_of_text(key: StoreKey, prompt: str, k: int) -> list[Neighbour]:
    """The k nearest images of a text prompt in the encoder space (open_clip stores; ``StoreError`` otherwise)."""
    from analysis.neighbours import query_texts

    store = store_for(key)
    result = query_texts(store, [prompt], k=k, encoder=encoder(key.path, key.version))[0]
    return result.neighbours


def accepts_text(key: StoreKey) -> bool:
    from analysis.neighbours import accepts_text

    return accepts_text(store_for(key))


def votes(neighbours: list[Neighbour]) -> list[BreedVote]:
    from analysis.neighbours import breed_votes

    return breed_votes(neighbours)


# ------------------------------------------------------------------------------------------------ latent
@st.cache_data(max_entries=64, show_spinner=False)
def vae_strip(key: StoreKey, id_a: str, id_b: str, steps: int, mode: str) -> list[bytes]:
    """PNG bytes of the decoded VAE interpolation from a to b."""
    from analysis.latent import vae_interpolate

    return image_bytes(vae_interpolate(store_for(key), id_a, id_b, steps=steps, mode=mode))


@st.cache_data(max_entries=64, show_spinner=False)
def vae_originals(key: StoreKey, id_a: str, id_b: str) -> list[bytes]:
    """PNG bytes of photos a and b as the VAE sees them (its image size, centre crop), for its reconstructions'
    sake."""
    from analysis.latent import vae_originals as originals

    return image_bytes(originals(store_for(key), [id_a, id_b]))


@st.cache_data(max_entries=64, show_spinner=False)
def mapper_path(key: StoreKey, id_a: str, id_b: str, steps: int, k: int) -> list[list[Neighbour]]:
    from analysis.latent import mapper_path as path

    return path(store_for(key), id_a, id_b, steps=steps, k=k)


@st.cache_data(max_entries=64, show_spinner=False)
def mapper_path_steps(key: StoreKey, id_a: str, id_b: str, steps: int, k: int) -> list[PathStep]:
    """The mapper's path, per step: breed classifier probabilities, nearest photos, their breed vote."""
    from analysis.latent import mapper_path_steps as path_steps

    return path_steps(store_for(key), id_a, id_b, steps=steps, k=k)


def distinct_nearest(path: list[PathStep]) -> list[PathStop]:
    """Each step's nearest photo once, with the steps it is nearest to."""
    from analysis.latent import distinct_nearest as distinct

    return distinct([step.neighbours for step in path])


@st.cache_data(max_entries=64, show_spinner=False)
def mapper_swap(key: StoreKey, id_a: str, id_b: str, k: int) -> SwapResult:
    """Identity of a, attributes of b: the classifier's reading (and top breeds), nearest photos, breed vote."""
    from analysis.latent import mapper_swap as swap

    return swap(store_for(key), id_a, id_b, k=k)


@st.cache_data(max_entries=16, show_spinner=False)
def model_warnings(key: StoreKey, model: str) -> list[str]:
    """What the model's validation report (in the manifest) says is weak, in words; [] when nothing is."""
    from analysis.latent import model_warnings as warnings

    return warnings(store_for(key), model)


@st.cache_data(max_entries=8, show_spinner=False)
def quality(key: StoreKey, label: str, checks: tuple[str, ...]
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """``analysis.quality.quality_report`` of the store version: (duplicates, label issues, outliers, summary)."""
    from analysis.quality import QualityParams, quality_report

    report = quality_report(store_for(key), QualityParams(label=label), checks=checks)
    return report.duplicates, report.label_issues, report.outliers, report.summary
