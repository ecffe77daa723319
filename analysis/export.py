"""Exports for papers: image tables, CSV/Parquet, LaTeX (booktabs) tables and matplotlib figures.

Every file is written atomically (``indexer.store.atomic.atomic_write``: a temp file beside the target, then a rename),
so a reader never sees half a table and a failed export leaves the previous file as it was.

Figures are built on a bare :class:`matplotlib.figure.Figure`, never through ``pyplot``: no global figure
registry to leak into and no display needed; ``savefig`` picks the Agg canvas for PNG and the SVG backend for
SVG, so export works headless and without a browser (the dashboard's Plotly figures are built elsewhere).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from indexer.store.atomic import atomic_write, atomic_write_bytes

if TYPE_CHECKING:
    from indexer.store import Store

__all__ = [
    "FIGURE_FORMATS",
    "depth_curve_figure",
    "heatmap_figure",
    "image_table",
    "latex_escape",
    "save_figure",
    "save_latex",
    "to_csv",
    "to_latex",
    "to_parquet",
    "widen_vectors",
]

FIGURE_FORMATS: tuple[str, ...] = ("png", "svg")

# Columns holding p-values (formatted in scientific notation when small): p, q, p_value, p_adjusted, pvalue, ...
_P_COLUMN = re.compile(r"^(p|q)(_.*)?$|p_?val|p_?adj", re.IGNORECASE)
# Below this a p-value is shown as m × 10^e: fixed decimals would print 0.000.
_P_SCIENTIFIC_BELOW = 1e-3


# ------------------------------------------------------------------------------------------------- images


def image_table(
    store: Store, spaces: Sequence[str] = (), *, map_frame: pd.DataFrame | None = None,
    clusters: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per image of the store (``images.parquet`` columns, store order) plus, joined by ``id``:

    * one column per space in ``spaces``, named after the space, each cell the image's vector as a 1-D float32
      array (a row view of the space's matrix, so no copy; a list column in Parquet, a JSON array in CSV);
    * the columns of ``map_frame`` (e.g. ``x, y`` from ``analysis.maps``) and of ``clusters`` (e.g.
      ``cluster, probability``), left-joined: images they do not cover get NaN.

    A joined column that would shadow an existing one is an error, not a silent rename.
    """
    out = store.images.copy().reset_index(drop=True)
    ids = out["id"].astype(str)
    for name in spaces:
        if name in out.columns:
            raise ValueError(f"space {name!r} would overwrite the image column {name!r}")
        sp = store.space(name)
        pos = pd.Series(np.arange(len(sp.ids)), index=pd.Index(sp.ids))
        rows = pos.reindex(ids).to_numpy()
        if np.isnan(rows.astype(np.float64)).any():
            raise ValueError(f"space {name!r} lacks vectors for some images (run `mammals index` on the store)")
        mat = sp.vectors[rows.astype(np.int64)]
        out[name] = pd.Series(list(mat), index=out.index, dtype=object)
    for what, extra in (("map_frame", map_frame), ("clusters", clusters)):
        if extra is None:
            continue
        if "id" not in extra.columns:
            raise ValueError(f"{what} needs an 'id' column")
        if extra["id"].duplicated().any():
            raise ValueError(f"{what}: duplicate ids")
        clash = [c for c in extra.columns if c != "id" and c in out.columns]
        if clash:
            raise ValueError(f"{what} column(s) {clash} would overwrite existing columns")
        out = out.merge(extra.assign(id=extra["id"].astype(str)), on="id", how="left", validate="one_to_one")
    return out


# ------------------------------------------------------------------------------------------------- tables


def _is_vector(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray))


def _vector_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if df[c].dtype == object and df[c].map(_is_vector).any()]


def widen_vectors(df: pd.DataFrame) -> pd.DataFrame:
    """Vector columns spread into one float column per dimension: ``e0 .. eN`` for a single vector column,
    ``<column>_e0 ..`` for several (what spreadsheet tools and R's ``read.csv`` read without parsing)."""
    vec_cols = _vector_columns(df)
    if not vec_cols:
        return df
    parts = [df.drop(columns=vec_cols)]
    for col in vec_cols:
        mat = np.stack([np.asarray(v, dtype=np.float32) for v in df[col]])
        prefix = "e" if len(vec_cols) == 1 else f"{col}_e"
        parts.append(pd.DataFrame(mat, index=df.index, columns=[f"{prefix}{i}" for i in range(mat.shape[1])]))
    return pd.concat(parts, axis=1)


