"""2-D / 3-D UMAP maps of any feature space of a store, cached in the store (see ``analysis.cache``).

How a map is made (every choice is resolved before the cache key is computed, so the sidecar says what was done):

1. Rows are scaled to unit length when the metric is cosine (cosine is then a function of Euclidean distance).
2. Above ``pca_min_points`` rows, the vectors are first reduced to ``pca_components`` dimensions with PCA
   (scikit-learn).  On unit rows, Euclidean distance in the leading principal components approximates the
   cosine distance of the full vectors, and every later step gets ~25x cheaper for 1280-d inputs.
3. Above UMAP's own small-data limit (4,096 rows), the k nearest neighbours are computed with PyNNDescent on all
   cores and handed to UMAP as ``precomputed_knn``: inside UMAP the same NN-descent would run on a single thread
   whenever a ``random_state`` is set, because UMAP then pins numba to one thread for the whole fit.
4. UMAP lays the graph out.  With a ``random_state`` the layout is bit-reproducible but single-threaded; above
   ``parallel_min_points`` rows the seed is dropped so the layout runs on every core.  Such a map is not
   bit-reproducible between runs, but it is computed once and then served from the cache, so every repaint of a
   store shows the same map.  ``resolved_map_settings`` returns the choices for a given size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.cache import CacheInfo, cached, input_fingerprint
from indexer.store import Store, schema, unit_rows

log = logging.getLogger(__name__)

MAP_KIND = "maps"
# UMAP computes exact pairwise distances below this many rows (umap_.py); above it, we bring our own kNN.
UMAP_SMALL_DATA = 4096


@dataclass(frozen=True)
class MapParams:
    """What a map is: the space, UMAP's parameters and the speed settings (all part of the cache key).

    ``random_state`` seeds UMAP (bit-reproducible, single-threaded layout) up to ``parallel_min_points`` rows;
    above that the seed is dropped for a parallel layout (``None`` everywhere: always parallel).
    ``pca_components``/``pca_min_points``: reduce with PCA first when there are at least that many rows (and more
    dimensions than components); ``pca_min_points=0`` always reduces, a negative value never does.
    ``n_epochs=None`` keeps UMAP's default (500 epochs below 10,000 rows, 200 above).
    """

    space: str = schema.ENCODER_SPACE
    n_components: int = 2
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "cosine"
    random_state: int | None = 42
    init: str = "spectral"
    pca_components: int = 50
    pca_min_points: int = 5000
    parallel_min_points: int = 20000
    n_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.n_components not in (2, 3):
            raise ValueError(f"n_components must be 2 or 3, not {self.n_components}")
        if self.n_neighbors < 2:
            raise ValueError(f"n_neighbors must be >= 2, not {self.n_neighbors}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ValueError(f"min_dist must be in [0, 1], not {self.min_dist}")
        if self.pca_components < 2:
            raise ValueError(f"pca_components must be >= 2, not {self.pca_components}")
        if self.n_epochs is not None and self.n_epochs < 1:
            raise ValueError(f"n_epochs must be >= 1 or None, not {self.n_epochs}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MapResult:
    """A map: ``frame`` has columns id, x, y (and z for 3-D), one row per image in the space's order."""

    frame: pd.DataFrame
    info: CacheInfo
    params: MapParams
    settings: dict[str, Any]  # the resolved choices (PCA, kNN, seed) that produced it


def resolved_map_settings(n: int, dim: int, params: MapParams) -> dict[str, Any]:
    """The concrete choices ``umap_embedding`` makes for ``n`` rows of ``dim`` dimensions (part of the cache key)."""
    use_pca = params.pca_min_points >= 0 and n >= params.pca_min_points and dim > params.pca_components
    cosine = params.metric == "cosine"
    # Projections of unit rows: Euclidean there stands in for cosine here.  Any other metric is kept as is.
    umap_metric = "euclidean" if use_pca and cosine else params.metric
    # Below UMAP's small-data limit UMAP computes exact distances itself; above it we run NN-descent in parallel.
    knn = "nndescent-parallel" if n >= UMAP_SMALL_DATA else "umap-exact"
    seed = params.random_state if n < params.parallel_min_points else None
    return {
        "n_points": int(n),
        "input_dim": int(dim),
        "unit_rows": cosine,
        "pca_components": int(min(params.pca_components, dim)) if use_pca else None,
        "pca_solver": f"covariance_eigh, fit on <= {PCA_FIT_ROWS} rows" if use_pca else None,
        "umap_metric": umap_metric,
        "knn": knn,
        "n_neighbors": int(max(2, min(params.n_neighbors, n - 1))),
        "random_state": seed,
        "parallel": seed is None,
        "n_epochs": params.n_epochs,
    }


