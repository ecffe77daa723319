"""Clusters: HDBSCAN clusters of a space, one gallery per cluster with its purity and majority breed."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboard import state, widgets

THUMBS_PER_CLUSTER = 12
MIX_CLUSTERS = 40  # bars in the breed-mix chart (the largest clusters); the table lists them all


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
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.metric("Clusters", n_clusters)
    c2.metric("Clustered images", f"{len(frame) - len(noise):,}")
    c3.metric("Noise", f"{len(noise):,} ({len(noise) / max(len(frame), 1):.0%})")
    for row in agreement[agreement["label"] == "breed"].to_dict("records"):
        c4.metric("NMI with breed", f"{float(row['nmi']):.2f}", help="normalised mutual information, 0-1")
        c5.metric("ARI with breed", f"{float(row['ari']):.2f}", help="adjusted Rand index: 0 = chance, 1 = same")

    st.subheader("Clusters, largest first")
    mix = breed_mix(frame, store.images)
    table = summary[summary["cluster"] >= 0].merge(mix, on="cluster", how="left").sort_values("size",
                                                                                             ascending=False)
    st.dataframe(table[[c for c in ("cluster", "size", "purity", "majority", "top_breeds") if c in table.columns]],
                 hide_index=True,
                 column_config={"purity": st.column_config.ProgressColumn(format="percent", min_value=0,
                                                                          max_value=1),
                                "top_breeds": st.column_config.TextColumn("top 3 breeds (share)")})
    st.plotly_chart(breed_mix_figure(frame, store.images, table["cluster"].astype(int).tolist()[:MIX_CLUSTERS]),
                    key="clusters-mix")
    with st.expander("Agreement with every label"):
        st.caption("NMI and ARI between the clusters and each label (1 = the clusters are the label's groups).")
        st.dataframe(agreement, hide_index=True)

    real = table["cluster"].astype(int).tolist()
    shown = st.multiselect("Galleries of clusters", real, default=real[:3], key="clusters-galleries",
                           format_func=lambda c: f"cluster {c}")
    for cluster in shown:
        info = table[table["cluster"] == cluster].iloc[0]
        purity = float(info["purity"])
        text = "n/a (no labels)" if purity != purity else f"{purity:.0%}"  # NaN: no labelled member
        st.markdown(f"**Cluster {cluster}** · {int(info['size'])} images · purity {text} · "
                    f"{info.get('top_breeds') or 'no breeds'}")
        ids = _members(frame, cluster, THUMBS_PER_CLUSTER)
        widgets.gallery(key, ids, widgets.store_images(store, ids)["breed"].fillna("?").tolist(), width=100)

    if st.checkbox(f"Show the noise ({len(noise):,} images in no cluster)", key="clusters-noise") and len(noise):
        # The most outlying first: they are what HDBSCAN is surest belong nowhere.
        ids = noise.sort_values(["outlier_score", "id"], ascending=[False, True])["id"].head(24).tolist()
        widgets.gallery(key, ids, widgets.store_images(store, ids)["breed"].fillna("?").tolist(), width=100)


def breed_mix(frame: pd.DataFrame, images: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per cluster, its ``top`` breeds and their shares as text ("bengal 60% · birman 20% · ...")."""
    df = frame[["id", "cluster"]].merge(images[["id", "breed"]], on="id", how="left")
    df = df[df["cluster"] >= 0]
    rows = []
    for cluster, part in df.groupby("cluster"):
        shares = part["breed"].fillna("unlabelled").value_counts(normalize=True).head(top)
        rows.append({"cluster": cluster, "top_breeds": " · ".join(f"{b} {v:.0%}" for b, v in shares.items())})
    return pd.DataFrame(rows, columns=["cluster", "top_breeds"])


def breed_mix_figure(frame: pd.DataFrame, images: pd.DataFrame, clusters: list[int], top: int = 3) -> go.Figure:
    """One stacked bar per cluster: the shares of its ``top`` breeds, the rest as "other"."""
    df = frame[["id", "cluster"]].merge(images[["id", "breed"]], on="id", how="left")
    fig = go.Figure()
    rows: list[tuple[str, str, float]] = []
    for cluster in clusters:
        shares = df[df["cluster"] == cluster]["breed"].fillna("unlabelled").value_counts(normalize=True)
        for breed, share in shares.head(top).items():
            rows.append((f"cluster {cluster}", str(breed), float(share)))
        if len(shares) > top:
            rows.append((f"cluster {cluster}", "other", float(shares.iloc[top:].sum())))
    mix = pd.DataFrame(rows, columns=["cluster", "breed", "share"])
    colours = px.colors.qualitative.Dark24 + px.colors.qualitative.Light24
    for i, breed in enumerate([*sorted(b for b in mix["breed"].unique() if b != "other"), "other"]):
        part = mix[mix["breed"] == breed]
        if part.empty:
            continue
        fig.add_trace(go.Bar(y=part["cluster"], x=part["share"], name=breed, orientation="h",
                             marker={"color": "#c8c8c8" if breed == "other" else colours[i % len(colours)]},
                             hovertemplate=f"%{{y}}: {breed} %{{x:.0%}}<extra></extra>"))
    fig.update_layout(barmode="stack", title=f"Top {top} breeds per cluster (largest clusters first)",
                      xaxis={"tickformat": ".0%", "range": [0, 1]}, showlegend=False,
                      yaxis={"autorange": "reversed", "categoryorder": "array",
                             "categoryarray": [f"cluster {c}" for c in clusters]},
                      height=120 + 22 * len(clusters), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
