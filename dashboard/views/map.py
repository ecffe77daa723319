"""Map: a UMAP of any space, coloured by species, breed, cluster or a label column.

Hovering a point shows a card with its thumbnail, breed, species and cluster; clicking it shows its nearest
photos and their breed vote beside the map; a box or lasso selection lists the selected photos (and survives a
change of colouring).  The scatter is ``dashboard.components.scatter_map`` (plotly.js with a hover card).
"""

from __future__ import annotations

import colorsys
import html
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import state, widgets
from dashboard.components import SPRITE_CELL, TracePoints, scatter_map, sprite_sheet
from dashboard.state import StoreKey

MAX_SELECTION_THUMBS = 60
SPRITE_MAX_POINTS = 20_000  # ~20k thumbnails at 64 px make a 9,000 px square JPEG of ~10 MB; beyond, text only
NEIGHBOURS = 8
UNKNOWN = "unknown"
NOISE = "noise"
GREY = "#b0b0b0"
# Hue ranges per species, so that every cat breed reads warm and every dog breed cool; other groups get the
# whole circle.  Within a range hues are evenly spaced and lightness alternates, so no two groups share a colour.
SPECIES_HUES: dict[str, tuple[float, float]] = {"cat": (-0.12, 0.16), "dog": (0.22, 0.75)}


def palette(groups: Sequence[str], species_of: Mapping[str, str | None]) -> dict[str, str]:
    """A distinct colour per group (``UNKNOWN``/``NOISE`` grey), grouped by species where a group has one."""
    out: dict[str, str] = {}
    by_species: dict[str | None, list[str]] = {}
    for g in groups:
        if g in (UNKNOWN, NOISE):
            out[g] = GREY
        else:
            sp = species_of.get(g)
            by_species.setdefault(sp if sp in SPECIES_HUES else None, []).append(g)
    for sp, members in by_species.items():
        lo, hi = SPECIES_HUES.get(sp, (0.0, 1.0)) if sp is not None else (0.0, 1.0)
        n = len(members)
        for i, g in enumerate(sorted(members)):
            hue = (lo + (hi - lo) * (i / max(n, 1) if sp is None else i / max(n - 1, 1))) % 1.0
            light = (0.38, 0.55, 0.70)[i % 3]
            r, gr, b = colorsys.hls_to_rgb(hue, light, 0.75)
            out[g] = f"#{int(r * 255):02x}{int(gr * 255):02x}{int(b * 255):02x}"
    return out


def _frame(key: StoreKey, space: str, colour: str, n_neighbors: int, min_dist: float) -> pd.DataFrame:
    """The map joined with what the hover card, the filters and the colouring need (id, x, y, relpath, species,
    breed, cluster and the colour column)."""
    store = state.store_for(key)
    coords = state.map_frame(key, space, n_neighbors, min_dist)
    cols = ["id", "relpath", "species", "breed"] + ([colour] if colour not in ("species", "breed", "cluster") else [])
    df = coords.merge(store.images[cols], on="id", how="left")
    clusters = state.clusters_frame(key, space)
    return df.merge(clusters[["id", "cluster"]], on="id", how="left")


def _categories(values: pd.Series, colour: str) -> pd.Series:
    if colour == "cluster":
        return values.map(lambda c: NOISE if pd.isna(c) or int(c) < 0 else f"cluster {int(c)}")
    return values.astype("string").fillna(UNKNOWN)


def _card(df: pd.DataFrame) -> list[str]:
    """Each point's hover-card text (HTML, every value escaped)."""
    def esc(v: Any) -> str:
        return html.escape(str(v)) if isinstance(v, str) and v else "?"

    cluster = df["cluster"].map(lambda c: "noise" if pd.isna(c) or int(c) < 0 else str(int(c)))
    return [f"<b>{esc(b)}</b> · {esc(s)}<br>cluster {c}<br><small>{esc(r)}</small>"
            for b, s, c, r in zip(df["breed"], df["species"], cluster, df["relpath"], strict=True)]


