"""Sparsity: per-layer activation sparsity by group — depth curves with confidence bands, tests, a heat map."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboard import state, widgets

MAX_GROUPS_DEFAULT = 6  # more curves than this turn the bands into a smear; the user can add more
# One line per metric for readers who do not know them (indexer/sparsity/metrics.py has the formulas).
DEFINITIONS = {
    "near_zero_fraction": "share of a layer's activations whose magnitude is at most 1% of the layer's largest "
                          "(1 = all but the peak silent)",
    "hoyer": "Hoyer sparseness: (√n − L1/L2) / (√n − 1) of the activation magnitudes; 0 = all equal, 1 = one "
             "unit active",
    "gini": "Gini index of the activation magnitudes (Hurley & Rickard); 0 = all equal, → 1 = a few units carry "
            "everything",
    "l1_l2_ratio": "L1/L2 of the activation magnitudes: between 1 (one unit active) and √n (all equal); lower is "
                   "sparser",
}
VIEWS = {
    "relative": "Relative to the pooled curve",
    "mean": "Mean per layer",
    "slope": "Slope (change from the layer before)",
    "acceleration": "Acceleration (change of the slope)",
}


def format_p(p: float) -> str:
    """A p-value as people read it: "< 0.001" below that, else three decimals."""
    if p != p:  # NaN
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def view_curves(curves: pd.DataFrame, view: str) -> pd.DataFrame:
    """Curves as ``view`` shows them: each group minus the pooled ("all") curve, its first difference over depth
    (slope) or second difference (acceleration), or as is.  Bands move with the curve for "relative" (the pooled
    mean's own uncertainty, far smaller with all images, is left out); slope and acceleration have none."""
    out = curves.sort_values(["group", "layer_index"]).copy()
    if view == "relative":
        pooled = out[out["group"] == "all"].set_index("layer_index")["mean"]
        shift = out["layer_index"].map(pooled).to_numpy()
        for col in ("mean", "ci_low", "ci_high"):
            out[col] = out[col] - shift
    elif view in ("slope", "acceleration"):
        order = 1 if view == "slope" else 2
        out["mean"] = out.groupby("group")["mean"].diff(order)
        out[["ci_low", "ci_high"]] = np.nan
    return out


def summary_sentence(curves: pd.DataFrame, tests: pd.DataFrame, groups: list[str], metric: str) -> str:
    """Where the chosen groups differ most, in words."""
    sig = tests[tests["significant"]]
    if not len(groups) >= 2:
        return "Pick two or more groups to compare them."
    if sig.empty:
        return f"No layer's {metric} differs between the groups after correction (α = 0.05)."
    best = sig.sort_values("effect_size", ascending=False).iloc[0]
    layer = int(best["layer_index"])
    at = curves[(curves["layer_index"] == layer) & curves["group"].isin(groups)].set_index("group")["mean"]
    if len(at) < 2:
        return ""
    hi, lo = str(at.idxmax()), str(at.idxmin())
    word = "less sparse" if metric == "l1_l2_ratio" else "sparser"
    return (f"{len(sig)} of {len(tests)} layers differ (Kruskal-Wallis, BH-corrected). The largest effect is at "
            f"layer {layer} ({best['layer_name']}, ε² = {best['effect_size']:.2f}, p {format_p(best['p_adjusted'])}"
            f"): there **{hi}** is {word} than **{lo}** ({metric} {at[hi]:.3f} vs {at[lo]:.3f}).")


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def depth_figure(curves: pd.DataFrame, groups: list[str], significant: set[int], metric: str,
                 view: str = "mean") -> go.Figure:
    """Mean per layer for each group (or what ``view`` makes of it, see :func:`view_curves`), the confidence
    interval as a filled band, significant layers marked."""
    fig = go.Figure()
    palette = px.colors.qualitative.D3 + px.colors.qualitative.Dark24
    for i, group in enumerate(groups):
        g = curves[curves["group"] == group].sort_values("layer_index")
        colour = "#444444" if group == "all" else palette[i % len(palette)]
        x = g["layer_index"].tolist()
        ok = g["ci_low"].notna() & g["ci_high"].notna()
        if ok.any():
            xb = g.loc[ok, "layer_index"].tolist()
            # One closed polygon per band: upper edge left to right, lower edge back; fill="toself" fills it.
            fig.add_trace(go.Scatter(
                x=xb + xb[::-1], y=g.loc[ok, "ci_high"].tolist() + g.loc[ok, "ci_low"].tolist()[::-1],
                fill="toself", fillcolor=_rgba(colour, 0.15), line={"width": 0}, hoverinfo="skip",
                showlegend=False, legendgroup=group, name=f"{group} CI",
            ))
        fig.add_trace(go.Scatter(
            x=x, y=g["mean"], mode="lines+markers", name=f"{group} (n={int(g['n'].max())})", legendgroup=group,
            line={"color": colour, "width": 2.5 if group == "all" else 1.8, "dash": "dot" if group == "all" else None},
            marker={"size": 4}, customdata=np.stack([g["layer_name"], g["n"]], axis=1),
            hovertemplate=f"{group}<br>layer %{{x}} %{{customdata[0]}}<br>{metric} %{{y:.3f}} "
                          "(n=%{customdata[1]})<extra></extra>",
        ))
    if significant:
        # Marked on a strip under the curves, not with full-height lines: with many layers significant, lines
        # would drown the curves.
        shown = curves[curves["group"].isin(groups)] if groups else curves
        floor = float(shown["ci_low"].min(skipna=True)) if shown["ci_low"].notna().any() else float(
            shown["mean"].min())
        span = float(shown["mean"].max() - shown["mean"].min()) or 1.0
        layers = sorted(significant)
        fig.add_trace(go.Scatter(
            x=layers, y=[floor - 0.06 * span] * len(layers), mode="markers", name="groups differ (BH, α=0.05)",
            marker={"symbol": "triangle-up", "size": 9, "color": "#d62728"},
            hovertemplate="layer %{x}: groups differ<extra></extra>",
        ))
    if view == "relative":
        fig.add_hline(y=0, line={"color": "#999999", "width": 1})
    ytitle = {"mean": metric, "relative": f"{metric} − pooled mean", "slope": f"Δ {metric} per layer",
              "acceleration": f"Δ² {metric} per layer"}.get(view, metric)
    fig.update_layout(height=480, xaxis_title="layer (execution order)", yaxis_title=ytitle, hovermode="closest",
                      margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      title=VIEWS.get(view, "Mean per layer") + (" with 95% confidence bands" if view in (
                          "mean", "relative") else "") + (" · ▲ layers where the groups differ" if significant
                                                          else ""))
    return fig


def heatmap_figure(matrix: pd.DataFrame, metric: str, *, centred: bool = False) -> go.Figure:
    """Layers (rows, depth order) x groups (columns) of mean sparsity.

    ``centred``: each cell minus its layer's mean over the groups, on a diverging scale.  Depth changes the
    metric far more than breed does, so uncentred the map mostly shows the layers; centred it shows which
    breeds sit above or below the others at each layer.
    """
    names = matrix.attrs.get("layer_names", {})
    y = [f"{i} {names.get(i, '')}".strip() for i in matrix.index]
    z = matrix.sub(matrix.mean(axis=1), axis=0) if centred else matrix
    scale: dict[str, Any] = ({"colorscale": "RdBu_r", "zmid": 0.0} if centred else {"colorscale": "Viridis"})
    label = f"{metric} − layer mean" if centred else metric
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=[str(c) for c in matrix.columns], y=y, **scale,
                               colorbar={"title": {"text": label}},
                               hovertemplate="%{x}<br>%{y}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(height=max(420, 14 * len(y) + 160), yaxis={"autorange": "reversed"},
                      xaxis={"tickangle": -45}, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      title=f"{'Centred mean' if centred else 'Mean'} {metric} per layer and "
                            f"{matrix.columns.name or 'group'}")
    return fig


