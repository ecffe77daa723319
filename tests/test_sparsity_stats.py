"""Sparsity versus labels: planted effects are found, nulls are not, intervals and differences are right.

Synthetic long tables have the store's sparsity columns (id, model, layer_index, layer_name, metric, value); the
null checks also run on the real pets store's encoder sparsity with permuted breeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis.sparsity_stats import (
    ALL_GROUP,
    breed_heatmap,
    contextual_sparsity,
    depth_curves,
    depth_differences,
    group_tests,
    layer_names,
    numeric_correlations,
    sparsity_matrix,
)
from indexer.store import Store, schema

# ------------------------------------------------------------------------------------------------- builders


def image_id(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def long_table(values: np.ndarray, ids: Sequence[str], *, model: str = "encoder", metric: str = "hoyer",
               ) -> pd.DataFrame:
    """(n_images, n_layers) values as the store's long sparsity table (one model and metric)."""
    n, layers = values.shape
    return pd.DataFrame({
        "id": np.repeat(np.asarray(ids, dtype=object), layers),
        "model": model,
        "layer_index": np.tile(np.arange(layers, dtype=np.int32), n),
        "layer_name": [f"blocks.{k}.act" for k in np.tile(np.arange(layers), n)],
        "metric": metric,
        "value": values.ravel().astype(np.float64),
    })


