"""HDBSCAN clusters of a store's feature space, on its UMAP map or on a PCA reduction, cached in the store.

``compute_clusters`` returns one row per image: the hard HDBSCAN label (-1 = noise), its membership strength, a
``soft_cluster`` (with ``soft=True``, noise points go to the cluster of highest soft membership, from
``hdbscan.all_points_membership_vectors``, so that no point ends as noise; for many clusters on many points,
where that function is quadratic in the number of clusters, to the cluster of the nearest exemplar - see
``soft_assign``) and GLOSH outlier scores.
``label_agreement`` and ``cluster_summary`` compare clusters with the store's labels.

Granularity.  The defaults (a 15-neighbour map, ``min_cluster_size=15``) find breed-sized groups.  The coarsest
structure (species) needs a map that keeps global structure and clusters of a size to match:
``coarse_cluster_params`` (``n_neighbors=100``, ``min_cluster_size = n/10``).  Why: on the shared pets photos the
15-neighbour map places the hairless sphynx cats beside the short-haired dogs (their nearest non-sphynx
neighbours in the encoder space are abyssinian cats but also chihuahuas and bulldogs); the coarsest split of that
map is then "cats but sphynx / dogs and sphynx" (NMI with species 0.73 for any min_cluster_size 50-200 and any
seed we tried), while 100-neighbour maps give NMI 0.88-0.91 across seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.cache import CacheInfo, cache_key, cached, input_fingerprint
from analysis.maps import MAP_KIND, MapParams, MapResult, compute_map, map_cache_params, map_columns, pca_reduce
from indexer.store import Store, schema, unit_rows

log = logging.getLogger(__name__)

CLUSTER_KIND = "clusters"
ON_CHOICES = ("map", "pca")


@dataclass(frozen=True)
class ClusterParams:
    """What a clustering is (all part of the cache key).

    ``on="map"`` clusters the UMAP coordinates of ``map`` (whose ``space`` is forced to ``space``);
    ``on="pca"`` clusters the unit rows of the space reduced to ``pca_components`` dimensions.
    ``min_cluster_size``/``min_samples``/``cluster_selection_method`` are HDBSCAN's (``min_samples=None`` means
    ``min_cluster_size``).  ``soft``: noise points get the cluster of their highest soft membership.
    """

    space: str = schema.ENCODER_SPACE
    on: str = "map"
    pca_components: int = 50
    min_cluster_size: int = 15
    min_samples: int | None = None
    soft: bool = True
    cluster_selection_method: str = "eom"
    map: MapParams = dataclasses.field(default_factory=MapParams)

    def __post_init__(self) -> None:
        if self.on not in ON_CHOICES:
            raise ValueError(f"on must be one of {ON_CHOICES}, not {self.on!r}")
        if self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be >= 2, not {self.min_cluster_size}")
        if self.min_samples is not None and self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1 or None, not {self.min_samples}")
        if self.cluster_selection_method not in ("eom", "leaf"):
            raise ValueError(f"cluster_selection_method must be 'eom' or 'leaf', not {self.cluster_selection_method!r}")
        if self.pca_components < 2:
            raise ValueError(f"pca_components must be >= 2, not {self.pca_components}")
        if self.map.space != self.space:
            # One space per clustering: the map is of the space being clustered.
            object.__setattr__(self, "map", dataclasses.replace(self.map, space=self.space))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.on != "map":
            d.pop("map")  # irrelevant to a PCA clustering: changing it must not change the key
        else:
            d.pop("pca_components")
        return d


@dataclass(frozen=True)
class ClusterResult:
    """``frame``: id, cluster (-1 = noise), probability, soft_cluster, outlier_score (space order)."""

    frame: pd.DataFrame
    info: CacheInfo
    params: ClusterParams
    map: MapResult | None  # the map clustered (on="map"), else None


def coarse_cluster_params(n_points: int, space: str = schema.ENCODER_SPACE) -> ClusterParams:
    """Parameters for the coarsest groups (species rather than breeds): a global map, clusters >= n/10 points.

    See the module docstring for the measurement behind the choice.  ``n_neighbors`` stays at 100 for large
    stores (the layout cost grows with it); ``min_cluster_size`` grows with the store.
    """
    return ClusterParams(space=space, min_cluster_size=max(15, n_points // 10),
                         map=MapParams(space=space, n_neighbors=100))


def hdbscan_labels(points: np.ndarray, params: ClusterParams) -> pd.DataFrame:
    """HDBSCAN of ``points`` (rows in order): cluster, probability, soft_cluster, outlier_score (no ids).

    The pure function behind ``compute_clusters`` (used by benchmarks on synthetic data).
    """
    import hdbscan

    x = np.ascontiguousarray(points, dtype=np.float64)
    n = len(x)
    if n <= params.min_cluster_size:
        # Too few points for any cluster: everything is noise (HDBSCAN would raise or say the same).
        return pd.DataFrame({"cluster": np.full(n, -1, np.int64), "probability": np.zeros(n),
                             "soft_cluster": np.full(n, -1, np.int64), "outlier_score": np.zeros(n)})
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=params.min_cluster_size,
        min_samples=params.min_samples,
        cluster_selection_method=params.cluster_selection_method,
        # Prediction data (exemplars, tree lookups) only matters for the soft assignment of noise points; it is
        # generated there, when there is noise to assign.
        prediction_data=False,
        core_dist_n_jobs=-1,
    )
    with warnings.catch_warnings():
        # hdbscan calls sklearn APIs with arguments newer sklearn deprecates; nothing we can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        clusterer.fit(x)
    labels = clusterer.labels_.astype(np.int64)
    soft = labels.copy()
    soft_method = None
    if params.soft and labels.max() >= 0 and (labels < 0).any():
        noise = labels < 0
        soft[noise], soft_method = soft_assign(clusterer, noise)
    outlier = np.nan_to_num(np.asarray(clusterer.outlier_scores_, dtype=np.float64), nan=0.0)
    frame = pd.DataFrame({
        "cluster": labels,
        "probability": np.asarray(clusterer.probabilities_, dtype=np.float64),
        "soft_cluster": soft,
        "outlier_score": outlier,
    })
    frame.attrs = {"soft_method": soft_method}
    return frame


# hdbscan.all_points_membership_vectors walks the cluster tree once per (point, cluster) pair with a linear search
# per step: its cost grows like n x clusters^2 (measured: 20k points x 800 clusters took 17 minutes on the loaded
# 2-core machine).  Up to this
# budget we use it; beyond, the nearest exemplar (see ``soft_assign``).
SOFT_EXACT_BUDGET = 2e7


def soft_assign(clusterer: Any, noise: np.ndarray) -> tuple[np.ndarray, str]:
    """The likeliest cluster of each noise point, and which method gave it.

    ``hdbscan.all_points_membership_vectors`` (argmax of the soft membership) whenever n x clusters^2 is within
    ``SOFT_EXACT_BUDGET``.  Beyond that (a large store cut into many small clusters) the cluster of the nearest
    exemplar (``clusterer.exemplars_``: the cores that the distance-based half of HDBSCAN's soft membership is
    measured to), at the cost of one KD-tree query per noise point.  On the pets map (1,140 points, 19 clusters,
    157 noise points) the two methods agree on every noise point.
    """
    n_clusters = int(clusterer.labels_.max()) + 1
    clusterer.generate_prediction_data()
    if len(noise) * n_clusters**2 <= SOFT_EXACT_BUDGET:
        membership = soft_membership(clusterer)
        return membership[noise].argmax(axis=1), "all_points_membership_vectors"
    from sklearn.neighbors import KDTree

    exemplars = clusterer.exemplars_
    points = np.concatenate(exemplars)
    owner = np.concatenate([np.full(len(e), j, np.int64) for j, e in enumerate(exemplars)])
    nearest = KDTree(points).query(clusterer.prediction_data_.raw_data[noise], k=1, return_distance=False)
    return owner[nearest[:, 0]], "nearest_exemplar"


def soft_membership(clusterer: Any) -> np.ndarray:
    """``hdbscan.all_points_membership_vectors`` as an (n, n_clusters) array, columns in label order."""
    import hdbscan

    m = np.asarray(hdbscan.all_points_membership_vectors(clusterer))
    return m.reshape(len(m), -1)


def _cluster_input(store: Store, params: ClusterParams, *, progress: bool) -> tuple[np.ndarray, list[str],
                                                                                     MapResult | None]:
    if params.on == "map":
        m = compute_map(store, params.map, progress=progress)
        return m.frame[map_columns(params.map.n_components)].to_numpy(np.float64), m.frame["id"].tolist(), m
    sp = store.space(params.space)
    x = unit_rows(sp.vectors)
    if sp.dim > params.pca_components and len(x) > params.pca_components:
        x = pca_reduce(x, params.pca_components)
    return x, list(sp.ids), None


def cluster_fingerprint(store: Store, params: ClusterParams) -> str:
    """The input of a clustering: the space's fingerprint, and for a map clustering the map's own cache key
    (which already covers the space and every map parameter) - a changed map is a changed input."""
    fp = input_fingerprint(store, params.space)
    if params.on == "map":
        map_params, _ = map_cache_params(store, params.map)
        return f"{MAP_KIND}:{cache_key(MAP_KIND, map_params, fp)}"
    return fp


def compute_clusters(store: Store, params: ClusterParams = ClusterParams(), *,
                     progress: bool = False) -> ClusterResult:
    """HDBSCAN clusters of ``params.space`` (on its map or a PCA reduction), from cache or computed now."""
    fingerprint = cluster_fingerprint(store, params)
    used_map: list[MapResult] = []

    def compute() -> pd.DataFrame:
        x, ids, m = _cluster_input(store, params, progress=progress)
        if m is not None:
            used_map.append(m)
        t0 = time.perf_counter()
        frame = hdbscan_labels(x, params)
        seconds = time.perf_counter() - t0
        if progress:
            n_clusters = int(frame["cluster"].max()) + 1
            print(f"clusters: HDBSCAN on {params.on} ({x.shape[1]} dims): {n_clusters} clusters, "
                  f"{(frame['cluster'] < 0).mean():.1%} noise, {seconds:.1f} s", file=sys.stderr, flush=True)
        frame.insert(0, "id", pd.Series(ids, dtype=object))
        frame.attrs = {**frame.attrs, "hdbscan_seconds": round(seconds, 3), "input_dims": int(x.shape[1])}
        return frame

    frame, info = cached(store, CLUSTER_KIND, {"clusters": params.as_dict()}, fingerprint, compute)
    the_map = used_map[0] if used_map else (compute_map(store, params.map) if params.on == "map" else None)
    return ClusterResult(frame=frame, info=info, params=params, map=the_map)


# ------------------------------------------------------------------------------------------- comparisons
def default_label_columns(store: Store) -> list[str]:
    """species, breed and every non-numeric label column joined from a CSV that has >= 2 distinct values."""
    images = store.images
    candidates = ["species", "breed"] + [c for c in images.columns if c not in schema.IMAGE_COLUMNS]
    out = []
    for col in candidates:
        s = images[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            continue  # a measurement, not a category
        if pd.api.types.is_datetime64_any_dtype(s):
            continue
        if s.dropna().nunique() >= 2:
            out.append(col)
    return out


def _joined(store: Store, clusters: pd.DataFrame, label: str) -> pd.DataFrame:
    if label not in store.images.columns:
        raise ValueError(f"no label column {label!r} (columns: {', '.join(map(str, store.images.columns))})")
    labels = store.images[["id", label]].rename(columns={label: "label"})
    joined = clusters.merge(labels, on="id", how="left", validate="one_to_one")
    if len(joined) != len(clusters):
        raise ValueError("clusters have ids that are not in the store")
    return joined


def label_agreement(store: Store, clusters: pd.DataFrame, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """How well clusters match each label column: NMI and ARI (scikit-learn) on the labelled rows.

    The comparison uses ``soft_cluster`` (noise points assigned to their likeliest cluster; where a clustering
    was made without ``soft``, noise counts as one more group, -1).  ``n_clusters`` and ``noise_fraction`` describe
    the hard HDBSCAN labels of all rows.  One row per label: label, nmi, ari, n_labelled, n_label_values,
    n_clusters, noise_fraction.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    cols = list(labels) if labels is not None else default_label_columns(store)
    hard = clusters["cluster"].to_numpy()
    n_clusters = len(np.unique(hard[hard >= 0]))
    noise_fraction = float((hard < 0).mean()) if len(hard) else 0.0
    rows = []
    for col in cols:
        j = _joined(store, clusters, col)
        j = j[j["label"].notna()]
        y = j["label"].astype(str).to_numpy()
        c = j["soft_cluster"].to_numpy()
        ok = len(j) >= 2
        rows.append({
            "label": col,
            "nmi": float(normalized_mutual_info_score(y, c)) if ok else float("nan"),
            "ari": float(adjusted_rand_score(y, c)) if ok else float("nan"),
            "n_labelled": len(j),
            "n_label_values": len(np.unique(y)),
            "n_clusters": n_clusters,
            "noise_fraction": noise_fraction,
        })
    return pd.DataFrame(rows, columns=["label", "nmi", "ari", "n_labelled", "n_label_values", "n_clusters",
                                       "noise_fraction"])


