"""Overview: what the store holds — counts by species and breed, the encoder, trained models, spaces, errors."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard import state
from indexer.store import Store


def _breed_counts(store: Store) -> pd.DataFrame:
    df = store.images
    counts = (df.assign(species=df["species"].fillna("unknown"), breed=df["breed"].fillna("unknown"))
              .groupby(["species", "breed"]).size().rename("images").reset_index())
    return counts.sort_values(["species", "images"], ascending=[True, False])


def _report_value(v: Any) -> str:
    """One report value as text: floats to 6 significant digits, nested values as JSON, so any report fits
    (formatted per value: one pandas column of ints and floats would print every count as 912.0)."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int | str | bool):
        return str(v)
    return json.dumps(v, default=str)


def _report_table(report: dict[str, Any]) -> pd.DataFrame:
    """A model's training report as metric/value rows."""
    return pd.DataFrame([{"metric": k, "value": _report_value(v)} for k, v in report.items()],
                        columns=["metric", "value"])


def render() -> None:
    """Counts, models, spaces and errors of the store."""
    key = state.current_key()
    store = state.store_for(key)
    m = store.manifest
    st.title("Mammals Space")
    st.caption(f"Store `{key.path}` · updated {m.get('updated_at', '?')}")

    species = store.images["species"].fillna("unknown").value_counts()
    cols = st.columns(2 + len(species))
    cols[0].metric("Images", f"{len(store.images):,}")
    cols[1].metric("Files with errors", f"{len(store.errors):,}")
    for col, (name, n) in zip(cols[2:], species.items(), strict=True):
        col.metric(str(name).capitalize(), f"{n:,}")

    counts = _breed_counts(store)
    if len(counts):
        fig = px.bar(counts, x="breed", y="images", color="species", title="Images per breed",
                     category_orders={"breed": counts["breed"].tolist()})
        fig.update_layout(xaxis_tickangle=-45, height=420, margin={"t": 50, "b": 10})
        st.plotly_chart(fig, key="overview-breeds")

    left, right = st.columns(2)
    with left:
        st.subheader("Encoder")
        enc = m.get("encoder", {})
        st.markdown(f"**{enc.get('name', '?')}** · dim {enc.get('dim', '?')} · weights sha256 "
                    f"`{str(enc.get('weights_sha256', '?'))[:16]}…`")
        st.subheader("Spaces")
        spaces = pd.DataFrame([{"space": name, "dim": s.get("dim"), "rows": s.get("count"),
                                "kind": s.get("kind", s.get("model", ""))}
                               for name, s in m.get("spaces", {}).items()])
        st.dataframe(spaces, hide_index=True)
    with right:
        st.subheader("Trained models")
        models: dict[str, Any] = m.get("models", {})
        if not models:
            st.info(f"No trained models yet. Run `mammals train mapper --store {key.path}` and "
                    f"`mammals train vae --store {key.path}`, then `mammals index --store {key.path}`.")
        for name, info in sorted(models.items()):
            with st.expander(f"{name} · sha256 {str(info.get('sha256', '?'))[:12]}… · trained "
                             f"{info.get('trained_at', '?')}", expanded=True):
                report = info.get("report") or {}
                if report:
                    st.dataframe(_report_table(report), hide_index=True)
                with st.popover("Configuration"):
                    st.json(info.get("config", {}))

    st.subheader(f"Errors ({len(store.errors):,})")
    if len(store.errors):
        st.dataframe(store.errors[["path", "reason", "dataset", "seen_at"]], hide_index=True)
    else:
        st.caption("Every file found was indexed.")
