"""Map: a UMAP of any space, coloured by species, breed, cluster or a label column; select points to see them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboard import state, widgets
from dashboard.state import StoreKey

MAX_SELECTION_THUMBS = 60
# Enough distinct colours for ~70 breeds before any repeats.
PALETTE: list[str] = [*px.colors.qualitative.Dark24, *px.colors.qualitative.Light24, *px.colors.qualitative.Alphabet]
UNKNOWN = "unknown"
NOISE = "noise"


def _frame(key: StoreKey, space: str, colour: str, n_neighbors: int, min_dist: float) -> pd.DataFrame:
    """The map joined with what the hover and the colouring need (id, x, y, relpath, species, breed, colour)."""
    store = state.store_for(key)
    coords = state.map_frame(key, space, n_neighbors, min_dist)
    cols = ["id", "relpath", "species", "breed"] + ([colour] if colour not in ("species", "breed", "cluster") else [])
    df = coords.merge(store.images[cols], on="id", how="left")
    if colour == "cluster":
        clusters = state.clusters_frame(key, space)
        df = df.merge(clusters[["id", "cluster"]], on="id", how="left")
    return df


def _categories(values: pd.Series, colour: str) -> pd.Series:
    if colour == "cluster":
        return values.map(lambda c: NOISE if pd.isna(c) or int(c) < 0 else f"cluster {int(c)}")
    return values.astype("string").fillna(UNKNOWN)


def _figure(df: pd.DataFrame, colour: str) -> tuple[go.Figure, list[np.ndarray]]:
    """WebGL scatter (Scattergl stays smooth at 100k points); returns the figure and each trace's ids in point
    order, which is how a selection's (curve_number, point_index) is turned back into image ids."""
    fig = go.Figure()
    trace_ids: list[np.ndarray] = []
    marker_size = 6 if len(df) < 5_000 else 3
    if state.is_categorical(df[colour]) or colour == "cluster":
        cats = _categories(df[colour], colour)
        order = cats.value_counts().index.tolist()
        # Unknown/noise last and grey, so they read as "no label" rather than as one more group.
        order = [c for c in order if c not in (UNKNOWN, NOISE)] + [c for c in (UNKNOWN, NOISE) if c in set(order)]
        for i, cat in enumerate(order):
            part = df[cats == cat]
            colour_value = "#b0b0b0" if cat in (UNKNOWN, NOISE) else PALETTE[i % len(PALETTE)]
            fig.add_trace(go.Scattergl(
                x=part["x"], y=part["y"], mode="markers", name=f"{cat} ({len(part)})",
                marker={"size": marker_size, "color": colour_value, "opacity": 0.8},
                # The hover names the file; plotly adds the trace (category) name beside it, so no per-point
                # label is sent: at 100k points the strings, not the coordinates, are most of the payload.
                text=part["relpath"], hovertemplate="%{text}",
            ))
            trace_ids.append(part["id"].to_numpy())
    else:
        fig.add_trace(go.Scattergl(
            x=df["x"], y=df["y"], mode="markers", name=colour,
            marker={"size": marker_size, "color": df[colour], "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": {"text": colour}}},
            text=df["relpath"], hovertemplate=f"%{{text}}<br>{colour} %{{marker.color}}<extra></extra>",
        ))
        trace_ids.append(df["id"].to_numpy())
    fig.update_layout(height=600, dragmode="lasso", legend={"itemsizing": "constant"},
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis={"visible": False},
                      yaxis={"visible": False, "scaleanchor": "x"})
    return fig, trace_ids


@st.cache_data(max_entries=16, show_spinner=False)
def map_figure(key: StoreKey, space: str, colour: str, n_neighbors: int,
               min_dist: float) -> tuple[dict[str, Any], list[np.ndarray], pd.DataFrame]:
    """The figure (as a plain dict), its traces' ids and the joined frame, cached: a selection reruns the page,
    and rebuilding a 100k-point figure each time would cost a second.

    A dict, not the ``go.Figure``: a figure that went through the cache's pickling drew fine but no longer
    reported box/lasso selections in Streamlit 1.67 (found with the browser; its dict or JSON round-trips do).
    """
    df = _frame(key, space, colour, n_neighbors, min_dist)
    fig, trace_ids = _figure(df, colour)
    return fig.to_dict(), trace_ids, df


def selected_ids(event: Any, trace_ids: list[np.ndarray]) -> list[str]:
    """Ids of the points a box/lasso selection event names (duplicates dropped, order kept)."""
    selection: Mapping[str, Any] = (event or {}).get("selection", {}) if isinstance(event, Mapping) else {}
    out: dict[str, None] = {}
    for p in selection.get("points", []):
        curve, index = p.get("curve_number"), p.get("point_index", p.get("point_number"))
        if curve is None or index is None or curve >= len(trace_ids) or index >= len(trace_ids[curve]):
            continue
        out[str(trace_ids[curve][index])] = None
    return list(out)


def render() -> None:
    """Pick a space and a colouring; the map is computed once per (space, parameters) and cached."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Map")
    spaces = store.space_names()
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    space = c1.selectbox("Space", spaces, index=spaces.index("encoder") if "encoder" in spaces else 0,
                         key="map-space")
    colour = c2.selectbox("Colour by", [*state.label_columns(store), "cluster"], key="map-colour")
    n_neighbors = int(c3.number_input("Neighbours", 2, 200, 15, key="map-n-neighbors",
                                      help="UMAP n_neighbors: larger keeps more global structure"))
    min_dist = float(c4.number_input("Min. distance", 0.0, 1.0, 0.1, step=0.05, key="map-min-dist",
                                     help="UMAP min_dist: smaller packs clusters tighter"))

    with st.spinner(f"Computing the UMAP of {space} (first time only; cached after)…"):
        fig, trace_ids, df = map_figure(key, space, colour, n_neighbors, min_dist)
    st.caption(f"{len(df):,} images · UMAP of `{space}` (cosine, n_neighbors={n_neighbors}, min_dist={min_dist}). "
               "Drag a box or a lasso to select points.")
    event = st.plotly_chart(fig, key=f"map-chart-{space}-{colour}", on_select="rerun",
                            selection_mode=("box", "lasso"))

    ids = selected_ids(event, trace_ids)
    if not ids:
        st.caption("No selection yet.")
        return
    chosen = df.set_index("id").loc[ids].reset_index()
    st.subheader(f"Selection: {len(ids):,} image(s)")
    breeds = chosen["breed"].fillna(UNKNOWN).value_counts()
    st.caption(" · ".join(f"{b} {n}" for b, n in breeds.head(8).items()))
    shown = chosen.head(MAX_SELECTION_THUMBS)
    widgets.gallery(key, shown["id"].tolist(), shown["breed"].fillna(shown["species"]).fillna(UNKNOWN).tolist(),
                    width=110)
    if len(chosen) > MAX_SELECTION_THUMBS:
        st.caption(f"Showing {MAX_SELECTION_THUMBS} of {len(chosen):,}; the download has them all.")
    table = widgets.store_images(store, ids).merge(chosen[["id", "x", "y"]], on="id")
    st.download_button("Download the selection (CSV)", table.to_csv(index=False).encode(),
                       f"selection-{space}.csv", "text/csv", key="map-download", icon=":material/download:")
