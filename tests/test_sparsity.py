"""Activation sparsity: the metrics against hand-computed values, the hook plumbing, and a real timm encoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn

from indexer.sparsity import (
    DEFAULT_THRESHOLD,
    METRICS,
    SPARSITY_SCHEMA,
    SparsityRecorder,
    activation_layers,
    sparsity_metrics,
)
from indexer.sparsity.metrics import _sparsity_metrics
from tests.conftest import PETS

# ------------------------------------------------------------------------------------------------- references
# Textbook formulas in plain Python (no torch, no numpy), written independently of indexer.sparsity.


def ref_hoyer(a: list[float]) -> float:
    n = len(a)
    l1 = sum(abs(x) for x in a)
    l2 = math.sqrt(sum(x * x for x in a))
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)


def ref_gini(a: list[float]) -> float:
    """Hurley & Rickard 2009: G = 1 - 2 * sum_k (c_k / ||c||_1) * ((n - k + 1/2) / n), c sorted ascending."""
    c = sorted(abs(x) for x in a)
    n = len(c)
    l1 = sum(c)
    return 1 - 2 * sum((c[k - 1] / l1) * ((n - k + 0.5) / n) for k in range(1, n + 1))


def ref_near_zero(a: list[float], threshold: float) -> float:
    scale = max(abs(x) for x in a)
    return sum(1 for x in a if abs(x) <= threshold * scale) / len(a)


def ref_ratio(a: list[float]) -> float:
    return sum(abs(x) for x in a) / math.sqrt(sum(x * x for x in a))


def ref_metrics(a: list[float], threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    return {
        "near_zero_fraction": ref_near_zero(a, threshold),
        "hoyer": ref_hoyer(a),
        "gini": ref_gini(a),
        "l1_l2_ratio": ref_ratio(a),
    }


def assert_metrics(got: dict[str, torch.Tensor], expected: list[dict[str, float]]) -> None:
    assert list(got) == list(METRICS)
    for name in METRICS:
        assert got[name].dtype == torch.float64
        assert got[name].shape == (len(expected),)
        assert got[name].tolist() == pytest.approx([e[name] for e in expected], abs=1e-9), name


# ------------------------------------------------------------------------------------------------- a known network


def planted_net() -> nn.Sequential:
    """Linear(4,6) -> ReLU -> Linear(6,3) -> ReLU with hand-set weights (activations worked out below)."""
    first, second = nn.Linear(4, 6), nn.Linear(6, 3)
    with torch.no_grad():
        first.weight.copy_(
            torch.tensor(
                [
                    [1.0, 0.0, 0.0, 0.0],  # h0 = x0
                    [0.0, 1.0, 0.0, 0.0],  # h1 = x1
                    [-1.0, 0.0, 0.0, 0.0],  # h2 = -x0
                    [0.0, 0.0, 1.0, 0.0],  # h3 = x2 - 1
                    [0.0, 0.0, 0.0, 1.0],  # h4 = x3
                    [0.0, 0.0, 0.0, 0.0],  # h5 = -1: always dead
                ]
            )
        )
        first.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, -1.0]))
        second.weight.copy_(
            torch.tensor(
                [
                    [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # g0 = h0 + h1
                    [0.0, 0.0, 0.0, 0.0, -1.0, 0.0],  # g1 = -h4 (<= 0: dead)
                    [0.0, -1.0, 0.0, 1.0, 0.0, 0.0],  # g2 = h3 - h1 + 0.5
                ]
            )
        )
        second.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU())


PLANTED_X = torch.tensor([[2.0, 1.0, 0.0, 3.0], [-1.0, 4.0, 5.0, 1.0]])
# By hand: image A: pre-ReLU [2, 1, -2, -1, 3, -1] -> h = [2, 1, 0, 0, 3, 0]; g = [3, -3, -0.5] -> [3, 0, 0]
#          image B: pre-ReLU [-1, 4, 1, 4, 1, -1] -> h = [0, 4, 1, 4, 1, 0]; g = [4, -1, 0.5] -> [4, 0, 0.5]
H_A, H_B = [2.0, 1.0, 0.0, 0.0, 3.0, 0.0], [0.0, 4.0, 1.0, 4.0, 1.0, 0.0]
G_A, G_B = [3.0, 0.0, 0.0], [4.0, 0.0, 0.5]


def test_planted_activations_are_what_the_hand_computation_says() -> None:
    net = planted_net()
    with torch.no_grad():
        h = net[1](net[0](PLANTED_X))
        g = net[3](net[2](h))
    assert h.tolist() == [H_A, H_B]
    assert g.tolist() == [G_A, G_B]


def test_planted_network_metrics_by_hand() -> None:
    net = planted_net()
    with SparsityRecorder(net, "planted") as rec, torch.no_grad(), rec.record(["A", "B"]):
        net(PLANTED_X)
    df = rec.frame()
    assert rec.layer_names == ["1", "3"]
    got = {(r.id, r.layer_index, r.metric): r.value for r in df.itertuples()}
    s6, s3 = math.sqrt(6), math.sqrt(3)
    # Worked by hand (threshold 0.01 of the max, so only exact zeros are near zero here):
    expected = {
        # h_A = [2,1,0,0,3,0]: L1 = 6, L2 = sqrt(14); sorted [0,0,0,1,2,3] -> G = 1 - 2 * (2.5 + 3 + 1.5) / 36 = 11/18
        ("A", 0): {"near_zero_fraction": 3 / 6, "l1_l2_ratio": 6 / math.sqrt(14),
                   "hoyer": (s6 - 6 / math.sqrt(14)) / (s6 - 1), "gini": 11 / 18},
        # h_B = [0,4,1,4,1,0]: L1 = 10, L2 = sqrt(34); sorted [0,0,1,1,4,4] -> G = 1 - 2 * (3.5+2.5+6+2) / 60 = 8/15
        ("B", 0): {"near_zero_fraction": 2 / 6, "l1_l2_ratio": 10 / math.sqrt(34),
                   "hoyer": (s6 - 10 / math.sqrt(34)) / (s6 - 1), "gini": 8 / 15},
        # g_A = [3,0,0]: one non-zero entry -> Hoyer 1, Gini 1 - 1/3, L1/L2 = 1
        ("A", 1): {"near_zero_fraction": 2 / 3, "l1_l2_ratio": 1.0, "hoyer": 1.0, "gini": 2 / 3},
        # g_B = [4,0,0.5]: L1 = 4.5, L2 = sqrt(16.25); sorted [0,.5,4] -> G = 1 - 2 * (0.75 + 2) / 13.5 = 16/27
        ("B", 1): {"near_zero_fraction": 1 / 3, "l1_l2_ratio": 4.5 / math.sqrt(16.25),
                   "hoyer": (s3 - 4.5 / math.sqrt(16.25)) / (s3 - 1), "gini": 16 / 27},
    }  # fmt: skip
    assert len(df) == 2 * 2 * len(METRICS)
    for (image, layer), metrics in expected.items():
        for metric, value in metrics.items():
            assert got[(image, layer, metric)] == pytest.approx(value, abs=1e-9), (image, layer, metric)
    # The same numbers from the plain-Python textbook formulas.
    for (image, layer), vec in {("A", 0): H_A, ("B", 0): H_B, ("A", 1): G_A, ("B", 1): G_B}.items():
        for metric, value in ref_metrics(vec).items():
            assert got[(image, layer, metric)] == pytest.approx(value, abs=1e-9), (image, layer, metric)


def test_threshold_is_relative_to_the_max() -> None:
    # h_A = [2,1,0,0,3,0], max 3: threshold 0.4 -> |a| <= 1.2 counts the three zeros and the 1.
    got = sparsity_metrics(torch.tensor([H_A]), threshold=0.4)
    assert got["near_zero_fraction"].item() == pytest.approx(4 / 6)
    # threshold 0: exact zeros only
    assert sparsity_metrics(torch.tensor([H_A]), threshold=0.0)["near_zero_fraction"].item() == pytest.approx(0.5)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError):
            sparsity_metrics(torch.tensor([H_A]), threshold=bad)


# ------------------------------------------------------------------------------------------------- edge cases


def test_all_zero_activations() -> None:
    got = sparsity_metrics(torch.zeros(2, 3, 4))
    assert_metrics(got, [{"near_zero_fraction": 1.0, "hoyer": 1.0, "gini": 1.0, "l1_l2_ratio": 0.0}] * 2)


def test_one_non_zero_entry() -> None:
    n = 5
    acts = torch.tensor([[0.0, 0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1e-3]])
    one = {"near_zero_fraction": (n - 1) / n, "hoyer": 1.0, "gini": 1 - 1 / n, "l1_l2_ratio": 1.0}
    assert_metrics(sparsity_metrics(acts), [one, one])


def test_all_equal_magnitudes() -> None:
    n = 9
    acts = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0, 2.0, -2.0, 2.0, 2.0], [0.25] * 9])
    flat = {"near_zero_fraction": 0.0, "hoyer": 0.0, "gini": 0.0, "l1_l2_ratio": math.sqrt(n)}
    assert_metrics(sparsity_metrics(acts), [flat, flat])


def test_single_entry_per_image() -> None:
    # n == 1: a non-zero unit is not sparse (Hoyer and Gini 0, L1/L2 = 1 = sqrt(1)); a zero one is all-zero.
    got = sparsity_metrics(torch.tensor([[5.0], [0.0], [-2.0]]))
    nonzero = {"near_zero_fraction": 0.0, "hoyer": 0.0, "gini": 0.0, "l1_l2_ratio": 1.0}
    zero = {"near_zero_fraction": 1.0, "hoyer": 1.0, "gini": 1.0, "l1_l2_ratio": 0.0}
    assert_metrics(got, [nonzero, zero, nonzero])
    assert_metrics(sparsity_metrics(torch.tensor([7.0])), [nonzero])  # (B,) is B images of one entry


def test_non_finite_activations_give_nan_for_that_image_only() -> None:
    acts = torch.tensor([[1.0, float("nan"), 0.0], [1.0, float("inf"), 0.0], [1.0, 2.0, 0.0]])
    got = sparsity_metrics(acts)
    for name in METRICS:
        assert math.isnan(got[name][0].item()) and math.isnan(got[name][1].item())
        assert got[name][2].item() == pytest.approx(ref_metrics([1.0, 2.0, 0.0])[name])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        sparsity_metrics(torch.tensor(1.0))
    with pytest.raises(ValueError):
        sparsity_metrics(torch.zeros(2, 0))
    with pytest.raises(TypeError):
        sparsity_metrics(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("threaded_from", [0, None], ids=["per-image-threads", "small-layer-arrays"])
def test_random_vectors_match_the_textbook_formulas_on_both_sort_paths(
        threaded_from: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.sparsity.metrics as sp

    if threaded_from is not None:  # these small layers would take the all-at-once path; force the per-image one
        monkeypatch.setattr(sp, "_THREADED_ELEMENTS", threaded_from)
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(6, 7, 11, generator=gen)
    acts[acts < 0.2] = 0.0  # many exact zeros
    acts[1, :3] = 1.5  # ties
    acts[2] = -acts[2]  # negative values: magnitudes are what count
    expected = [ref_metrics(row.tolist(), 0.05) for row in acts.reshape(6, -1).double()]
    before = acts.clone()
    for method in ("numpy", "torch"):
        assert_metrics(_sparsity_metrics(acts, 0.05, method=method), expected)
    assert torch.equal(acts, before)  # sorted copies, never the activations themselves
    # half precision: widening is exact, so the same numbers as for the float32 values
    half = acts.to(torch.bfloat16)
    expected_half = [ref_metrics(r.tolist(), 0.05) for r in half.reshape(6, -1).double()]
    assert_metrics(sparsity_metrics(half, threshold=0.05), expected_half)
    # non-contiguous activations (e.g. channels-last): flattened per image in logical order
    t = acts.transpose(1, 2)
    expected_t = [ref_metrics(r.tolist(), 0.05) for r in t.reshape(6, -1).double()]
    assert_metrics(sparsity_metrics(t, threshold=0.05), expected_t)


def test_torch_path_chunks_images(monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.sparsity.metrics as sp

    acts = torch.relu(torch.randn(5, 40, generator=torch.Generator().manual_seed(2)))
    whole = _sparsity_metrics(acts, 0.01, method="torch")
    monkeypatch.setattr(sp, "_DEVICE_CHUNK_ELEMENTS", 80)  # two images per chunk: 3 chunks
    chunked = _sparsity_metrics(acts, 0.01, method="torch")
    assert_metrics(chunked, [{k: v[i].item() for k, v in whole.items()} for i in range(5)])
    assert_metrics(whole, [ref_metrics(r.tolist()) for r in acts.double()])


def test_result_does_not_depend_on_thread_count_or_batch() -> None:
    # 8 x 40,000 entries: above _THREADED_ELEMENTS, so images are spread over threads
    acts = torch.relu(torch.randn(8, 40_000, generator=torch.Generator().manual_seed(1)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparsity_metrics(acts)
        torch.set_num_threads(2)
        two = sparsity_metrics(acts)
    finally:
        torch.set_num_threads(before)
    for name in METRICS:
        assert torch.equal(one[name], two[name])
    # A small layer is computed for the whole batch at once; an image's numbers are still its own.
    small = torch.relu(torch.randn(8, 512, generator=torch.Generator().manual_seed(3)))
    small[5, 7] = math.nan
    batch = sparsity_metrics(small)
    for i in (0, 3, 7):
        alone = sparsity_metrics(small[i:i + 1])
        for name in METRICS:
            assert torch.equal(alone[name][0], batch[name][i]), (i, name)
    assert all(math.isnan(batch[m][5].item()) for m in METRICS)


# ------------------------------------------------------------------------------------------------- layers and hooks


class SharedReLU(nn.Module):
    """One nn.ReLU object called at two places of the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_shared_module_called_twice_gives_two_layers() -> None:
    torch.manual_seed(0)
    net = SharedReLU()
    x = torch.randn(3, 4)
    with SparsityRecorder(net, "shared") as rec, torch.no_grad(), rec.record(["a", "b", "c"]):
        net(x)
    assert rec.layer_names == ["act#0", "act#1"]
    df = rec.frame()
    assert len(df) == 3 * 2 * len(METRICS)
    with torch.no_grad():
        first = torch.relu(net.fc1(x))
        second = torch.relu(net.fc2(first))
    for index, acts in enumerate((first, second)):
        rows = df[df.layer_index == index]
        assert set(rows.layer_name) == {f"act#{index}"}
        for i, image in enumerate("abc"):
            for metric, value in ref_metrics(acts[i].tolist()).items():
                got = rows[(rows.id == image) & (rows.metric == metric)].value.item()
                assert got == pytest.approx(value, abs=1e-9)