def to_csv(df: pd.DataFrame, path: Path, *, index: bool = False, wide: bool = False) -> None:
    """Write ``df`` as UTF-8 CSV, atomically.  Vector cells (lists, arrays) become JSON arrays (``json.loads``
    reads them back; float32 values are written exactly), or with ``wide`` one column per dimension
    (:func:`widen_vectors`); floats are written with full precision."""
    out = widen_vectors(df) if wide else df.copy()
    for col in _vector_columns(out):
        out[col] = out[col].map(lambda v: json.dumps(np.asarray(v).tolist()) if _is_vector(v) else v)
    atomic_write(Path(path), lambda tmp: out.to_csv(tmp, index=index, encoding="utf-8"))


def to_parquet(df: pd.DataFrame, path: Path, *, index: bool = False) -> None:
    """Write ``df`` as Parquet (pyarrow), atomically.  A vector column whose cells all have one length is an
    Arrow ``fixed_size_list<float32>[dim]`` (what Arrow, Polars, DuckDB and Lance read as an embedding column);
    ragged vector cells stay a plain list column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # attrs (test names, citations) are not data and may hold values Arrow's metadata cannot serialise.
    out = df.copy()
    out.attrs = {}
    vec_cols = _vector_columns(out)
    rest = out.drop(columns=vec_cols)
    # A table of no columns has no rows either: hold the row count in a placeholder column until the vectors come.
    table = (pa.Table.from_pandas(rest, preserve_index=index) if len(rest.columns) or index
             else pa.table({"__rows__": pa.nulls(len(out))}))
    for col in vec_cols:
        cells = out[col].tolist()
        dims = {len(v) for v in cells if _is_vector(v)}
        if len(dims) == 1 and all(_is_vector(v) for v in cells):
            flat = np.concatenate([np.asarray(v, dtype=np.float32) for v in cells]) if cells else np.empty(0)
            arr: pa.Array = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dims.pop())
        else:
            arr = pa.array([None if not _is_vector(v) else np.asarray(v, dtype=np.float32) for v in cells],
                           pa.list_(pa.float32()))
        table = table.append_column(col, arr)
    table = table.select([c for c in out.columns if c in table.column_names] +
                         [c for c in table.column_names if c not in out.columns and c != "__rows__"])
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SPECIALS_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters (``\\ & % $ # _ { } ~ ^``) escaped, in one pass (so the braces
    of ``\\textbackslash{}`` are not escaped again); newlines become spaces."""
    return _LATEX_SPECIALS_RE.sub(lambda m: _LATEX_SPECIALS[m.group(0)], str(text)).replace("\n", " ")


def _format_float(x: float, digits: int, p_value: bool) -> str:
    if math.isnan(x):
        return "--"
    if math.isinf(x):
        return r"$\infty$" if x > 0 else r"$-\infty$"
    if p_value and x != 0 and abs(x) < _P_SCIENTIFIC_BELOW:
        mantissa, exponent = f"{x:.{max(digits - 1, 0)}e}".split("e")
        return f"${mantissa}\\times10^{{{int(exponent)}}}$"
    text = f"{x:.{digits}f}"
    # -0.000 is a rounding artefact, not a sign.
    return text.lstrip("-") if float(text) == 0 else text


def _column_formatter(s: pd.Series, name: str, digits: int) -> tuple[Callable[[Any], str], str]:
    """A cell formatter for one column and its tabular alignment (numbers right, text left)."""
    if pd.api.types.is_bool_dtype(s):
        return (lambda v: "--" if pd.isna(v) else ("yes" if v else "no")), "l"
    if pd.api.types.is_integer_dtype(s):
        return (lambda v: "--" if pd.isna(v) else str(int(v))), "r"
    if pd.api.types.is_float_dtype(s):
        finite = s[np.isfinite(s.to_numpy(dtype=np.float64))]
        p_value = bool(_P_COLUMN.search(name))
        # A float column of whole numbers (counts that became float because of a NaN) prints as integers.
        if len(finite) and not p_value and bool((finite == np.round(finite)).all()) and finite.abs().max() < 1e15:
            return (lambda v: "--" if pd.isna(v) else (str(int(v)) if math.isfinite(v) else
                                                         _format_float(float(v), digits, False))), "r"
        return (lambda v: _format_float(float(v), digits, p_value)), "r"

    def cell(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, numbers.Integral):
            return str(int(v))
        if isinstance(v, numbers.Real):
            return _format_float(float(v), digits, False)
        if not _is_vector(v) and pd.isna(v):
            return "--"
        return latex_escape(str(v))

    return cell, "l"


