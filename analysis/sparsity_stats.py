"""Activation sparsity against image labels: depth curves, per-image context, group tests and correlations.

Every function reads the store's long sparsity table (``id, model, layer_index, layer_name, metric, value``, see
``indexer.store.schema.SPARSITY_SCHEMA``) for one model and one metric, and returns a tidy table.  The source is
either a :class:`~indexer.store.Store` (labels come from ``store.images``) or the pieces: a sparsity frame with
the same columns plus, where a label is needed, ``labels=`` a frame indexed by image id (or with an ``id`` column).

Conventions shared by every function
------------------------------------
* Images whose label is missing (NaN/None) are left out of anything that uses that label.
* Groups of a categorical label with fewer than 2 images are dropped (a one-image group has no spread, no
  interval and adds nothing but a degree of freedom to a rank test); the dropped group names are logged and
  listed in the result's ``attrs["dropped_groups"]``.
* ``value`` is NaN only where a layer's activations were not finite; such values are left out per layer, so
  ``n`` counts the values actually used.
* Output order is deterministic: groups sorted by name (the pooled ``"all"`` group first), layers by
  ``layer_index``, images by id; the input row order never matters.
* Every test and correction is SciPy's or statsmodels' own: Kruskal-Wallis (``scipy.stats.kruskal``),
  Spearman's rho (``scipy.stats.spearmanr``), Student-t intervals (``scipy.stats.t``), and the
  Benjamini-Hochberg false-discovery-rate correction across layers
  (``statsmodels.stats.multitest.multipletests(method="fdr_bh")``; Benjamini & Hochberg 1995).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

if TYPE_CHECKING:
    from indexer.store import Store

log = logging.getLogger(__name__)

__all__ = [
    "ALL_GROUP",
    "CI_METHOD",
    "EFFECT_SIZE",
    "breed_heatmap",
    "contextual_sparsity",
    "depth_curves",
    "depth_differences",
    "group_tests",
    "layer_names",
    "numeric_correlations",
    "sparsity_matrix",
]

SPARSITY_COLUMNS: tuple[str, ...] = ("id", "model", "layer_index", "layer_name", "metric", "value")

# The pooled group of depth_curves: every image that entered the per-group curves.
ALL_GROUP = "all"

CI_METHOD = "Student t-interval: mean ± t_{(1+c)/2, n-1} · s/√n (scipy.stats.t)"
EFFECT_SIZE = "epsilon² = H / ((n² - 1)/(n + 1)) = H/(n - 1) (Tomczak & Tomczak 2014)"


# ------------------------------------------------------------------------------------------------- inputs


def _sparsity_frame(source: Store | pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        df = source
    elif hasattr(source, "sparsity"):
        df = source.sparsity()
    else:
        raise TypeError(f"expected a Store or a sparsity DataFrame, got {type(source).__name__}")
    missing = [c for c in SPARSITY_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"sparsity frame lacks column(s) {missing} (expected {list(SPARSITY_COLUMNS)})")
    return df


def _labels_frame(source: Store | pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """Labels indexed by image id: ``labels`` when given, else the store's images table."""
    if labels is None:
        if isinstance(source, pd.DataFrame):
            raise ValueError("a sparsity frame needs labels=... (a frame indexed by image id) for a label")
        labels = source.images
    if "id" in labels.columns:
        labels = labels.set_index("id")
    if not labels.index.is_unique:
        raise ValueError("labels: image ids must be unique")
    return labels