def _figure(df: pd.DataFrame, colour: str, cells: Mapping[str, int], highlight: Sequence[str],
            selected: set[str]) -> tuple[go.Figure, list[TracePoints]]:
    """WebGL scatter (Scattergl stays smooth at 100k points) and, per trace, its points' ids, hover cards and
    sprite cells, in point order: how the component maps an event's (trace, point) back to a photo."""
    fig = go.Figure()
    points: list[TracePoints] = []
    marker_size = 7 if len(df) < 5_000 else 3
    cards = pd.Series(_card(df), index=df.index)

    def add(part: pd.DataFrame, **trace: Any) -> None:
        ids = part["id"].astype(str).tolist()
        chosen = [i for i, v in enumerate(ids) if v in selected]
        fig.add_trace(go.Scattergl(x=part["x"], y=part["y"], mode="markers", hoverinfo="none",
                                   selectedpoints=chosen if selected else None, **trace))
        points.append({"ids": ids, "card": cards.loc[part.index].tolist(), "cell": [cells.get(i, -1) for i in ids]})

    if state.is_categorical(df[colour]) or colour == "cluster":
        cats = _categories(df[colour], colour)
        order = cats.value_counts().index.tolist()
        # Unknown/noise last and grey, so they read as "no label" rather than as one more group.
        order = [c for c in order if c not in (UNKNOWN, NOISE)] + [c for c in (UNKNOWN, NOISE) if c in set(order)]
        species_of: dict[str, str | None] = {}
        if colour == "breed":  # a breed's species: that of its first labelled photo (a breed has one)
            for cat, sp in zip(cats, df["species"], strict=True):
                if isinstance(sp, str):
                    species_of.setdefault(str(cat), sp)
        colours = palette(order, species_of)
        for cat in order:
            part = df[cats == cat]
            dim = bool(highlight) and cat not in highlight
            add(part, name=f"{cat} ({len(part)})",
                marker={"size": marker_size, "color": colours[cat], "opacity": 0.12 if dim else 0.85})
    else:
        add(df, name=colour, marker={"size": marker_size, "color": df[colour], "colorscale": "Viridis",
                                     "showscale": True, "colorbar": {"title": {"text": colour}}})
    fig.update_layout(height=620, dragmode="lasso", legend={"itemsizing": "constant"}, clickmode="event+select",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis={"visible": False},
                      yaxis={"visible": False, "scaleanchor": "x"}, uirevision=colour)
    return fig, points