def to_latex(
    df: pd.DataFrame, *, caption: str, label: str, digits: int = 3, columns: Sequence[str] | None = None,
    index: bool = False, escape_caption: bool = True, position: str = "htbp",
) -> str:
    """``df`` as a booktabs LaTeX table (``\\usepackage{booktabs}``), through pandas' ``Styler.to_latex`` with our
    own cell formatters, so that escaping and rounding are ours alone.

    * Text cells, column names and (unless ``escape_caption=False``, for a caption with math) the caption have
      ``\\ & % $ # _ { } ~ ^`` escaped; ``label`` is used as given and must not contain ``{ } \\ % #``.
    * Floats have ``digits`` decimals (fixed point); p-value columns (``p``, ``q``, ``p_value``, ``p_adjusted``,
      ... by name) below 1e-3 are written ``$m\\times10^{e}$`` with ``digits`` significant figures; integers (and
      float columns holding only whole numbers) as integers; booleans as yes/no; NaN/None as ``--``.
    * ``columns`` picks and orders columns; ``index=True`` puts the index (or each level) first.
    """
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    if re.search(r"[{}\\%#]", label):
        raise ValueError(f"label {label!r}: LaTeX labels cannot hold {{ }} \\ % #")
    data = df if columns is None else df.loc[:, list(columns)]
    if index:
        data = data.reset_index()
    names = [str(c) for c in data.columns]
    formatters = [_column_formatter(data.iloc[:, j], names[j], digits) for j in range(data.shape[1])]
    # Positions as column labels: formatters apply per column even when two columns share a name.
    data = data.set_axis(range(len(names)), axis=1)

    def header(j: Any) -> str:  # the column's position -> its escaped name
        return latex_escape(names[j])

    styler = (data.style.hide(axis="index")
              .format({j: fmt for j, (fmt, _) in enumerate(formatters)})
              .format_index(header, axis=1))
    return styler.to_latex(
        hrules=True, position=position, position_float="centering", label=label,
        caption=latex_escape(caption) if escape_caption else caption,
        column_format="".join(a for _, a in formatters),
    )


def save_latex(df: pd.DataFrame, path: Path, **kw: Any) -> None:
    """:func:`to_latex` of ``df`` written to ``path`` (UTF-8, atomic); keywords as for :func:`to_latex`."""
    atomic_write_bytes(Path(path), to_latex(df, **kw).encode("utf-8"))


# ------------------------------------------------------------------------------------------------- figures