def marked_table(stats_table: pd.DataFrame, **formats: str) -> None:
    """A per-layer test table with a ★ column for the layers significant after correction; p-values in
    scientific notation, other columns by ``formats`` (column -> printf format)."""
    table = stats_table.assign(marked=np.where(stats_table["significant"], "★", ""))
    for col in ("p_value", "p_adjusted"):
        if col in table.columns:
            table[col] = table[col].map(format_p)
    config: dict[str, Any] = {"marked": st.column_config.TextColumn("", help="★ significant after correction")}
    config.update({col: st.column_config.NumberColumn(format=fmt) for col, fmt in formats.items()})
    st.dataframe(table[["marked", *stats_table.columns]], hide_index=True, column_config=config)


def correlation_figure(corr: pd.DataFrame, label: str, metric: str) -> go.Figure:
    """Spearman's rho per layer; significant layers (after correction) as filled markers."""
    sig = corr["significant"].astype(bool)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=corr["layer_index"], y=corr["rho"], mode="lines+markers", name="rho",
                             marker={"symbol": np.where(sig, "circle", "circle-open"), "size": 8},
                             customdata=np.stack([corr["layer_name"], corr["p_adjusted"]], axis=1),
                             hovertemplate="layer %{x} (%{customdata[0]})<br>rho %{y:.3f}<br>"
                                           "BH-adjusted p %{customdata[1]:.2e}<extra></extra>"))
    fig.add_hline(y=0, line={"color": "#999999", "width": 1})
    fig.update_layout(title=f"Spearman correlation of {metric} with {label}, by depth", height=340,
                      xaxis_title="layer (input → output)", yaxis_title="Spearman rho", showlegend=False,
                      margin={"t": 50, "b": 40})
    return fig