def _select(source: Store | pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    """The rows of one model and metric: id, layer_index, layer_name, value (NaN values kept)."""
    df = _sparsity_frame(source)
    if df.empty:
        where = "" if isinstance(source, pd.DataFrame) else f"{getattr(source, 'path', '')}: "
        raise ValueError(f"{where}no sparsity rows (index without --no-sparsity to record them)")
    rows = df[(df["model"] == model) & (df["metric"] == metric)]
    if rows.empty:
        models = sorted(df["model"].astype(str).unique())
        metrics = sorted(df.loc[df["model"] == model, "metric"].astype(str).unique())
        if model not in models:
            raise ValueError(f"no sparsity rows for model {model!r} (models: {', '.join(models)})")
        raise ValueError(f"no sparsity rows for model {model!r}, metric {metric!r} (metrics: {', '.join(metrics)})")
    out = rows[["id", "layer_index", "layer_name", "value"]].copy()
    out["id"] = out["id"].astype(str)
    out["layer_index"] = out["layer_index"].astype(np.int64)
    out["value"] = out["value"].astype(np.float64)
    if out.duplicated(["id", "layer_index"]).any():
        dup = out[out.duplicated(["id", "layer_index"], keep=False)].iloc[0]
        raise ValueError(f"duplicate sparsity rows for model {model!r}, metric {metric!r}: "
                         f"id {dup['id']}, layer {dup['layer_index']}")
    return out.sort_values(["layer_index", "id"], kind="stable").reset_index(drop=True)


def layer_names(source: Store | pd.DataFrame, model: str) -> pd.Series:
    """``layer_index -> layer_name`` of one model's recorded layers, in depth order."""
    df = _sparsity_frame(source)
    rows = df.loc[df["model"] == model, ["layer_index", "layer_name"]].drop_duplicates()
    if rows.empty:
        raise ValueError(f"no sparsity rows for model {model!r}")
    if rows["layer_index"].duplicated().any():
        raise ValueError(f"model {model!r}: a layer_index has several layer names")
    s = rows.set_index(rows["layer_index"].astype(np.int64))["layer_name"].astype(str).sort_index()
    s.index.name = "layer_index"
    s.name = "layer_name"
    return s


def _with_label(
    source: Store | pd.DataFrame, model: str, metric: str, label: str, labels: pd.DataFrame | None,
    *, categorical: bool,
) -> tuple[pd.DataFrame, list[str]]:
    """Rows of one model/metric with a ``label`` column; images without a label dropped, and (categorical)
    groups with fewer than 2 images dropped.  Returns the rows and the names of the dropped groups."""
    rows = _select(source, model, metric)
    lab = _labels_frame(source, labels)
    if label not in lab.columns:
        raise ValueError(f"no label column {label!r} (columns: {', '.join(map(str, lab.columns))})")
    col = lab[label]
    if categorical:
        col = col[col.notna()].astype(str)
    else:
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            converted = pd.to_numeric(col, errors="coerce")
            if converted.notna().sum() < col.notna().sum():
                raise ValueError(f"label {label!r} is not numeric (use a categorical test for it)")
            col = converted
        col = col[col.notna()].astype(np.float64)
    rows = rows[rows["id"].isin(col.index)].copy()
    rows["label"] = col.reindex(rows["id"]).to_numpy()
    dropped: list[str] = []
    if categorical:
        sizes = rows.drop_duplicates("id")["label"].value_counts()
        dropped = sorted(str(g) for g in sizes[sizes < 2].index)
        if dropped:
            log.info("%s: dropped %d group(s) with fewer than 2 images: %s", label, len(dropped), ", ".join(dropped))
            rows = rows[~rows["label"].isin(dropped)]
    if rows.empty:
        raise ValueError(f"no image has both {model!r}/{metric!r} sparsity and a usable {label!r} label")
    return rows.reset_index(drop=True), dropped


def _bh(p_values: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg adjusted p-values and rejections; NaN p-values (untestable layers) stay NaN/False and
    do not count as tests."""
    p_adj = np.full(len(p_values), np.nan)
    reject = np.zeros(len(p_values), dtype=bool)
    ok = np.isfinite(p_values)
    if ok.any():
        rej, adj, _, _ = multipletests(p_values[ok], alpha=alpha, method="fdr_bh")
        p_adj[ok] = adj
        reject[ok] = rej
    return p_adj, reject


def _layer_of(rows: pd.DataFrame) -> dict[str, Any]:
    """The layer_index and layer_name of rows of one layer."""
    return {"layer_index": int(rows["layer_index"].iloc[0]), "layer_name": str(rows["layer_name"].iloc[0])}


def _check_level(name: str, x: float) -> float:
    if not 0.0 < x < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {x}")
    return float(x)


# ------------------------------------------------------------------------------------------------- tables


def sparsity_matrix(source: Store | pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    """Images x layers: index ``id`` (sorted), columns ``layer_index`` (depth order), values the metric.

    The layers' names are :func:`layer_names` (also in ``attrs["layer_names"]`` as a plain dict).
    """
    rows = _select(source, model, metric)
    wide = rows.pivot(index="id", columns="layer_index", values="value").sort_index().sort_index(axis=1)
    wide.columns.name = "layer_index"
    wide.attrs.update(model=model, metric=metric,
                      layer_names=dict(zip(rows["layer_index"].tolist(), rows["layer_name"].tolist(), strict=True)))
    return wide


def depth_curves(
    source: Store | pd.DataFrame, model: str, metric: str, label: str | None, *, confidence: float = 0.95,
    labels: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Mean sparsity per group of a categorical label and layer, with a Student-t confidence interval.

    Columns: ``group, layer_index, layer_name, n, mean, sd, ci_low, ci_high``.  The interval is
    ``mean ± t_{(1+confidence)/2, n-1} · sd/√n`` with ``t`` from ``scipy.stats.t`` and ``sd`` the sample standard
    deviation (ddof=1): exact for normal values, and by the central limit theorem close to nominal for the
    bounded sparsity metrics at the group sizes we see (tens of images); NaN where ``n < 2``.  The group
    ``"all"`` pools every image that entered a group (``label=None``: every image, and only that group).
    """
    confidence = _check_level("confidence", confidence)
    if label is None:
        rows, dropped = _select(source, model, metric), list[str]()
        rows["label"] = ALL_GROUP
        groups = [rows]
    else:
        rows, dropped = _with_label(source, model, metric, label, labels, categorical=True)
        if ALL_GROUP in set(rows["label"]):
            raise ValueError(f"label {label!r} has a group named {ALL_GROUP!r}, the name of the pooled group")
        groups = [rows.assign(label=ALL_GROUP), rows]
    data = pd.concat(groups, ignore_index=True).dropna(subset=["value"])
    agg = (data.groupby(["label", "layer_index"], sort=True)
           .agg(layer_name=("layer_name", "first"), n=("value", "size"), mean=("value", "mean"),
                sd=("value", "std"))
           .reset_index())
    n = agg["n"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sem = agg["sd"].to_numpy() / np.sqrt(n)
        tcrit = stats.t.ppf((1.0 + confidence) / 2.0, df=np.where(n >= 2, n - 1, np.nan))
    half = tcrit * sem
    agg["ci_low"] = agg["mean"] - half
    agg["ci_high"] = agg["mean"] + half
    agg = agg.rename(columns={"label": "group"})
    agg["n"] = agg["n"].astype(np.int64)
    out = _order_groups(agg)[["group", "layer_index", "layer_name", "n", "mean", "sd", "ci_low", "ci_high"]]
    out.attrs.update(model=model, metric=metric, label=label, confidence=confidence, ci_method=CI_METHOD,
                     dropped_groups=dropped)
    return out


def _order_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by group (``"all"`` first, then by name) and layer."""
    keyed = df.assign(_pooled_last=df["group"] != ALL_GROUP, _name=df["group"].astype(str))
    keyed = keyed.sort_values(["_pooled_last", "_name", "layer_index"], kind="stable")
    return keyed.drop(columns=["_pooled_last", "_name"]).reset_index(drop=True)


def depth_differences(curves: pd.DataFrame) -> pd.DataFrame:
    """First and second differences of each group's mean curve over depth (rate of change and its change).

    Columns ``group, layer_index, rate, acceleration``: ``rate`` at a layer is ``mean[l] - mean[l-1]`` (the
    previous recorded layer, backward difference), ``acceleration`` is ``rate[l] - rate[l-1]``; they are NaN at
    the first one and two layers of each group.  Steps are per recorded layer, not per unit of ``layer_index``.
    """
    need = {"group", "layer_index", "mean"}
    if not need <= set(curves.columns):
        raise ValueError(f"curves need columns {sorted(need)}")
    df = _order_groups(curves[["group", "layer_index", "mean"]].copy())
    rate = df.groupby("group", sort=False)["mean"].diff()
    acc = rate.groupby(df["group"], sort=False).diff()
    out = pd.DataFrame({"group": df["group"], "layer_index": df["layer_index"], "rate": rate, "acceleration": acc})
    out.attrs.update({k: v for k, v in curves.attrs.items() if k in ("model", "metric", "label")})
    return out


def contextual_sparsity(source: Store | pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    """Each image relative to the population at the same layer.

    Columns ``id, layer_index, layer_name, value, z, percentile``.  ``z`` is the standard score
    ``(value - mean) / sd`` over the layer's images (``scipy.stats.zscore``, ddof=1; 0 where every image has the
    same value).  ``percentile`` is the percentile rank in the layer's population, ``(#below + #equal/2) / n *
    100`` (= ``scipy.stats.percentileofscore(..., kind="mean")``, from ``scipy.stats.rankdata`` average ranks), in
    (0, 100): 50 is the median image.  NaN values get NaN and are not part of the population.
    """
    rows = _select(source, model, metric)
    z = np.full(len(rows), np.nan)
    pct = np.full(len(rows), np.nan)
    for _, idx in rows.groupby("layer_index", sort=True).indices.items():
        v = rows["value"].to_numpy()[idx]
        ok = np.isfinite(v)
        vals = v[ok]
        if len(vals) == 0:
            continue
        # A constant layer: every image sits at the population mean (zscore would divide the mean's rounding
        # noise by an sd of ~1e-17 and return large arbitrary numbers).
        zz = np.zeros(len(vals)) if np.ptp(vals) == 0 else stats.zscore(vals, ddof=1)
        z[idx[ok]] = zz
        pct[idx[ok]] = (stats.rankdata(vals, method="average") - 0.5) / len(vals) * 100.0
    out = rows.assign(z=z, percentile=pct)[["id", "layer_index", "layer_name", "value", "z", "percentile"]]
    out.attrs.update(model=model, metric=metric)
    return out


def group_tests(
    source: Store | pd.DataFrame, model: str, metric: str, label: str, *, alpha: float = 0.05,
    labels: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per layer: does the metric differ between the groups of a categorical label?

    Kruskal-Wallis H test (``scipy.stats.kruskal``; Kruskal & Wallis 1952), rank-based, since sparsity metrics
    are bounded and skewed; Benjamini-Hochberg correction across the model's layers
    (``multipletests(method="fdr_bh")``; Benjamini & Hochberg 1995), so ``significant`` controls the false
    discovery rate among layers at ``alpha``.  Effect size: epsilon squared,
    ``epsilon² = H / ((n² - 1)/(n + 1)) = H / (n - 1)`` (Tomczak & Tomczak 2014, "The need to report effect size
    estimates revisited", Trends in Sport Sciences 1(21)), in [0, 1]: the share of rank variance explained by
    the groups (H uses the tie correction).

    Columns: ``layer_index, layer_name, n, k_groups, statistic, p_value, p_adjusted, significant,
    effect_size``.  A layer with fewer than 2 groups of 2+ values, or all values equal, is untestable: NaN
    statistic and p-values, not significant, and not counted in the correction.
    """
    alpha = _check_level("alpha", alpha)
    rows, dropped = _with_label(source, model, metric, label, labels, categorical=True)
    rows = rows.dropna(subset=["value"])
    records: list[dict[str, Any]] = []
    for _, g in rows.groupby("layer_index", sort=True):
        samples = [v.to_numpy() for _, v in g.groupby("label", sort=True)["value"] if len(v) >= 2]
        n = int(sum(len(s) for s in samples))
        h = p = np.nan
        if len(samples) >= 2 and np.ptp(np.concatenate(samples)) > 0:
            res = stats.kruskal(*samples)
            h, p = float(res.statistic), float(res.pvalue)
        records.append({**_layer_of(g), "n": n, "k_groups": len(samples), "statistic": h, "p_value": p})
    out = pd.DataFrame.from_records(records)
    p_adj, reject = _bh(out["p_value"].to_numpy(dtype=np.float64), alpha)
    out["p_adjusted"] = p_adj
    out["significant"] = reject
    n_arr = out["n"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["effect_size"] = out["statistic"].to_numpy() / ((n_arr**2 - 1.0) / (n_arr + 1.0))
    out.attrs.update(model=model, metric=metric, label=label, alpha=alpha, test="Kruskal-Wallis H",
                     correction="Benjamini-Hochberg (fdr_bh) across layers", effect_size=EFFECT_SIZE,
                     dropped_groups=dropped)
    return out


def numeric_correlations(
    source: Store | pd.DataFrame, model: str, metric: str, label: str, *, alpha: float = 0.05,
    labels: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per layer: Spearman's rank correlation between the metric and a numeric label (e.g. a ``rating``).

    ``scipy.stats.spearmanr`` (Spearman 1904): monotone, not only linear, and robust to the metrics' bounded
    scales; two-sided p-values, Benjamini-Hochberg-corrected across layers (``multipletests(method="fdr_bh")``).
    Columns: ``layer_index, layer_name, n, rho, p_value, p_adjusted, significant``.  Layers with fewer than 3
    images, or a constant metric or label, get NaN and are not counted in the correction.
    """
    alpha = _check_level("alpha", alpha)
    rows, _ = _with_label(source, model, metric, label, labels, categorical=False)
    rows = rows.dropna(subset=["value"])
    records: list[dict[str, Any]] = []
    for _, g in rows.groupby("layer_index", sort=True):
        x, y = g["value"].to_numpy(), g["label"].to_numpy(dtype=np.float64)
        rho = p = np.nan
        if len(g) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            res = stats.spearmanr(x, y)
            rho, p = float(res.statistic), float(res.pvalue)
        records.append({**_layer_of(g), "n": len(g), "rho": rho, "p_value": p})
    out = pd.DataFrame.from_records(records)
    p_adj, reject = _bh(out["p_value"].to_numpy(dtype=np.float64), alpha)
    out["p_adjusted"] = p_adj
    out["significant"] = reject
    out.attrs.update(model=model, metric=metric, label=label, alpha=alpha, test="Spearman rho",
                     correction="Benjamini-Hochberg (fdr_bh) across layers")
    return out


def breed_heatmap(
    source: Store | pd.DataFrame, model: str, metric: str, label: str = "breed", *,
    labels: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Layers x groups matrix of mean sparsity (index ``layer_index`` in depth order, columns the groups sorted by
    name), for a heat map.  Same exclusions as :func:`depth_curves`; ``attrs["layer_names"]`` names the rows."""
    rows, dropped = _with_label(source, model, metric, label, labels, categorical=True)
    means = rows.dropna(subset=["value"]).groupby(["layer_index", "label"], sort=True)["value"].mean()
    matrix = means.unstack("label").sort_index().sort_index(axis=1)
    matrix.columns.name = label
    matrix.index.name = "layer_index"
    names = rows.drop_duplicates("layer_index")
    matrix.attrs.update(model=model, metric=metric, label=label, dropped_groups=dropped,
                        layer_names=dict(zip(names["layer_index"].tolist(), names["layer_name"].tolist(), strict=True)))
    return matrix


def recorded_metrics(source: Store | pd.DataFrame) -> dict[str, list[str]]:
    """model -> the metrics recorded for it, sorted (empty when the store was indexed with ``--no-sparsity``)."""
    df = _sparsity_frame(source)
    if df.empty:
        return {}
    pairs = df[["model", "metric"]].drop_duplicates()
    return {str(m): sorted(g["metric"].astype(str)) for m, g in pairs.groupby("model", sort=True)}