def save_figure(fig: Figure, path: Path, *, dpi: int = 200) -> None:
    """Write a matplotlib figure as PNG or SVG, chosen by the suffix of ``path``, atomically.

    Metadata that changes between runs (SVG date, software stamps) is left out so identical figures give
    identical files.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{path}: figures are written as .png or .svg, not {path.suffix or 'no suffix'!r}")
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {"Software": None}

    def write(tmp: Path) -> None:
        # The temp file's suffix is .tmp: the format is named explicitly.  SVG clip-path ids hash a salt (random
        # by default: fixed here) and the clip box, which constrained layout still moves by rounding noise between
        # the first and second draw; one layout pass first makes every save of a figure byte-identical.
        with matplotlib.rc_context({"svg.hashsalt": "mammals-space"}):
            fig.draw_without_rendering()
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)

    atomic_write(path, write)


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def depth_curve_figure(curves: pd.DataFrame, *, title: str = "", ylabel: str | None = None) -> Figure:
    """Mean sparsity per group over depth (``layer_index``), each with its confidence band (``fill_between``).

    ``curves`` is :func:`analysis.sparsity_stats.depth_curves` output (``group, layer_index, mean, ci_low,
    ci_high``).  The pooled ``"all"`` group is drawn in black, dashed; the y label defaults to the metric named in
    ``curves.attrs``.
    """
    need = {"group", "layer_index", "mean", "ci_low", "ci_high"}
    if not need <= set(curves.columns):
        raise ValueError(f"curves need columns {sorted(need)}")
    groups = list(dict.fromkeys(curves["group"].astype(str)))
    fig = _new_figure(7.0 if len(groups) <= 12 else 10.0, 4.5)
    ax = fig.add_subplot()
    for g in groups:
        c = curves[curves["group"].astype(str) == g].sort_values("layer_index")
        x = c["layer_index"].to_numpy(dtype=np.float64)
        pooled = g == "all"
        (line,) = ax.plot(x, c["mean"].to_numpy(dtype=np.float64), label=g, linewidth=2.0 if pooled else 1.2,
                          color="black" if pooled else None, linestyle="--" if pooled else "-", marker=".",
                          zorder=3 if pooled else 2)  # the pooled curve stays visible over dozens of breeds
        ax.fill_between(x, c["ci_low"].to_numpy(dtype=np.float64), c["ci_high"].to_numpy(dtype=np.float64),
                        color=line.get_color(), alpha=0.15, linewidth=0)
    attrs = curves.attrs
    ax.set_xlabel("layer index (depth)")
    ax.set_ylabel(ylabel or f"mean {attrs.get('metric', 'sparsity')}")
    conf = attrs.get("confidence")
    ax.set_title(title or (f"{attrs.get('model', '')} {attrs.get('metric', '')}"
                           + (f", {conf:.0%} CI" if isinstance(conf, float) else "")).strip())
    ax.grid(True, alpha=0.3)
    if len(groups) <= 12:
        ax.legend(fontsize="small", title=attrs.get("label"))
    else:
        # Dozens of breeds: the legend goes beside the axes, not over the curves.
        ax.legend(fontsize="x-small", ncols=2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title=attrs.get("label"))
    return fig


def heatmap_figure(matrix: pd.DataFrame, *, title: str = "", colorbar_label: str | None = None,
                   relative: bool = False) -> Figure:
    """A heat map of a layers x groups matrix (:func:`analysis.sparsity_stats.breed_heatmap`): rows are layers
    (depth downwards, labelled by index), columns groups; NaN cells are left blank.

    ``relative=True`` shows each cell minus its layer's mean over groups, on a diverging scale centred on 0:
    sparsity changes far more with depth than between groups, so absolute colours mostly show the layers.
    """
    if matrix.empty:
        raise ValueError("empty matrix")
    n_rows, n_cols = matrix.shape
    fig = _new_figure(max(4.0, 1.5 + 0.22 * n_cols), max(3.0, 1.5 + 0.18 * n_rows))
    ax = fig.add_subplot()
    values = np.ma.masked_invalid(matrix.to_numpy(dtype=np.float64))
    if relative:
        values = values - values.mean(axis=1, keepdims=True)
        span = float(np.abs(values).max()) or 1.0
        im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-span, vmax=span)
    else:
        im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(np.arange(n_cols), [str(c) for c in matrix.columns], rotation=90, fontsize="x-small")
    ax.set_yticks(np.arange(n_rows), [str(i) for i in matrix.index], fontsize="x-small")
    ax.set_xlabel(str(matrix.columns.name or "group"))
    ax.set_ylabel(str(matrix.index.name or "layer"))
    attrs = matrix.attrs
    default_label = f"mean {attrs.get('metric', '')}".strip() + (" minus layer mean" if relative else "")
    fig.colorbar(im, ax=ax, label=colorbar_label or default_label)
    ax.set_title(title or f"{attrs.get('model', '')} {attrs.get('metric', '')}".strip())
    return fig


# ------------------------------------------------------------------------------------------------- mammals export

TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet", "latex")
_SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".tex": "latex", ".png": "png",
                   ".svg": "svg"}
# What `mammals export --what` can write, and in which formats.
EXPORTS: dict[str, tuple[str, ...]] = {
    "images": TABLE_FORMATS,
    "map": TABLE_FORMATS,
    "clusters": TABLE_FORMATS,
    "cluster-summary": TABLE_FORMATS,
    "sparsity-matrix": TABLE_FORMATS,
    "sparsity-curves": TABLE_FORMATS + FIGURE_FORMATS,
    "sparsity-differences": TABLE_FORMATS,
    "sparsity-context": TABLE_FORMATS,
    "sparsity-tests": TABLE_FORMATS,
    "sparsity-correlations": TABLE_FORMATS,
    "sparsity-heatmap": TABLE_FORMATS + FIGURE_FORMATS,
}


def export_format(out: Path, fmt: str | None) -> str:
    """The format to write: ``fmt`` when given, else the one ``out``'s suffix names."""
    if fmt is not None:
        return fmt
    try:
        return _SUFFIX_FORMATS[Path(out).suffix.lower()]
    except KeyError:
        raise ValueError(f"{out}: cannot tell the format from the suffix; pass --format "
                         f"({', '.join(TABLE_FORMATS + FIGURE_FORMATS)})") from None