@contextlib.contextmanager
def _progress_to_stderr(progress: bool) -> Iterator[None]:
    """UMAP's ``verbose`` prints to stdout; the CLI keeps stdout for data, so send it to stderr."""
    if progress:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


# PCA is fitted on at most this many rows (a seeded sample) and applied to all: 25k rows pin 50 components of a
# 1280-d space down as well as 100k do, at a quarter of the cost.
PCA_FIT_ROWS = 25_000


def pca_reduce(x: np.ndarray, n_components: int, *, random_state: int = 0) -> np.ndarray:
    """PCA (scikit-learn) to ``n_components`` dimensions, float32.

    The ``covariance_eigh`` solver (eigen-decomposition of the d x d covariance) is exact and, for many more rows
    than dimensions, the fastest: 0.5 s for 25k x 1280 where the randomized solver took 1.2 s (2-core CPU).
    Fitting on a seeded sample of at most ``PCA_FIT_ROWS`` rows bounds its cost.  On the pets photos, 10-NN breed
    accuracy in the 50-d reduction is 0.84 against 0.83 on the full 1280-d cosine space: nothing lost.
    """
    from sklearn.decomposition import PCA

    k = int(min(n_components, x.shape[1], x.shape[0]))
    pca = PCA(n_components=k, svd_solver="covariance_eigh")
    if len(x) > PCA_FIT_ROWS:
        sample = np.random.default_rng(random_state).choice(len(x), PCA_FIT_ROWS, replace=False)
        pca.fit(x[np.sort(sample)])
    else:
        pca.fit(x)
    return np.ascontiguousarray(pca.transform(x), dtype=np.float32)


def nn_descent_knn(x: np.ndarray, k: int, metric: str, *, random_state: int | None) -> tuple[np.ndarray,
                                                                                            np.ndarray]:
    """k nearest neighbours of every row (itself first) with PyNNDescent on all cores: UMAP's ``precomputed_knn``.

    The same algorithm UMAP runs itself, called directly so that it runs in parallel even when the layout is
    seeded (UMAP pins numba to one thread for the whole fit when given a ``random_state``).  Measured on 100k x 50
    tiled pets embeddings, loaded 2-core machine: 7 s at recall 0.9998 against exact search, where FAISS's exact
    flat search took 40-99 s and its HNSW 10 s at recall 0.991.
    """
    from pynndescent import NNDescent

    n = len(x)
    # UMAP's own settings (umap_.nearest_neighbors), so the graph is the one UMAP would have built.
    index = NNDescent(x, n_neighbors=k, metric=metric, random_state=random_state,
                      n_trees=min(64, 5 + round(n**0.5 / 20.0)), n_iters=max(5, round(np.log2(n))),
                      max_candidates=60, low_memory=True, n_jobs=-1, compressed=True)
    nbrs, dist = index.neighbor_graph
    return np.asarray(nbrs, dtype=np.int32), np.asarray(dist, dtype=np.float32)


def umap_embedding(vectors: np.ndarray, params: MapParams, *, progress: bool = False) -> np.ndarray:
    """The map coordinates of ``vectors`` (n, n_components) float32: the pure function behind ``compute_map``.

    ``embed_with_details`` does the same and also returns the resolved settings and per-stage seconds.
    """
    coords, _ = embed_with_details(vectors, params, progress=progress)
    return coords


