"""Pieces the pages share: galleries of store thumbnails, image pickers, breed-vote charts, table downloads."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import state
from dashboard.state import StoreKey

if TYPE_CHECKING:
    from analysis.neighbours import BreedVote, Neighbour
    from indexer.store import Store

MAX_PICKER_OPTIONS = 2_000  # a selectbox with 100k options would ship them all to the browser on every rerun


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-!|<>~])")


def plain(text: str) -> str:
    """``text`` with Markdown's special characters escaped, for user-given strings (an upload's file name) shown
    inside Streamlit's Markdown-rendered messages."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def gallery(key: StoreKey, ids: Sequence[str], captions: Sequence[str] | None = None, *, width: int = 130) -> None:
    """Square thumbnails of indexed images (by id: the only way a file reaches the browser), wrapped in rows."""
    if not ids:
        st.caption("(no images)")
        return
    thumbs = [state.thumbnail(key, i, square=True) for i in ids]
    st.image(thumbs, caption=list(captions) if captions is not None else None, width=width)


def preselect(widget_key: str, relpath: str) -> None:
    """Make the :func:`image_picker` with ``widget_key`` open on ``relpath`` (its filter narrowed to it): how
    another page (the map's clicked photo) hands a photo over."""
    st.session_state[f"{widget_key}-filter"] = relpath
    st.session_state[widget_key] = relpath


GALLERY_PICKER_ROWS = 60


def gallery_picker(key: StoreKey, store: Store, *, widget_key: str, target: str) -> None:
    """A searchable gallery (thumbnails in a table: filter by breed, search with the table's own search, pick a
    row); the picked photo becomes the choice of the :func:`image_picker` whose key is ``target``."""
    import base64

    images = store.images
    breeds = sorted(images["breed"].dropna().astype(str).unique())
    breed = st.selectbox("Breed", ["(any)", *breeds], key=f"{widget_key}-breed")
    rows = images if breed == "(any)" else images[images["breed"] == breed]
    rows = rows.sort_values("relpath").head(GALLERY_PICKER_ROWS)
    table = pd.DataFrame({
        "photo": ["data:image/jpeg;base64," + base64.b64encode(state.thumbnail(key, str(i), 96, square=True)
                                                               ).decode("ascii") for i in rows["id"]],
        "breed": rows["breed"].fillna("?").to_numpy(), "file": rows["relpath"].astype(str).to_numpy(),
    })
    if len(rows) == GALLERY_PICKER_ROWS:
        st.caption(f"The first {GALLERY_PICKER_ROWS} photos; pick a breed to see others.")
    event = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row",
                         key=f"{widget_key}-table", row_height=72,
                         column_config={"photo": st.column_config.ImageColumn("photo", width="small")})
    picked = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    if picked:
        relpath = str(table["file"].iloc[picked[0]])
        if st.session_state.get(f"{widget_key}-applied") != relpath:  # once per pick: later typing wins
            st.session_state[f"{widget_key}-applied"] = relpath
            preselect(target, relpath)


def image_picker(key: StoreKey, label: str, *, widget_key: str, default_index: int = 0) -> str:
    """Pick an indexed image by relpath, with a substring filter so large stores stay usable; returns its id."""
    relpaths, by_rel = state.relpath_index(key.path, key.version)
    needle = st.text_input(f"{label}: filter", key=f"{widget_key}-filter", placeholder="part of a file name")
    options = [r for r in relpaths if needle.lower() in r.lower()] if needle else relpaths
    if not options:
        st.warning(f"No indexed file name contains {needle!r}; showing all.")
        options = relpaths
    if len(options) > MAX_PICKER_OPTIONS:
        st.caption(f"{len(options):,} matches; showing the first {MAX_PICKER_OPTIONS:,} (type to narrow).")
        options = options[:MAX_PICKER_OPTIONS]
    chosen = st.selectbox(label, options, index=min(default_index, len(options) - 1), key=widget_key)
    return by_rel[str(chosen)]