def planted_groups(seed: int = 0, *, groups: int = 3, per_group: int = 40, layers: int = 12,
                   shifted: Sequence[int] = range(6, 12), shift: float = 0.04, sd: float = 0.05,
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sparsity ~ N(0.5, sd) per image and layer; at ``shifted`` layers group g adds g * shift."""
    rng = np.random.default_rng(seed)
    n = groups * per_group
    ids = [image_id(i) for i in range(n)]
    g = np.repeat(np.arange(groups), per_group)
    values = rng.normal(0.5, sd, size=(n, layers))
    for k in shifted:
        values[:, k] += g * shift
    labels = pd.DataFrame({"breed": [f"breed_{chr(97 + x)}" for x in g]}, index=pd.Index(ids, name="id"))
    return long_table(values, ids), labels


def make_store(path: Path, sparsity: pd.DataFrame, labels: pd.DataFrame, *, dim: int = 8, seed: int = 0) -> Path:
    """A real on-disk store holding ``labels``' images (random unit vectors) and the given sparsity rows."""
    rng = np.random.default_rng(seed)
    ids = labels.index.astype(str).tolist()
    now = pd.Timestamp("2024-01-01", tz="UTC")
    rows = pd.DataFrame({
        "id": ids,
        "faiss_id": [schema.faiss_id_of(i) for i in ids],
        "path": [f"/photos/{i[:8]}.jpg" for i in ids],
        "relpath": [f"{i[:8]}.jpg" for i in ids],
        "species": ["dog"] * len(ids),
        "breed": labels["breed"].to_numpy() if "breed" in labels else None,
        "dataset": "synthetic",
        "layout": "flat",
        "width": np.full(len(ids), 64, dtype=np.int32),
        "height": np.full(len(ids), 48, dtype=np.int32),
        "indexed_at": [now] * len(ids),
    })
    for col in labels.columns:
        if col not in rows.columns:
            rows[col] = labels[col].to_numpy()
    store = Store.create(path, {"name": "synthetic", "dim": dim, "weights_sha256": "0" * 64})
    vecs = rng.normal(size=(len(ids), dim)).astype(np.float32)
    store.add_images(rows, {schema.ENCODER_SPACE: vecs / np.linalg.norm(vecs, axis=1, keepdims=True)})
    for model, part in sparsity.groupby("model"):
        store.add_sparsity(part.reset_index(drop=True), str(model), {"model_sha256": "0" * 64, "threshold": 0.01})
    store.commit()
    store.close()
    return path


# ------------------------------------------------------------------------------------------------- group tests


def test_planted_group_difference_is_found_at_its_layers_only() -> None:
    sparsity, labels = planted_groups()
    res = group_tests(sparsity, "encoder", "hoyer", "breed", labels=labels)
    assert res["layer_index"].tolist() == list(range(12))
    assert (res["n"] == 120).all() and (res["k_groups"] == 3).all()
    sig = set(res.loc[res["significant"], "layer_index"])
    assert set(range(6, 12)) <= sig
    assert len(sig & set(range(6))) <= 1  # BH at 5%: the unshifted layers are mostly not flagged
    assert res.loc[res["layer_index"] >= 6, "effect_size"].min() > res.loc[res["layer_index"] < 6,
                                                                           "effect_size"].max()
    # Wiring: SciPy's Kruskal-Wallis per layer, statsmodels' BH across layers, epsilon² = H/(n-1).
    layer7 = sparsity[sparsity["layer_index"] == 7].set_index("id")["value"]
    samples = [layer7[labels.index[labels["breed"] == b]].to_numpy() for b in sorted(labels["breed"].unique())]
    h, p = stats.kruskal(*samples)
    row = res.set_index("layer_index").loc[7]
    assert row["statistic"] == pytest.approx(h) and row["p_value"] == pytest.approx(p)
    assert row["effect_size"] == pytest.approx(h / ((120**2 - 1) / (120 + 1)))
    np.testing.assert_allclose(res["p_adjusted"], multipletests(res["p_value"], method="fdr_bh")[1])
    assert res.attrs["effect_size"].startswith("epsilon²")


def test_null_groups_give_no_discoveries_after_correction() -> None:
    """Pure noise, 40 independent data sets of 15 layers: BH keeps the share of data sets with any false
    discovery near alpha (its FWER under the global null), while uncorrected p-values would flag most of them."""
    any_bh = any_raw = 0
    for seed in range(40):
        sparsity, labels = planted_groups(seed + 100, groups=4, per_group=25, layers=15, shifted=())
        res = group_tests(sparsity, "encoder", "hoyer", "breed", labels=labels, alpha=0.05)
        any_bh += bool(res["significant"].any())
        any_raw += bool((res["p_value"] < 0.05).any())
    assert any_bh <= 6  # expected 2 of 40; P(Binomial(40, 0.05) > 6) < 0.002
    assert any_raw >= 15  # 1 - 0.95**15 = 54% expected: the correction is what keeps any_bh down
    # And the first data set on its own:
    sparsity, labels = planted_groups(100, groups=4, per_group=25, layers=15, shifted=())
    assert not group_tests(sparsity, "encoder", "hoyer", "breed", labels=labels)["significant"].any()


def test_shuffled_breeds_on_real_encoder_sparsity_give_no_significant_layer(pets_store: Path) -> None:
    store = Store.open(pets_store)
    sp = store.sparsity()
    assert len(sp) and (sp["model"] == "encoder").any(), "the pets store has no encoder sparsity rows"
    labels = store.images.set_index("id")[["breed"]].copy()
    # Positive control: the true breeds do differ in encoder sparsity, so finding nothing below is the
    # permutation's doing, not a test without power.
    assert group_tests(store, "encoder", "hoyer", "breed")["significant"].sum() >= 5
    rng = np.random.default_rng(0)
    labels["breed"] = rng.permutation(labels["breed"].to_numpy())
    for metric in ("hoyer", "near_zero_fraction"):
        res = group_tests(store, "encoder", metric, "breed", labels=labels)
        assert len(res) >= 5 and (res["k_groups"] >= 30).all()
        assert not res["significant"].any(), res.loc[res["significant"]]
    # A numeric label unrelated to the photos: no layer correlates with it either.
    labels["noise"] = rng.normal(size=len(labels))
    corr = numeric_correlations(store, "encoder", "hoyer", "noise", labels=labels)
    assert not corr["significant"].any(), corr.loc[corr["significant"]]


def test_store_and_frame_sources_agree(tmp_path: Path) -> None:
    sparsity, labels = planted_groups(3, per_group=10, layers=4, shifted=(2, 3))
    path = make_store(tmp_path / "s", sparsity, labels)
    store = Store.open(path)
    a = group_tests(store, "encoder", "hoyer", "breed")
    b = group_tests(sparsity, "encoder", "hoyer", "breed", labels=labels)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(depth_curves(store, "encoder", "hoyer", "breed"),
                                  depth_curves(sparsity, "encoder", "hoyer", "breed", labels=labels))


def test_missing_labels_and_singleton_groups_are_left_out_and_order_is_deterministic() -> None:
    sparsity, labels = planted_groups(5, per_group=12, layers=5, shifted=(4,))
    labels = labels.copy()
    labels.iloc[:3, 0] = None  # three images without a breed
    labels.iloc[-1, 0] = "lonely_breed"  # a one-image group
    res = group_tests(sparsity, "encoder", "hoyer", "breed", labels=labels)
    assert (res["n"] == 36 - 3 - 1).all() and (res["k_groups"] == 3).all()
    assert res.attrs["dropped_groups"] == ["lonely_breed"]
    curves = depth_curves(sparsity, "encoder", "hoyer", "breed", labels=labels)
    assert "lonely_breed" not in set(curves["group"])
    assert curves.loc[curves["group"] == ALL_GROUP, "n"].eq(32).all()
    # Row order of the input does not matter.
    shuffled = sparsity.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(res, group_tests(shuffled, "encoder", "hoyer", "breed", labels=labels))
    pd.testing.assert_frame_equal(curves, depth_curves(shuffled, "encoder", "hoyer", "breed", labels=labels))
    assert curves["group"].tolist()[:5] == [ALL_GROUP] * 5
    assert curves["group"].drop_duplicates().tolist() == [ALL_GROUP, "breed_a", "breed_b", "breed_c"]


def test_unknown_model_metric_or_label_is_a_clear_error() -> None:
    sparsity, labels = planted_groups(0, per_group=5, layers=2, shifted=())
    with pytest.raises(ValueError, match="models: encoder"):
        group_tests(sparsity, "vae", "hoyer", "breed", labels=labels)
    with pytest.raises(ValueError, match="metrics: hoyer"):
        group_tests(sparsity, "encoder", "gini", "breed", labels=labels)
    with pytest.raises(ValueError, match="no label column 'colour'"):
        group_tests(sparsity, "encoder", "hoyer", "colour", labels=labels)
    with pytest.raises(ValueError, match="not numeric"):
        numeric_correlations(sparsity, "encoder", "hoyer", "breed", labels=labels)
    with pytest.raises(ValueError, match="duplicate"):
        sparsity_matrix(pd.concat([sparsity, sparsity.iloc[:1]]), "encoder", "hoyer")


# ------------------------------------------------------------------------------------------------- correlations


def test_numeric_correlation_finds_planted_monotone_relation_and_nothing_when_shuffled() -> None:
    rng = np.random.default_rng(7)
    n, layers = 150, 10
    ids = [image_id(i) for i in range(n)]
    rating = rng.integers(1, 6, size=n).astype(float)  # 1-5 stars: many ties
    values = rng.normal(0.4, 0.05, size=(n, layers))
    for k in (5, 6, 7, 8, 9):
        values[:, k] += 0.05 * np.log(rating)  # monotone, not linear
    sparsity = long_table(values, ids)
    labels = pd.DataFrame({"rating": rating}, index=pd.Index(ids, name="id"))
    res = numeric_correlations(sparsity, "encoder", "hoyer", "rating", labels=labels)
    assert res.columns.tolist() == ["layer_index", "layer_name", "n", "rho", "p_value", "p_adjusted", "significant"]
    assert set(res.loc[res["significant"], "layer_index"]) == {5, 6, 7, 8, 9}
    assert (res.loc[res["layer_index"] >= 5, "rho"] > 0.35).all()
    rho, p = stats.spearmanr(values[:, 6], rating)
    assert res.loc[6, "rho"] == pytest.approx(rho) and res.loc[6, "p_value"] == pytest.approx(p)
    shuffled = labels.assign(rating=np.random.default_rng(1).permutation(rating))
    null = numeric_correlations(sparsity, "encoder", "hoyer", "rating", labels=shuffled)
    assert not null["significant"].any()
    assert null["rho"].abs().max() < 0.3


# ------------------------------------------------------------------------------------------------- curves


def test_depth_curves_interval_contains_mean_and_shrinks_with_more_samples() -> None:
    small, labels_s = planted_groups(11, per_group=15, layers=6, shifted=(3, 4, 5))
    large, labels_l = planted_groups(12, per_group=400, layers=6, shifted=(3, 4, 5))
    cs = depth_curves(small, "encoder", "hoyer", "breed", labels=labels_s)
    cl = depth_curves(large, "encoder", "hoyer", "breed", labels=labels_l)
    assert cs.columns.tolist() == ["group", "layer_index", "layer_name", "n", "mean", "sd", "ci_low", "ci_high"]
    for c in (cs, cl):
        assert ((c["ci_low"] < c["mean"]) & (c["mean"] < c["ci_high"])).all()
    width_s = (cs["ci_high"] - cs["ci_low"]).to_numpy()
    width_l = (cl["ci_high"] - cl["ci_low"]).to_numpy()
    assert (width_l < width_s / 3).all()  # sqrt(400/15) ≈ 5.2
    # One cell against SciPy's t interval.
    vals = small[small["layer_index"] == 4].set_index("id")["value"][labels_s.index[labels_s["breed"] == "breed_b"]]
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=stats.sem(vals))
    row = cs[(cs["group"] == "breed_b") & (cs["layer_index"] == 4)].iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert row["n"] == 15 and row["layer_name"] == "blocks.4.act"