@st.cache_data(max_entries=4, show_spinner=False)
def sprite_for(key: StoreKey, ids: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The sprite sheet of ``ids`` (their thumbnails) and each id's cell; (None, {}) beyond SPRITE_MAX_POINTS."""
    from analysis.photos import square_thumbnail

    if len(ids) > SPRITE_MAX_POINTS:
        return None, {}
    paths = widgets.store_images(state.store_for(key), list(ids))["path"].astype(str).tolist()

    def load(path: str) -> Any:
        img = square_thumbnail(path, SPRITE_CELL)
        return None if isinstance(img, str) else img  # an unreadable photo keeps a grey cell

    with ThreadPoolExecutor(4) as pool:  # reading and decoding release the GIL
        images = list(pool.map(load, paths))
    return sprite_sheet(images), {i: n for n, i in enumerate(ids)}


@st.cache_data(max_entries=16, show_spinner=False)
def map_frame(key: StoreKey, space: str, colour: str, n_neighbors: int, min_dist: float) -> pd.DataFrame:
    """The joined frame of a map, cached: every click or selection reruns the page."""
    return _frame(key, space, colour, n_neighbors, min_dist)


def event_state(value: Any) -> tuple[str | None, list[str]]:
    """(clicked id, selected ids) of the component's last report (None/[] before any)."""
    if not isinstance(value, Mapping):
        return None, []
    clicked = value.get("clicked")
    selected = [str(i) for i in value.get("selected") or [] if isinstance(i, str)]
    return (clicked if isinstance(clicked, str) else None), list(dict.fromkeys(selected))


def _filters(df: pd.DataFrame) -> pd.DataFrame:
    """Metadata filters (species, breed, cluster, numeric label ranges); the rows that pass."""
    with st.expander("Filter the points"):
        keep = pd.Series(True, index=df.index)
        c1, c2, c3 = st.columns(3)
        for col, box in (("species", c1), ("breed", c2)):
            values = sorted(df[col].dropna().astype(str).unique())
            chosen = box.multiselect(col.capitalize(), values, key=f"map-filter-{col}")
            if chosen:
                keep &= df[col].astype("string").isin(chosen).fillna(False)
        clusters = sorted(int(c) for c in df["cluster"].dropna().unique())
        chosen_c = c3.multiselect("Cluster", clusters, key="map-filter-cluster",
                                  format_func=lambda c: "noise" if c < 0 else str(c))
        if chosen_c:
            keep &= df["cluster"].isin(chosen_c)
        numeric = [c for c in df.columns if c not in ("x", "y", "z", "cluster") and pd.api.types.is_numeric_dtype(
            df[c]) and not state.is_categorical(df[c])]
        for col in numeric:
            lo, hi = float(df[col].min()), float(df[col].max())
            if lo < hi:
                a, b = st.slider(f"{col} range", lo, hi, (lo, hi), key=f"map-filter-{col}")
                keep &= df[col].between(a, b) | df[col].isna() if (a, b) == (lo, hi) else df[col].between(a, b)
    return df[keep]


def _clicked_panel(key: StoreKey, store: Any, space: str, image_id: str) -> None:
    """The clicked photo, its nearest photos and their breed vote."""
    from analysis.neighbours import breed_votes

    row = widgets.store_images(store, [image_id]).iloc[0]
    st.image(state.thumbnail(key, image_id, 2 * state.THUMB_SIDE), caption=widgets.label_of(row))
    st.caption(f"`{row['relpath']}`")
    if st.button("Query this photo", key="map-to-query", icon=":material/image_search:",
                 help="open it on the Query page (any space, more neighbours)"):
        widgets.preselect("query-image", str(row["relpath"]))
        st.session_state["query-source"] = "Indexed photo"
        from dashboard.app import switch_to

        switch_to("query")
    nbrs = state.neighbours_of_indexed(key, image_id, space, NEIGHBOURS, exclude_self=True)
    st.markdown(f"**{len(nbrs)} nearest photos** in `{space}`")
    widgets.neighbour_gallery(key, nbrs, width=90)
    widgets.breed_vote_chart(breed_votes(nbrs), key=f"map-vote-{image_id}", top=5)


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
        full = map_frame(key, space, colour, n_neighbors, min_dist)
    with st.spinner("Making the thumbnails of the hover cards (first time only; cached after)…"):
        sprite, cells = sprite_for(key, tuple(full["id"].astype(str)))
    df = _filters(full)
    groups = sorted(_categories(df[colour], colour).unique()) if (
        state.is_categorical(df[colour]) or colour == "cluster") else []
    highlight = st.multiselect("Highlight", groups, key="map-highlight", placeholder="type a breed or group",
                               help="the other groups are dimmed") if groups else []
    # One key per space, not per colouring: the component's value (the click and the selection) survives a
    # change of colour, filter or highlight.
    chart_key = f"map-chart-{space}"
    clicked, selected = event_state(st.session_state.get(chart_key))
    fig, points = _figure(df, colour, cells, highlight, set(selected))
    st.caption(f"{len(df):,} of {len(full):,} images · UMAP of `{space}` (cosine, n_neighbors={n_neighbors}, "
               f"min_dist={min_dist}). Hover a point for its photo, click it for its neighbours, drag a box or a "
               "lasso to select points.")
    left, right = st.columns([3, 1])
    with left:
        value = scatter_map(fig.to_plotly_json(), points, sprite=sprite,
                            state={"clicked": clicked, "selected": selected}, key=chart_key)
    clicked, selected = event_state(value)
    known = set(full["id"].astype(str))  # a stored click or selection may name photos of an older version
    with right:
        if clicked and clicked in known:
            _clicked_panel(key, store, space, clicked)
        else:
            st.caption("Click a point to see its nearest photos and their breed vote here.")

    if not selected:
        st.caption("No selection yet.")
        return
    chosen = full.set_index("id").loc[[i for i in selected if i in known]].reset_index()
    st.subheader(f"Selection: {len(chosen):,} image(s)")
    breeds = chosen["breed"].fillna(UNKNOWN).value_counts()
    st.caption(" · ".join(f"{b} {n}" for b, n in breeds.head(8).items()))
    shown = chosen.head(MAX_SELECTION_THUMBS)
    widgets.gallery(key, shown["id"].tolist(), shown["breed"].fillna(shown["species"]).fillna(UNKNOWN).tolist(),
                    width=110)
    if len(chosen) > MAX_SELECTION_THUMBS:
        st.caption(f"Showing {MAX_SELECTION_THUMBS} of {len(chosen):,}; the download has them all.")
    table = widgets.store_images(store, chosen["id"].tolist()).merge(chosen[["id", "x", "y"]], on="id")
    st.download_button("Download the selection (CSV)", table.to_csv(index=False).encode(),
                       f"selection-{space}.csv", "text/csv", key="map-download", icon=":material/download:")