def label_of(row: pd.Series) -> str:
    """An image row's breed, else its species, else "?" (missing labels are NaN or None in pandas)."""
    for col in ("breed", "species"):
        value = row.get(col)
        if isinstance(value, str) and value:
            return value
    return "?"


def neighbour_table(neighbours: Sequence[Neighbour]) -> pd.DataFrame:
    return pd.DataFrame([{"rank": n.rank, "similarity": round(n.similarity, 4), "species": n.species,
                          "breed": n.breed, "id": n.id} for n in neighbours])


def neighbour_gallery(key: StoreKey, neighbours: Sequence[Neighbour], *, width: int = 130) -> None:
    gallery(key, [n.id for n in neighbours],
            [f"{n.rank}. {n.breed or n.species or '?'} ({n.similarity:.3f})" for n in neighbours], width=width)


def breed_vote_chart(votes: Sequence[BreedVote], *, key: str, top: int = 10) -> None:
    """Horizontal bars: each breed's share of the similarity-weighted vote among the neighbours."""
    if not votes:
        st.info("No labelled neighbours, so no breed vote.")
        return
    shown = list(votes)[:top][::-1]  # plotly draws bottom-up: reverse so the winner sits on top
    fig = go.Figure(go.Bar(
        x=[v.share for v in shown], y=[f"{v.breed} ({v.species or '?'})" for v in shown], orientation="h",
        text=[f"{v.share:.0%} · {v.votes} vote(s)" for v in shown], textposition="auto",
        hovertemplate="%{y}: %{x:.1%}<extra></extra>",
    ))
    fig.update_layout(title="Breed vote (similarity-weighted)", xaxis={"tickformat": ".0%", "range": [0, 1]},
                      height=80 + 28 * len(shown), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    st.plotly_chart(fig, key=key)


def store_images(store: Store, ids: Sequence[str]) -> pd.DataFrame:
    """The image rows of some ids, in the given order (for tables and downloads)."""
    images = store.images.set_index("id")
    return images.loc[list(ids)].reset_index()


def sparsity_selectors(key: StoreKey, store: Store, prefix: str) -> tuple[str, str, str] | None:
    """Model, metric and categorical label pickers (widget keys ``<prefix>-model/-metric/-label``); None, with a
    message saying how to record them, when the store has no sparsity records."""
    choices = state.sparsity_choices(key)
    if not choices:
        st.info(f"This store has no sparsity records. Run `mammals index --store {key.path}` (without "
                "`--no-sparsity`) to record them.")
        return None
    c1, c2, c3 = st.columns(3)
    models = list(choices)
    model = c1.selectbox("Model", models, index=models.index("encoder") if "encoder" in models else 0,
                         key=f"{prefix}-model")
    metric = c2.selectbox("Metric", choices[model], index=state.default_metric(choices[model]),
                          key=f"{prefix}-metric")
    labels = [c for c in state.label_columns(store) if state.is_categorical(store.images[c])]
    label = c3.selectbox("Group by", labels, key=f"{prefix}-label")
    return model, metric, label


def breed_probability_chart(probabilities: Sequence[Mapping[str, float]], *, key: str, top: int = 6,
                            title: str = "Breed classifier along the path") -> None:
    """Lines: each step's probability (``probabilities[step]``: breed -> probability) of the breeds that matter
    along a path: every step's first breed, then the runners-up at the ends, at most ``top`` breeds."""
    shown: list[str] = []
    candidates = [next(iter(p)) for p in probabilities if p]
    for p in (probabilities[0], probabilities[-1]) if probabilities else ():
        candidates += list(p)[:2]
    for breed in candidates:
        if breed not in shown and len(shown) < top:
            shown.append(breed)
    steps = list(range(len(probabilities)))
    fig = go.Figure([go.Scatter(x=steps, y=[p.get(b, 0.0) for p in probabilities], mode="lines+markers", name=b,
                                hovertemplate=f"{b}, step %{{x}}: %{{y:.1%}}<extra></extra>") for b in shown])
    fig.update_layout(title=title, xaxis={"title": "step", "dtick": 1}, yaxis={"tickformat": ".0%", "range": [0, 1]},
                      height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    st.plotly_chart(fig, key=key)