def test_depth_curve_intervals_cover_the_true_mean_at_their_level() -> None:
    """300 groups of 12 draws from a skewed Beta(2, 8) (mean 0.2): the 90% t-intervals cover 0.2 about 90%."""
    rng = np.random.default_rng(3)
    groups, per = 300, 12
    n = groups * per
    ids = [image_id(i) for i in range(n)]
    sparsity = long_table(rng.beta(2, 8, size=(n, 1)), ids)
    labels = pd.DataFrame({"g": np.repeat([f"g{i:03d}" for i in range(groups)], per)}, index=pd.Index(ids))
    c = depth_curves(sparsity, "encoder", "hoyer", "g", confidence=0.9, labels=labels)
    c = c[c["group"] != ALL_GROUP]
    coverage = ((c["ci_low"] <= 0.2) & (c["ci_high"] >= 0.2)).mean()
    assert 0.84 <= coverage <= 0.95


def test_depth_differences_are_first_and_second_differences_of_the_means() -> None:
    sparsity, labels = planted_groups(2, per_group=10, layers=9, shifted=(5, 6, 7, 8))
    curves = depth_curves(sparsity, "encoder", "hoyer", "breed", labels=labels)
    diffs = depth_differences(curves)
    assert diffs.columns.tolist() == ["group", "layer_index", "rate", "acceleration"]
    for g in (ALL_GROUP, "breed_a", "breed_c"):
        mean = curves.loc[curves["group"] == g].sort_values("layer_index")["mean"].to_numpy()
        d = diffs.loc[diffs["group"] == g].sort_values("layer_index")
        np.testing.assert_allclose(d["rate"].to_numpy()[1:], np.diff(mean))
        np.testing.assert_allclose(d["acceleration"].to_numpy()[2:], np.diff(mean, n=2))
        assert np.isnan(d["rate"].iloc[0]) and d["acceleration"].iloc[:2].isna().all()
    # Input order does not matter.
    pd.testing.assert_frame_equal(diffs, depth_differences(curves.sample(frac=1.0, random_state=0)))


