"""Clusters: HDBSCAN clusters of a space, one gallery per cluster with its purity and majority breed."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state, widgets

THUMBS_PER_CLUSTER = 12


def _members(frame: pd.DataFrame, cluster: int, n: int) -> list[str]:
    """The cluster's most typical members first (highest membership probability), so a gallery shows its core."""
    part = frame[frame["cluster"] == cluster].sort_values(["probability", "id"], ascending=[False, True])
    return part["id"].head(n).tolist()


def render() -> None:
    """Pick a space and the clustering parameters; galleries per cluster, noise apart, agreement with labels."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Clusters")
    spaces = store.space_names()
    c1, c2, c3 = st.columns([2, 2, 1])
    space = c1.selectbox("Space", spaces, index=spaces.index("encoder") if "encoder" in spaces else 0,
                         key="clusters-space")
    on = c2.radio("Cluster", ["map", "pca"], horizontal=True, key="clusters-on",
                  format_func=lambda v: {"map": "on the UMAP", "pca": "on PCA components"}[v])
    min_size = int(c3.number_input("Min. cluster size", 2, 500, 15, key="clusters-min-size"))

    with st.spinner("Clustering (first time only; cached after)…"):
        frame = state.clusters_frame(key, space, on, min_size)
        summary, agreement = state.cluster_tables(key, space, on, min_size)

    n_clusters = int((summary["cluster"] >= 0).sum())
    noise = frame[frame["cluster"] < 0]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Clusters", n_clusters)
    c2.metric("Clustered images", f"{len(frame) - len(noise):,}")
    c3.metric("Noise", f"{len(noise):,}")
    for row in agreement[agreement["label"] == "breed"].to_dict("records"):
        c4.metric("Agreement with breed", f"NMI {float(row['nmi']):.2f}", f"ARI {float(row['ari']):.2f}",
                  delta_color="off")

    with st.expander("Agreement with the labels, and every cluster as a table"):
        st.caption("NMI and ARI between the clusters and each label (1 = the clusters are the label's groups).")
        st.dataframe(agreement, hide_index=True)
        st.dataframe(summary, hide_index=True,
                     column_config={"purity": st.column_config.ProgressColumn(format="percent", min_value=0,
                                                                              max_value=1)})

    st.subheader("Clusters, largest first")
    per_page = 20
    real = summary[summary["cluster"] >= 0].sort_values("size", ascending=False)
    if len(real) > per_page:
        first = int(st.number_input(f"Show clusters from rank (of {len(real)})", 1, len(real), 1,
                                    step=per_page, key="clusters-page"))
        real = real.iloc[first - 1: first - 1 + per_page]
    for cluster, size, purity, majority in zip(real["cluster"].astype(int), real["size"].astype(int),
                                                real["purity"].astype(float), real["majority"], strict=True):
        shown = "n/a (no labels)" if purity != purity else f"{purity:.0%}"  # NaN: no labelled member
        st.markdown(f"**Cluster {cluster}** · {size} images · purity {shown} · majority **{majority or '—'}**")
        ids = _members(frame, cluster, THUMBS_PER_CLUSTER)
        widgets.gallery(key, ids, widgets.store_images(store, ids)["breed"].fillna("?").tolist(), width=100)

    st.subheader(f"Noise ({len(noise):,} images in no cluster)")
    if len(noise):
        # The most outlying first: they are what HDBSCAN is surest belong nowhere.
        ids = noise.sort_values(["outlier_score", "id"], ascending=[False, True])["id"].head(24).tolist()
        widgets.gallery(key, ids, widgets.store_images(store, ids)["breed"].fillna("?").tolist(), width=100)
