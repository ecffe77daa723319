"""Data quality: near-duplicate photos, likely label errors and outliers, each with thumbnails and a CSV."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state, widgets

SHOWN = 24  # thumbnails per finding; the CSV holds every row


def _csv_button(df: pd.DataFrame, name: str, key: str) -> None:
    st.download_button(f"Download {name}.csv ({len(df):,} rows)", df.to_csv(index=False).encode(),
                       file_name=f"{name}.csv", mime="text/csv", key=key)


def _duplicates(key: state.StoreKey, dups: pd.DataFrame, summary: dict) -> None:
    s, p = summary["duplicates"], summary["params"]
    st.caption(f"Pairs of nearest neighbours (cosine ≥ {p['duplicate_min_cosine']}) whose perceptual hashes "
               f"differ in at most {p['duplicate_max_hash_bits']} of 64 bits: re-encoded, resized or lightly "
               f"edited copies. {s['candidates']:,} candidate pairs were checked. Byte-identical files are indexed "
               "once and never appear here.")
    if dups.empty:
        st.success("No near-duplicates found.")
        return
    for row in dups.head(SHOWN // 2).itertuples():
        widgets.gallery(key, [str(row.id_a), str(row.id_b)],
                        [f"group {row.group} · {row.kind}", f"{row.hash_bits} bits · cos {row.cosine:.3f}"],
                        width=120)
    if len(dups) > SHOWN // 2:
        st.caption(f"… and {len(dups) - SHOWN // 2:,} more pairs in the table and CSV.")
    st.dataframe(dups, hide_index=True)
    _csv_button(dups, "duplicates", "quality-dups-csv")


def _labels(key: state.StoreKey, issues: pd.DataFrame, summary: dict) -> None:
    s, p = summary["label_issues"], summary["params"]
    if "skipped" in s:
        st.info(f"Label check skipped: {s['skipped']}.")
        return
    st.caption(f"A logistic regression on the embeddings predicts each photo's {s['label']} without seeing it "
               f"({p['folds']}-fold; out-of-fold accuracy {s['out_of_fold_accuracy']:.1%}). cleanlab "
               f"flagged {s['flagged']} labels; **likely** errors are those whose label the model gives a "
               f"probability below {p['label_max_probability']}. The rest are usually look-alike breeds.")
    likely = issues[issues["likely"]]
    if likely.empty:
        st.success("No likely label errors.")
    else:
        widgets.gallery(key, likely["id"].head(SHOWN).tolist(),
                        [f"{g} → {s_} ({p:.3f})" for g, s_, p in zip(likely["given"], likely["suggested"],
                                                                   likely["given_probability"], strict=True)][:SHOWN],
                        width=120)
    st.dataframe(issues, hide_index=True)
    _csv_button(issues, "label_issues", "quality-labels-csv")


def _outliers(key: state.StoreKey, outliers: pd.DataFrame, summary: dict) -> None:
    s, p = summary["outliers"], summary["params"]
    st.caption(f"Score: mean cosine distance to the {p['k']} nearest photos (median "
               f"{s['median_score']}). The top {p['outlier_flag_fraction']:.0%} are flagged: photos unlike the "
               "rest, such as a dog among cats, a drawing or a screenshot.")
    flagged = outliers[outliers["flagged"]]
    widgets.gallery(key, flagged["id"].head(SHOWN).tolist(),
                    [f"#{r} · {sc:.3f}" for r, sc in zip(flagged["rank"], flagged["score"], strict=True)][:SHOWN],
                    width=120)
    st.dataframe(outliers.head(1000), hide_index=True)
    _csv_button(outliers, "outliers", "quality-outliers-csv")


def render() -> None:
    """Pick the label to check; run the three checks once per store version (cached); show each finding."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Data quality")
    labels = [c for c in state.label_columns(store) if state.is_categorical(store.images[c])]
    label = st.selectbox("Label to check", labels or ["breed"], key="quality-label",
                         index=labels.index("breed") if "breed" in labels else 0)
    with st.spinner("Checking duplicates, labels and outliers (first time only; cached after)…"):
        dups, issues, outliers, summary = state.quality(key, label, ("duplicates", "labels", "outliers"))
    c1, c2, c3 = st.columns(3)
    c1.metric("Near-duplicate pairs", f"{len(dups):,}")
    li = summary["label_issues"]
    c2.metric("Likely label errors", "n/a" if "skipped" in li else f"{li['likely']:,}")
    c3.metric("Outliers flagged", f"{summary['outliers']['flagged']:,}")
    tab_d, tab_l, tab_o = st.tabs(["Duplicates", "Label errors", "Outliers"])
    with tab_d:
        _duplicates(key, dups, summary)
    with tab_l:
        _labels(key, issues, summary)
    with tab_o:
        _outliers(key, outliers, summary)