def embed_with_details(vectors: np.ndarray, params: MapParams, *,
                       progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """``umap_embedding`` plus the resolved settings and the seconds of each stage (PCA, kNN, layout)."""
    import umap

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    settings = resolved_map_settings(n, dim, params)
    timings: dict[str, float] = {}
    if n < 3:
        # Nothing to lay out: a point (or two) at the origin is the honest map.
        return np.zeros((n, params.n_components), np.float32), {**settings, "seconds": timings}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)
        if progress:
            print(f"map: {name} {timings[name]:.1f} s", file=sys.stderr, flush=True)

    if settings["unit_rows"]:
        x = unit_rows(x)
    if settings["pca_components"] is not None:
        t0 = time.perf_counter()
        x = pca_reduce(x, settings["pca_components"])
        stage(f"PCA {dim} -> {settings['pca_components']} dims", t0)

    k = settings["n_neighbors"]
    precomputed: tuple[np.ndarray, np.ndarray] | None = None
    if settings["knn"] == "nndescent-parallel":
        t0 = time.perf_counter()
        precomputed = nn_descent_knn(x, k, settings["umap_metric"], random_state=settings["random_state"])
        stage(f"{k}-NN ({settings['umap_metric']}, NN-descent)", t0)

    t0 = time.perf_counter()
    reducer = umap.UMAP(
        n_components=params.n_components,
        n_neighbors=k,
        min_dist=params.min_dist,
        metric=settings["umap_metric"],
        random_state=settings["random_state"],
        init=params.init,
        n_epochs=settings["n_epochs"],
        low_memory=True,
        # -1 = all cores; UMAP itself forces 1 when a random_state is given (the bit-reproducible path).
        n_jobs=1 if settings["random_state"] is not None else -1,
        # Only the epochs bar: UMAP's verbose mode prints its own repr (with any precomputed kNN arrays) to stdout.
        verbose=False,
        tqdm_kwds={"file": sys.stderr, "disable": not progress, "mininterval": 1.0},
        precomputed_knn=(precomputed[0], precomputed[1]) if precomputed is not None else (None, None, None),
    )
    with _progress_to_stderr(progress), warnings.catch_warnings():
        # Expected and documented above: no search index with precomputed kNN (no transform needed), and the
        # seed-vs-parallelism notice.
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        warnings.filterwarnings("ignore", message=".*n_neighbors is larger than the dataset size.*")
        coords = reducer.fit_transform(x)
    stage("UMAP layout", t0)
    return np.ascontiguousarray(coords, dtype=np.float32), {**settings, "seconds": timings}


def _space_shape(store: Store, space: str) -> tuple[int, int]:
    """(rows, dim) of a space without reading its vectors (every space holds one row per image)."""
    dim = store.space_meta(space).get("dim")
    if dim is None:
        dim = store.space(space).dim
    return len(store.images), int(dim)


def map_columns(n_components: int) -> list[str]:
    return ["x", "y", "z"][:n_components]


def map_cache_params(store: Store, params: MapParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cache params, resolved settings) of a map of this store; the key of ``compute_map``'s table."""
    n, dim = _space_shape(store, params.space)
    settings = resolved_map_settings(n, dim, params)
    return {"map": params.as_dict(), "settings": settings}, settings


# UMAP's spectral layout and nearest-neighbour graph need a handful of points; fewer is a user error, not a map.
MIN_MAP_POINTS = 10


def require_map_points(store: Store, space: str) -> None:
    """ValueError naming the space when it has too few points to map."""
    n = len(store.space_ids(space)) if space in store.space_names() else None
    if n is not None and n < MIN_MAP_POINTS:
        raise ValueError(f"{store.path}: space {space!r} has {n} point(s); a map needs at least {MIN_MAP_POINTS}")


def compute_map(store: Store, params: MapParams = MapParams(), *, progress: bool = False) -> MapResult:
    """The UMAP map of ``params.space``: from this process's memory, from the store's cache, or computed now.

    Raises ValueError (a user error) when the space has fewer than ``MIN_MAP_POINTS`` points."""
    require_map_points(store, params.space)
    fingerprint = input_fingerprint(store, params.space)
    cache_params, settings = map_cache_params(store, params)

    def compute() -> pd.DataFrame:
        sp = store.space(params.space)
        if progress:
            print(f"map: {params.space}: {len(sp.ids)} points x {sp.dim} dims -> {params.n_components}-D UMAP",
                  file=sys.stderr, flush=True)
        coords, details = embed_with_details(sp.vectors, params, progress=progress)
        frame = pd.DataFrame({"id": pd.Series(sp.ids, dtype=object)})
        for j, col in enumerate(map_columns(params.n_components)):
            frame[col] = coords[:, j]
        frame.attrs = {"seconds_by_stage": details["seconds"]}
        return frame

    frame, info = cached(store, MAP_KIND, cache_params, fingerprint, compute)
    return MapResult(frame=frame, info=info, params=params, settings=settings)
