"""Export: the tables and figures of the other pages as CSV, Parquet, LaTeX, PNG and SVG downloads.

Tables and figures come from ``analysis.export``, so a download is the same file `mammals export` writes.
Every file is made only when its button is clicked (a deferred ``data`` callable): serialising a 100k-row table
or rendering a matplotlib figure on every rerun of the page would be wasted work, and nothing is held in memory
per session until asked for.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import state, widgets
from dashboard.state import StoreKey


def _via_file(write: Callable[[Any, Path], None], obj: Any, suffix: str) -> bytes:
    """Run one of analysis.export's file writers into a temp dir and return the bytes it wrote."""
    with tempfile.TemporaryDirectory(prefix="mammals-export-") as tmp:
        path = Path(tmp) / f"export{suffix}"
        write(obj, path)
        return path.read_bytes()


def table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """``csv``, ``wide.csv`` (one column per vector dimension) or ``parquet`` bytes exactly as `mammals export`
    writes them (vector cells included)."""
    from analysis.export import to_csv, to_parquet

    if fmt == "wide.csv":
        return _via_file(functools.partial(to_csv, wide=True), df, ".csv")
    return _via_file(to_csv if fmt == "csv" else to_parquet, df, f".{fmt}")


def latex_bytes(df: pd.DataFrame, caption: str, label: str) -> bytes:
    """A booktabs LaTeX table (``analysis.export.to_latex``), UTF-8."""
    from analysis.export import to_latex

    return to_latex(df, caption=caption, label=label).encode("utf-8")


def figure_bytes(key: StoreKey, kind: str, model: str, metric: str, label: str, fmt: str) -> bytes:
    """A depth-curve (``curves``) or heat-map (``heatmap``) figure as PNG/SVG bytes (matplotlib, headless)."""
    from analysis.export import depth_curve_figure, heatmap_figure, save_figure

    if kind == "curves":
        fig = depth_curve_figure(state.depth_curves(key, model, metric, label))
    else:
        fig = heatmap_figure(state.breed_heatmap(key, model, metric, "breed"))
    return _via_file(save_figure, fig, f".{fmt}")


def _table_section(df: pd.DataFrame, stem: str, caption: str, *, key: str, latex: bool = True,
                   preview: list[str] | None = None) -> None:
    """A preview of the table (its first rows; ``preview`` picks the columns) and its download buttons."""
    shown = df[[c for c in preview if c in df.columns]] if preview else df
    st.dataframe(shown.head(200), hide_index=True, height=220)
    cols = st.columns(3)
    mime = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
    for col, fmt in zip(cols[:2], ("csv", "parquet"), strict=True):
        col.download_button(f"{stem}.{fmt}", functools.partial(table_bytes, df, fmt), f"{stem}.{fmt}", mime[fmt],
                            key=f"{key}-{fmt}", icon=":material/download:")
    if latex:
        cols[2].download_button(f"{stem}.tex", functools.partial(latex_bytes, df, caption, f"tab:{stem}"),
                                f"{stem}.tex", "application/x-tex",
                                key=f"{key}-tex", icon=":material/download:")


def _images_section(key: StoreKey) -> None:
    from analysis.export import image_table

    store = state.store_for(key)
    spaces = store.space_names()
    c1, c2 = st.columns(2)
    space = c1.selectbox("Map and clusters of space", spaces,
                         index=spaces.index("encoder") if "encoder" in spaces else 0, key="export-space")
    vectors = c2.multiselect("Add vector columns of", spaces, key="export-vectors",
                             help="one column per space, each cell the image's vector (CSV/Parquet only)")
    with st.spinner("Computing the map and the clusters (cached after the first time)…"):
        table = image_table(store, vectors, map_frame=state.map_frame(key, space),
                            clusters=state.clusters_frame(key, space))
    st.caption(f"{len(table):,} images × {table.shape[1]} columns")
    _table_section(table.drop(columns=vectors) if vectors else table, "images", "Indexed images.",
                   key="export-images", latex=False,
                   preview=["relpath", "species", "breed", "x", "y", "cluster", "probability", "outlier_score"])
    if vectors:
        # The preview leaves the vectors out (unreadable in a grid); the downloads have them.
        st.caption("Parquet holds each vector as a fixed-size list of float32 (an embedding column for Arrow, "
                   "Polars, DuckDB); the wide CSV has one column per dimension (e0, e1, …).")
        cols = st.columns(3)
        for col, fmt in zip(cols, ("parquet", "wide.csv", "csv"), strict=True):
            col.download_button(f"images-with-vectors.{fmt}", functools.partial(table_bytes, table, fmt),
                                f"images-with-vectors.{fmt}",
                                key=f"export-images-vectors-{fmt}", icon=":material/download:")


def _clusters_section(key: StoreKey) -> None:
    space = str(st.session_state.get("export-space", "encoder"))
    summary, agreement = state.cluster_tables(key, space)
    st.markdown(f"**Cluster summary** (`{space}`, HDBSCAN on the UMAP)")
    _table_section(summary, f"cluster-summary-{space}", f"Clusters of the {space} space and their majority breed.",
                   key="export-cluster-summary")
    st.markdown("**Agreement with the labels**")
    _table_section(agreement, f"cluster-agreement-{space}",
                   f"Agreement (NMI, ARI) between the clusters of the {space} space and each label.",
                   key="export-cluster-agreement")


def _sparsity_section(key: StoreKey) -> None:
    store = state.store_for(key)
    picked = widgets.sparsity_selectors(key, store, "export")
    if picked is None:
        return
    model, metric, label = picked
    try:
        curves = state.depth_curves(key, model, metric, label)
        tests = state.group_tests(key, model, metric, label)
    except ValueError as e:
        st.warning(str(e))
        return
    stem = f"{model}-{metric}-{label}"
    st.markdown("**Depth curves** (mean and 95% CI per group and layer)")
    _table_section(curves, f"depth-curves-{stem}",
                   f"Mean {metric} per {model} layer and {label} group with 95% Student-t intervals.",
                   key="export-curves")
    st.markdown("**Group tests** (Kruskal-Wallis per layer, Benjamini-Hochberg across layers)")
    _table_section(tests, f"group-tests-{stem}",
                   f"Kruskal-Wallis tests of {metric} across {label} groups per {model} layer; p-values "
                   "Benjamini-Hochberg-adjusted across layers.", key="export-tests")
    st.markdown("**Figures**")
    cols = st.columns(4)
    kinds = [("curves", label, f"depth-curves-{stem}")]
    if store.images["breed"].notna().any():
        kinds.append(("heatmap", "breed", f"heatmap-{model}-{metric}-breed"))
    i = 0
    for kind, lab, name in kinds:
        for fmt in ("png", "svg"):
            cols[i].download_button(
                f"{name}.{fmt}", functools.partial(figure_bytes, key, kind, model, metric, lab, fmt),
                f"{name}.{fmt}", "image/png" if fmt == "png" else "image/svg+xml", key=f"export-fig-{kind}-{fmt}",
                icon=":material/image:")
            i += 1


def render() -> None:
    """Three sections: images (with map and clusters), clusters, sparsity."""
    key = state.current_key()
    st.title("Export")
    st.caption("The same files `mammals export` writes: CSV and Parquet keep full precision, LaTeX tables are "
               "booktabs, figures are matplotlib PNG/SVG.")
    tabs = st.tabs(["Images", "Clusters", "Sparsity"])
    with tabs[0]:
        _images_section(key)
    with tabs[1]:
        _clusters_section(key)
    with tabs[2]:
        _sparsity_section(key)