def _numeric_section(key: state.StoreKey, store: Any, model: str, metric: str) -> None:
    numeric = [c for c in state.label_columns(store) if c in store.images.columns
               and not state.is_categorical(store.images[c]) and store.images[c].notna().sum() >= 3]
    if not numeric:
        return
    st.subheader("Numeric labels")
    label = st.selectbox("Numeric label", numeric, key="sparsity-numeric-label")
    try:
        corr = state.numeric_correlations(key, model, metric, label)
    except ValueError as e:
        st.warning(str(e))
        return
    n_sig = int(corr["significant"].sum())
    st.caption(f"{corr.attrs.get('test', 'Spearman rho')}, {corr.attrs.get('correction', 'BH')}. "
               f"{n_sig} of {len(corr)} layers correlate at α = 0.05 (filled markers).")
    st.plotly_chart(correlation_figure(corr, label, metric), key="sparsity-correlations")
    marked_table(corr, rho="%.3f")


def render() -> None:
    """Model, metric and label selectors; curves, the per-layer test table and a per-breed heat map."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Activation sparsity")
    picked = widgets.sparsity_selectors(key, store, "sparsity")
    if picked is None:
        return
    model, metric, label = picked

    try:
        with st.spinner("Computing curves and tests…"):
            curves = state.depth_curves(key, model, metric, label)
            tests = state.group_tests(key, model, metric, label)
    except ValueError as e:  # e.g. a label no image has: the library explains which
        st.warning(str(e))
        return

    groups = [g for g in curves["group"].unique().tolist() if g != "all"]
    sizes = curves.groupby("group")["n"].max()
    default = sorted(groups, key=lambda g: -int(sizes[g]))[:MAX_GROUPS_DEFAULT]
    chosen = st.multiselect("Groups", groups, default=default, key=f"sparsity-groups-{label}")
    st.caption(f"**{metric}**: {DEFINITIONS.get(metric, 'see indexer/sparsity/metrics.py')}.")
    c1, c2 = st.columns([3, 1])
    view = c1.radio("View", list(VIEWS), format_func=VIEWS.__getitem__, horizontal=True, key="sparsity-view",
                    help="Depth changes sparsity far more than the groups do: relative to the pooled curve, the "
                         "groups' differences are what is left")
    show_all = c2.checkbox("Pooled curve", True, key="sparsity-all", help="all images together")
    significant = set(tests.loc[tests["significant"], "layer_index"].astype(int))
    st.markdown(summary_sentence(curves, tests, chosen, metric))
    st.plotly_chart(depth_figure(view_curves(curves, view), (["all"] if show_all else []) + chosen, significant,
                                 metric, view), key="sparsity-curves")
    if curves.attrs.get("dropped_groups"):
        st.caption("Left out (fewer than 2 images): " + ", ".join(curves.attrs["dropped_groups"]))

    st.subheader("Do the groups differ, layer by layer?")
    st.caption(f"{tests.attrs.get('test', 'Kruskal-Wallis H')}, {tests.attrs.get('correction', 'BH')}; "
               f"effect size ε² (share of the ranks' variance the groups explain: 0.01 small, 0.08 medium, 0.26 "
               f"large). {len(significant)} of {len(tests)} layers differ at α = 0.05; with hundreds of photos "
               "per group even small effects are significant, so read ε².")
    marked_table(tests, statistic="%.2f", effect_size="%.3f")

    _numeric_section(key, store, model, metric)

    st.subheader("Per breed")
    if "breed" not in store.images.columns or store.images["breed"].notna().sum() == 0:
        st.info("No breed labels in this store.")
        return
    try:
        matrix = state.breed_heatmap(key, model, metric, "breed")
    except ValueError as e:
        st.warning(str(e))
        return
    centred = st.toggle("Centre each layer (show breeds relative to the layer's mean)", True,
                        key="sparsity-centred")
    st.plotly_chart(heatmap_figure(matrix, metric, centred=centred), key="sparsity-heatmap")