def cluster_summary(store: Store, clusters: pd.DataFrame, label: str = "breed", *,
                    by: str = "cluster") -> pd.DataFrame:
    """Per cluster (column ``by``: the hard ``cluster`` or ``soft_cluster``): size, n_labelled, purity (share of
    the majority label among labelled members), majority and second label with their shares.

    Clusters come largest first; noise (cluster -1) is one row apart at the end with ``noise=True`` (it is not a
    group, so its purity means little).  Sizes sum to the number of rows.
    """
    j = _joined(store, clusters, label)
    rows = []
    for _, g in j.groupby(by, sort=False):
        cluster_id = int(g[by].iloc[0])  # the group's own value: groupby keys are typed too loosely for mypy
        lab = g["label"].dropna().astype(str)
        counts = lab.value_counts()
        n_lab = int(counts.sum())
        first = (str(counts.index[0]), int(counts.iloc[0])) if len(counts) else (None, 0)
        second = (str(counts.index[1]), int(counts.iloc[1])) if len(counts) > 1 else (None, 0)
        rows.append({
            "cluster": cluster_id,
            "size": len(g),
            "n_labelled": n_lab,
            "purity": first[1] / n_lab if n_lab else float("nan"),
            "majority": first[0],
            "majority_count": first[1],
            "second": second[0],
            "second_count": second[1],
            "noise": cluster_id < 0,
        })
    out = pd.DataFrame(rows, columns=["cluster", "size", "n_labelled", "purity", "majority", "majority_count",
                                      "second", "second_count", "noise"])
    out = out.sort_values(["noise", "size", "cluster"], ascending=[True, False, True], kind="stable")
    return out.reset_index(drop=True)