class OutOfOrder(nn.Module):
    """Defines ``late`` before ``early`` but runs ``early`` first; ``skip`` leaves ``late`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.ReLU()
        self.gate = nn.Sigmoid()  # saturating: not recorded by default
        self.early = nn.GELU()
        self.fc = nn.Linear(5, 5)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.early(self.fc(x))
        return x if self.skip else self.gate(self.late(x))


def test_layer_index_is_execution_order_and_saturating_layers_are_left_out() -> None:
    net = OutOfOrder()
    assert [name for name, _ in activation_layers(net)] == ["late", "early"]  # definition order
    with SparsityRecorder(net, "m") as rec, torch.no_grad(), rec.record(["x"]):
        net(torch.randn(1, 5))
    assert rec.layer_names == ["early", "late"]  # execution order
    df = rec.frame()
    assert df.layer_name.tolist() == ["early"] * 4 + ["late"] * 4
    assert df.layer_index.tolist() == [0] * 4 + [1] * 4


def test_explicit_layers_override() -> None:
    net = OutOfOrder()
    with SparsityRecorder(net, "m", layers=[("sigmoid", net.gate)]) as rec, torch.no_grad(), rec.record(["x"]):
        net(torch.randn(1, 5))
    assert rec.layer_names == ["sigmoid"]
    with pytest.raises(ValueError):
        SparsityRecorder(net, "m", layers=[("a", net.late), ("b", net.late)])
    with pytest.raises(ValueError):
        SparsityRecorder(net, "m", layers=[("a", net.late), ("a", net.early)])


def test_timm_activation_classes_are_found() -> None:
    from timm.layers.activations import GELUTanh, HardSigmoid, Swish, Tanh

    net = nn.Sequential(Swish(), GELUTanh(), HardSigmoid(), Tanh(), nn.Hardtanh(), nn.ReLU6(), nn.Mish())
    assert [name for name, _ in activation_layers(net)] == ["0", "1", "5", "6"]


def test_a_changed_call_order_is_rejected_and_the_batch_dropped() -> None:
    net = OutOfOrder()
    with SparsityRecorder(net, "m") as rec, torch.no_grad():
        with rec.record(["x"]):
            net(torch.randn(1, 5))
        net.skip = True
        with pytest.raises(RuntimeError, match="differ"), rec.record(["y"]):
            net(torch.randn(1, 5))
        net.skip = False
        with pytest.raises(RuntimeError, match="twice"), rec.record(["z"]):
            net(torch.randn(1, 5))
            net(torch.randn(1, 5))
        with pytest.raises(ValueError, match="ids"), rec.record(["only-one"]):
            net(torch.randn(2, 5))
    assert set(rec.frame().id) == {"x"}


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_deterministic_and_hooks_removed() -> None:
    net = planted_net()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    ids = ["p", "q", "r", "s"]
    with SparsityRecorder(net, "planted") as rec, torch.no_grad():
        assert not _no_hooks(net)
        net(x)  # outside record(): nothing is kept
        assert rec.frame().empty
        for _ in range(2):
            with rec.record(ids):
                net(x)
    assert _no_hooks(net)
    df = rec.frame()
    first, second = df.iloc[: len(df) // 2], df.iloc[len(df) // 2 :]
    assert first.value.tolist() == second.value.tolist()
    assert first.id.tolist() == second.id.tolist()
    # running after exit records nothing
    with torch.no_grad():
        net(x)
    assert len(rec.frame()) == len(df) == 2 * 4 * 2 * len(METRICS)
    # a fresh recorder gives identical rows
    with SparsityRecorder(net, "planted") as again, torch.no_grad(), again.record(ids):
        net(x)
    assert again.frame().equals(first.reset_index(drop=True))
    # hooks are removed on an exception too
    with pytest.raises(KeyError), SparsityRecorder(net, "planted"):
        raise KeyError("boom")
    assert _no_hooks(net)
    with pytest.raises(RuntimeError), rec.record(ids):  # record() needs the recorder attached
        pass
    rec.clear()
    assert rec.frame().empty


def test_frame_layout_and_arrow_schema() -> None:
    net = planted_net()
    with SparsityRecorder(net, "planted") as rec, torch.no_grad():
        with rec.record(["b", "a"]):
            net(PLANTED_X)
        assert rec.frame().empty is False
    df = rec.frame()
    assert list(df.columns) == ["id", "model", "layer_index", "layer_name", "metric", "value"]
    assert str(df.layer_index.dtype) == "int32" and str(df.value.dtype) == "float64"
    # id order as recorded, then layer_index, then metric in METRICS order
    assert df.id.tolist() == ["b"] * 8 + ["a"] * 8
    assert df.layer_index.tolist() == ([0] * 4 + [1] * 4) * 2
    assert df.metric.tolist() == list(METRICS) * 4
    assert set(df.model) == {"planted"}
    table = rec.table()
    assert table.schema.equals(SPARSITY_SCHEMA)
    assert table.num_rows == len(df)
    empty = SparsityRecorder(net, "planted").table()
    assert empty.num_rows == 0 and empty.schema.equals(SPARSITY_SCHEMA)
    assert isinstance(SPARSITY_SCHEMA, pa.Schema)


# ------------------------------------------------------------------------------------------------- real encoder


def _photo(path: Path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


@pytest.mark.skipif(not PETS.is_dir(), reason=f"{PETS} is missing")
def test_tf_efficientnet_lite0_on_real_photos() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    photos = [sorted(PETS.glob("cat/*/*.jpg"))[0], sorted(PETS.glob("dog/*/*.jpg"))[0]]
    x = torch.stack([_photo(p) for p in photos])
    ids = [p.stem for p in photos]

    # Count activation calls and their sizes independently of the module under test.
    sizes: list[int] = []
    counters = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
        for m in model.modules()
        if type(m).__name__ in {"ReLU", "ReLU6", "SiLU", "GELU", "Hardswish"}
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two images: on a busy 2-core machine, OpenMP barriers cost more than they save
    try:
        with SparsityRecorder(model, "encoder") as rec, torch.no_grad(), rec.record(ids):
            model(x)
    finally:
        torch.set_num_threads(threads)
        for handle in counters:
            handle.remove()
    assert _no_hooks(model)

    df = rec.frame()
    n_layers = len(rec.layer_names)
    assert n_layers == len(sizes) == 33  # 33 ReLU6 (in BatchNormAct2d.act), each run once
    assert rec.layer_names[0] == "bn1.act" and rec.layer_names[-1] == "bn2.act"
    assert len(df) == len(ids) * n_layers * len(METRICS)
    per = df.groupby(["id", "layer_index"]).metric.apply(list)
    assert len(per) == len(ids) * n_layers
    assert all(metrics == list(METRICS) for metrics in per)
    assert df.value.notna().all()
    wide = df.pivot_table(index=["id", "layer_index"], columns="metric", values="value")
    n = np.array([sizes[i] for i in wide.index.get_level_values("layer_index")], dtype=np.float64)
    for name in ("near_zero_fraction", "hoyer", "gini"):
        assert ((wide[name] >= 0) & (wide[name] <= 1)).all(), name
    assert ((wide.l1_l2_ratio >= 1) & (wide.l1_l2_ratio <= np.sqrt(n) + 1e-9)).all()
    # ReLU6 zeroes a good share of every layer
    assert (wide.near_zero_fraction > 0.05).all()


# ------------------------------------------------------------------------------------------------- sampled
def _pets_batch(n: int) -> tuple[torch.Tensor, list[str]]:
    from indexer.encoders.efficientnet import build_preprocess

    photos = sorted(PETS.glob("*/*/*.jpg"))[:: max(1, 1140 // n)][:n]
    pre = build_preprocess()
    return torch.stack([pre(Image.open(p)) for p in photos]), [p.stem for p in photos]


def _record(model: nn.Module, batches: list[tuple[torch.Tensor, list[str]]], **kw: object) -> pd.DataFrame:
    with SparsityRecorder(model, "encoder", **kw) as rec, torch.inference_mode():  # type: ignore[arg-type]
        for x, ids in batches:
            with rec.record(ids):
                model(x)
    return rec.frame().set_index(["id", "layer_index", "metric"])["value"]


def test_sampled_metrics_are_within_the_stated_bounds_of_the_exact_ones_on_real_photos() -> None:
    # The bounds of indexer/sparsity/metrics.py, on the real encoder (pretrained weights) and 64 pets photos.
    from indexer.encoders import load_encoder

    model = load_encoder("efficientnet-lite0").model.to(memory_format=torch.channels_last)
    x, ids = _pets_batch(64)
    x = x.contiguous(memory_format=torch.channels_last)
    exact = _record(model, [(x, ids)], method="exact")
    sampled = _record(model, [(x, ids)], method="sampled")
    assert sampled.index.equals(exact.index) and sampled.notna().all()
    err = (sampled - exact).abs()
    per_metric = err.groupby(level="metric")
    assert per_metric.max()[["near_zero_fraction", "hoyer", "gini"]].max() <= 0.04
    rel = (err / exact.abs().clip(lower=1e-12)).xs("l1_l2_ratio", level="metric")
    assert rel.max() <= 0.15
    # Over images the errors cancel (each image has its own sample): layer means agree far more closely.
    means = pd.DataFrame({"s": sampled, "e": exact}).groupby(level=["layer_index", "metric"]).mean()
    gap = (means.s - means.e).abs()
    assert gap.drop("l1_l2_ratio", level="metric").max() <= 0.005
    assert (gap / means.e.abs()).xs("l1_l2_ratio", level="metric").max() <= 0.01
    # And the sampling is not a no-op: some per-image values differ from the exact ones.
    assert (err > 1e-6).any()


def test_sampled_metrics_of_an_image_do_not_depend_on_batch_or_memory_layout() -> None:
    from indexer.encoders import load_encoder

    model = load_encoder("efficientnet-lite0").model
    x, ids = _pets_batch(6)
    nchw = _record(model, [(x, ids)], method="sampled")
    model = model.to(memory_format=torch.channels_last)
    cl = x.contiguous(memory_format=torch.channels_last)
    split = _record(model, [(cl[4:], ids[4:]), (cl[:4], ids[:4])], method="sampled")
    # Same entries of the same image: equal up to float rounding of the convolutions in the two layouts.
    assert np.allclose(split.loc[nchw.index].to_numpy(), nchw.to_numpy(), rtol=1e-4, atol=1e-4)
    other = _record(model, [(cl, ids)], method="sampled", units=2048)
    assert not np.allclose(other.loc[nchw.index].to_numpy(), nchw.to_numpy(), rtol=1e-6, atol=1e-6)


def test_sampled_metrics_small_layers_exact_and_non_finite_images_nan() -> None:
    from indexer.sparsity.metrics import BatchSample, sampled_sparsity_metrics

    acts = torch.relu(torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0)))
    small = sampled_sparsity_metrics(acts, BatchSample(["a", "b", "c"], 128))  # 128 entries per image: all
    assert_metrics(small, [ref_metrics(acts[i].flatten().tolist()) for i in range(3)])
    big = torch.relu(torch.randn(3, 64, 32, 32, generator=torch.Generator().manual_seed(1)))
    big[1, 5, 3, 3] = math.nan
    for nonnegative in (False, True):
        got = sampled_sparsity_metrics(big, BatchSample(["a", "b", "c"], 512), nonnegative=nonnegative)
        assert all(math.isnan(got[m][1].item()) for m in METRICS)
        assert all(math.isfinite(got[m][i].item()) for m in METRICS for i in (0, 2))
    with pytest.raises(ValueError, match="sample of 2 images"):
        sampled_sparsity_metrics(big, BatchSample(["a", "b"], 512))
    with pytest.raises(ValueError, match="method"):
        SparsityRecorder(nn.ReLU(), "m", method="approximate")


def test_sampled_peak_of_a_signed_layer_is_its_largest_magnitude() -> None:
    from indexer.sparsity.metrics import BatchSample, sampled_sparsity_metrics

    # One entry of -10 among small values: relative to that peak every other entry is near zero.
    acts = torch.full((2, 64, 16, 16), 0.05)
    acts[:, 0, 0, 0] = -10.0
    got = sampled_sparsity_metrics(acts, BatchSample(["a", "b"], 256), threshold=0.01)
    assert got["near_zero_fraction"].tolist() == [1.0, 1.0]  # the sample (almost surely) misses the -10


def test_relu6_ceiling_skips_the_full_read_without_changing_a_number() -> None:
    from indexer.sparsity.metrics import BatchSample, sampled_sparsity_metrics

    g = torch.Generator().manual_seed(2)
    acts = torch.nn.functional.relu6(3 * torch.randn(4, 32, 24, 24, generator=g))
    acts[1] = acts[1].clamp(max=2.0)  # an image whose peak is below the ceiling: read in full
    sample = BatchSample(["a", "b", "c", "d"], 1024)
    plain = sampled_sparsity_metrics(acts, sample)
    fast = sampled_sparsity_metrics(acts, sample, nonnegative=True, ceiling=6.0)
    for m in METRICS:
        assert torch.equal(plain[m], fast[m]), m


def test_device_path_of_the_sampled_metrics_matches_the_cpu_path() -> None:
    # _sampled_torch is what a CUDA layer goes through (one torch op per step on the device); it runs on any
    # device, so its arithmetic is checked here against the CPU path on the same sample: the same estimators,
    # Gini included (every other sampled entry), up to float32 vs float64 summation.
    from indexer.sparsity.metrics import BatchSample, _sampled_torch, gini_units, sampled_sparsity_metrics

    g = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(4, 48, 20, 20, generator=g)) * torch.rand(4, 48, 1, 1, generator=g)
    acts[2] = 0.0  # an all-zero image
    acts = acts.contiguous(memory_format=torch.channels_last)
    sample = BatchSample(["a", "b", "c", "d"], 1001)  # odd: Gini reads gini_units(1001) = 501 entries
    assert gini_units(1001) == 501
    for nonnegative in (False, True):
        cpu = sampled_sparsity_metrics(acts, sample, nonnegative=nonnegative)
        dev = _sampled_torch(acts, sample, DEFAULT_THRESHOLD, nonnegative, acts[0].numel(), torch.device("cpu"))
        for m in METRICS:
            assert torch.allclose(cpu[m], dev[m], rtol=1e-5, atol=1e-6), (m, cpu[m], dev[m])
    assert cpu["gini"][2].item() == 1.0 and cpu["near_zero_fraction"][2].item() == 1.0


def test_sample_design_spreads_each_half_over_the_pixels_and_channels_in_any_layout() -> None:
    # BatchSample's design: each half of the sample (even entries, odd entries) has one entry per equal stratum of
    # the pixels and cycles through all the channels, so every channel is read as often as any other, give or
    # take one; Gini reads the even half, so every layout must read the same entries in the same order.
    from indexer.sparsity.metrics import BatchSample, sampled_sparsity_metrics

    ids, units, c, h, w = ["a", "b", "c"], 1001, 40, 7, 9
    g = torch.Generator().manual_seed(4)
    nchw = torch.relu(torch.randn(3, c, h, w, generator=g)) * torch.rand(3, c, 1, 1, generator=g)
    last = nchw.contiguous(memory_format=torch.channels_last)
    n, pixels = c * h * w, h * w
    sample = BatchSample(ids, units)
    off = sample.offsets(last, n).numpy()
    assert off.shape == (3, units) and off.min() >= 0 and off.max() < n
    for half, strata in ((off[:, ::2], (units + 1) // 2), (off[:, 1::2], units // 2)):
        pixel, channel = half // c, half % c
        j = np.arange(half.shape[1])
        assert ((pixel >= np.floor(j * pixels / strata)) & (pixel <= (j + 1) * pixels / strata)).all()
        for row in channel:
            counts = np.bincount(row, minlength=c)
            assert counts.max() - counts.min() <= 1
    # The phase differs from image to image (seeded by the id), and so do the places within the strata.
    assert len({int(o) % c for o in off[:, 0]}) > 1 and not (off[0] == off[1]).all()
    a = sampled_sparsity_metrics(nchw, BatchSample(ids, units))
    b = sampled_sparsity_metrics(last, BatchSample(ids, units))
    for m in METRICS:
        assert torch.equal(a[m], b[m]), m


def test_gini_from_one_block_holding_the_whole_layer_is_the_exact_gini() -> None:
    # _gini_from_blocks estimates the layer's mean |a_i - a_j| from the pairs within its blocks; a single block that
    # holds every entry has every pair, so the estimate is the exact metric (the textbook formula, exact path).
    from indexer.sparsity.metrics import _gini_from_blocks

    g = torch.Generator().manual_seed(5)
    for n in (2, 7, 300, 512):
        acts = torch.relu(torch.randn(3, n, generator=g)) * torch.rand(3, 1, generator=g)
        acts[2] = 0.0  # all-zero: 1.0 on both paths
        exact = sparsity_metrics(acts)["gini"].numpy()
        blocks = np.sort(acts.abs().numpy(), axis=1)[:, None, :]  # (3, 1 block, n)
        est = _gini_from_blocks(blocks, np.float64(n))
        assert np.allclose(est, exact, rtol=1e-5, atol=1e-6), (n, est, exact)


def test_gini_blocks_deal_the_even_half_at_random() -> None:
    # Blocks of consecutive strata (bands of the image) or of every third stratum (a third of the channels when 3
    # divides C) biased Gini by up to 0.008 per layer on the pets photos: every block must hold about as many
    # entries from each band and each residue as any other.
    from indexer.sparsity.metrics import _gini_blocks, _gini_order, gini_units

    order = _gini_order(3072)
    assert gini_units(3072) == len(order) == 1536 and _gini_blocks(3072) == (3, 512)
    assert sorted(order.tolist()) == list(range(0, 3072, 2))  # the even half, each entry once
    j = order.reshape(3, 512) // 2  # stratum of each entry, per block
    for block in j:
        for counts in (np.bincount(block * 3 // 1536, minlength=3), np.bincount(block % 3, minlength=3)):
            assert counts.min() >= 140 and counts.max() <= 200, counts  # 170.7 expected, sd 10.7
    assert gini_units(1001) == 501 and gini_units(2050) == 1023  # 3 blocks of 341 from 1,025