def _params(cls: type, **given: Any) -> Any:
    """``cls(**given)`` with only the fields ``cls`` has (map/cluster parameter dataclasses own their defaults)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in fields and v is not None})


def export_store(
    store_path: Path, what: str, out: Path, *, fmt: str | None = None, model: str = "encoder",
    metric: str = "hoyer", label: str = "breed", spaces: Sequence[str] = (), confidence: float = 0.95,
    alpha: float = 0.05, digits: int = 3, columns: Sequence[str] | None = None, caption: str | None = None,
    title: str = "", relative: bool = False, wide: bool = False,
) -> Path:
    """Compute ``what`` from the store at ``store_path`` and write it to ``out`` (what `mammals export` runs).

    ``spaces``: the vector columns of ``images``, or (first one) the space a map or clustering is computed in.
    ``relative``: a heat-map figure shows each group minus its layer's mean.
    ``wide``: CSV vector columns as one column per dimension (``e0 .. eN``) instead of JSON arrays.
    Raises ValueError for a request that cannot be met (unknown model/metric/label, a format ``what`` has not).
    """
    from analysis import sparsity_stats as ss
    from indexer.store import Store

    if what not in EXPORTS:
        raise ValueError(f"unknown export {what!r} (one of: {', '.join(EXPORTS)})")
    fmt = export_format(out, fmt)
    if fmt not in EXPORTS[what]:
        raise ValueError(f"--what {what} is written as {', '.join(EXPORTS[what])}, not {fmt}")
    store = Store.open(Path(store_path))
    space = spaces[0] if spaces else None
    df: pd.DataFrame
    if what == "images":
        if spaces and fmt == "latex":
            raise ValueError("vector columns (--space) do not fit a LaTeX table; export them as csv or parquet")
        df = image_table(store, spaces)
    elif what == "map":
        from analysis.maps import MapParams, compute_map  # type: ignore[import-not-found, unused-ignore]

        df = image_table(store, map_frame=compute_map(store, _params(MapParams, space=space)).frame)
    elif what in ("clusters", "cluster-summary"):
        from analysis.clusters import (  # type: ignore[import-not-found, unused-ignore]
            ClusterParams,
            cluster_summary,
            compute_clusters,
        )

        frame = compute_clusters(store, _params(ClusterParams, space=space)).frame
        df = image_table(store, clusters=frame) if what == "clusters" else cluster_summary(store, frame, label)
    elif what == "sparsity-matrix":
        df = ss.sparsity_matrix(store, model, metric).reset_index()
        df.columns = [str(c) for c in df.columns]
    elif what in ("sparsity-curves", "sparsity-differences"):
        df = ss.depth_curves(store, model, metric, label, confidence=confidence)
        if what == "sparsity-differences":
            df = ss.depth_differences(df)
        elif fmt in FIGURE_FORMATS:
            save_figure(depth_curve_figure(df, title=title), out)
            return Path(out)
    elif what == "sparsity-context":
        df = ss.contextual_sparsity(store, model, metric)
    elif what == "sparsity-tests":
        df = ss.group_tests(store, model, metric, label, alpha=alpha)
    elif what == "sparsity-correlations":
        df = ss.numeric_correlations(store, model, metric, label, alpha=alpha)
    else:  # sparsity-heatmap
        matrix = ss.breed_heatmap(store, model, metric, label)
        if fmt in FIGURE_FORMATS:
            save_figure(heatmap_figure(matrix, title=title, relative=relative), out)
            return Path(out)
        df = matrix.reset_index()
        df.columns = [str(c) for c in df.columns]
    if columns:
        unknown = [c for c in columns if c not in df.columns]
        if unknown:
            raise ValueError(f"no column(s) {unknown} in {what} (columns: {', '.join(map(str, df.columns))})")
        df = df.loc[:, list(columns)]
    if fmt == "csv":
        to_csv(df, out, wide=wide)
    elif fmt == "parquet":
        to_parquet(df, out)
    else:
        save_latex(df, out, caption=caption or _default_caption(what, model, metric, label, df.attrs), digits=digits,
                   label=re.sub(r"[^A-Za-z0-9:.\-]+", "-", f"tab:{what}-{model}-{metric}"))
    return Path(out)


def _default_caption(what: str, model: str, metric: str, label: str, attrs: Mapping[Any, Any]) -> str:
    if what == "sparsity-tests":
        return (f"Kruskal-Wallis tests of {metric} sparsity across {label} groups per {model} layer; p-values "
                f"Benjamini-Hochberg-adjusted across layers; effect size epsilon squared (Tomczak & Tomczak 2014).")
    if what == "sparsity-correlations":
        return (f"Spearman correlation of {metric} sparsity with {label} per {model} layer; p-values "
                f"Benjamini-Hochberg-adjusted across layers.")
    if what == "sparsity-curves":
        return (f"Mean {metric} sparsity per {model} layer and {label} group with "
                f"{attrs.get('confidence', 0.95):.0%} Student-t confidence intervals.")
    if what.startswith("sparsity"):
        return f"{what.replace('-', ' ').capitalize()}: {model} {metric} by {label}."
    return what.replace("-", " ").capitalize() + "."