def test_contextual_sparsity_standardises_and_ranks_within_each_layer() -> None:
    rng = np.random.default_rng(4)
    ids = [image_id(i) for i in range(50)]
    values = rng.gamma(2.0, 0.1, size=(50, 3))
    values[:, 2] = 0.7  # a constant layer
    values[0, 1] = np.nan
    ctx = contextual_sparsity(long_table(values, ids), "encoder", "hoyer")
    assert ctx.columns.tolist() == ["id", "layer_index", "layer_name", "value", "z", "percentile"]
    layer0 = ctx[ctx["layer_index"] == 0]
    assert layer0["z"].mean() == pytest.approx(0.0, abs=1e-12) and layer0["z"].std() == pytest.approx(1.0)
    pop = layer0["value"].to_numpy()
    expected = [stats.percentileofscore(pop, v, kind="mean") for v in pop]
    np.testing.assert_allclose(layer0["percentile"], expected)
    layer1 = ctx[ctx["layer_index"] == 1]
    assert layer1["z"].isna().sum() == 1 and layer1["percentile"].between(0, 100).sum() == 49
    layer2 = ctx[ctx["layer_index"] == 2]
    assert (layer2["z"] == 0).all() and (layer2["percentile"] == 50).all()


def test_matrix_heatmap_and_layer_names() -> None:
    sparsity, labels = planted_groups(6, per_group=8, layers=4, shifted=(3,))
    wide = sparsity_matrix(sparsity, "encoder", "hoyer")
    assert wide.shape == (24, 4) and wide.columns.tolist() == [0, 1, 2, 3]
    assert wide.index.is_monotonic_increasing
    first = sparsity[(sparsity["id"] == wide.index[0]) & (sparsity["layer_index"] == 2)]["value"].iloc[0]
    assert wide.iloc[0, 2] == first
    assert layer_names(sparsity, "encoder").tolist() == [f"blocks.{k}.act" for k in range(4)]
    heat = breed_heatmap(sparsity, "encoder", "hoyer", labels=labels)
    assert heat.shape == (4, 3) and heat.columns.tolist() == ["breed_a", "breed_b", "breed_c"]
    joined = sparsity.join(labels, on="id")
    expected = joined.groupby(["layer_index", "breed"])["value"].mean().unstack()
    np.testing.assert_allclose(heat.to_numpy(), expected.to_numpy())
    assert heat.loc[3, "breed_c"] - heat.loc[3, "breed_a"] == pytest.approx(0.08, abs=0.05)
