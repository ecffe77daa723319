"""Per-layer activation sparsity, recorded with forward hooks while a model indexes images.

For every image and every recorded layer we store four sparsity metrics of that layer's activations, as a long
table ``(id, model, layer_index, layer_name, metric, value)`` (:data:`SPARSITY_SCHEMA`)::

    with SparsityRecorder(encoder, "encoder") as rec:
        for ids, x in batches:
            with rec.record(ids):
                encoder(x)
    table = rec.frame()

Metrics
-------
The activations of one layer for one image are flattened to a vector ``a`` of ``n`` entries; ``|a|`` is taken
element-wise, ``||a||_1 = sum_i |a_i|`` and ``||a||_2 = sqrt(sum_i a_i^2)``.

``near_zero_fraction``
    ``#{i : |a_i| <= t * s} / n`` with ``t`` the relative ``threshold`` (default :data:`DEFAULT_THRESHOLD`) and
    ``s = max_i |a_i|`` the layer's scale for that image.  The scale is the *max*, not the RMS: exact zeros
    (ReLU, ReLU6) count as near-zero under either, but the RMS of a k-sparse vector shrinks like ``sqrt(k/n)``,
    so an RMS threshold drifts down exactly as the layer gets sparser and the metric loses sensitivity where it
    matters; ``t * max`` reads as "below t of this image's peak response in this layer", is scale-invariant,
    and for ``t < 1`` never counts the peak itself, so an image with any signal is never 100% near-zero.
    (The cost: one outlier raises ``s``; ReLU6 caps it at 6 in the default encoder, and Hoyer/Gini below do not
    depend on a threshold at all.)  All-zero activations: ``s = 0`` and the fraction is 1.0.
``hoyer`` (Hoyer 2004, "Non-negative matrix factorization with sparseness constraints")
    ``(sqrt(n) - ||a||_1 / ||a||_2) / (sqrt(n) - 1)`` in ``[0, 1]``: 1 for exactly one non-zero entry, 0 when all
    magnitudes are equal.  All-zero: 1.0 (as for Gini, below).  ``n == 1``: the denominator is 0; we define 0.0
    (a lone unit has nothing to be sparse relative to; this matches Gini, whose formula gives 0 at ``n == 1``).
``gini`` (Hurley & Rickard 2009, "Comparing measures of sparsity")
    sort ``|a|`` ascending as ``c_1 <= ... <= c_n``;
    ``G = 1 - 2 * sum_k (c_k / ||c||_1) * ((n - k + 1/2) / n)``, in ``[0, 1 - 1/n]`` for a non-zero ``a``:
    ``1 - 1/n`` for one non-zero entry, 0 for all-equal magnitudes.  All-zero: ``||c||_1 = 0`` makes it 0/0; we
    define 1.0 because a layer with no active unit is the sparse end of the scale (it agrees with
    ``near_zero_fraction = 1``), and a defined value keeps per-layer means free of NaN.  The formula is
    evaluated in the equivalent form ``G = sum_k (2k - n - 1) * c_k / (n * ||c||_1)`` (expand
    ``1 = sum_k c_k / ||c||_1``).
``l1_l2_ratio``
    ``||a||_1 / ||a||_2`` in ``[1, sqrt(n)]``, lower = sparser (1 for one non-zero entry, ``sqrt(n)`` for
    all-equal magnitudes).  All-zero: 0.0.

An image whose activations hold a NaN or an infinity in a layer gets NaN for every metric of that layer:
a number computed from them would be meaningless.  Hoyer and Gini are clipped to ``[0, 1]`` to drop float
rounding (around 1e-16) at the ends of their ranges; nothing else is clipped.

Computation: exact (no sub-sampling), in float64, on the activations' device.  The cost is the sort Gini needs,
done once per image and reused for every metric (max, the near-zero count by binary search, the L1 and L2
sums).  The sort runs in the activations' own dtype: float32 -> float64 is exact and monotone, so the order is
the same, at half the memory traffic; only the sorted values are widened.  On CPU the sort is NumPy's (SIMD
sorts, several times faster than ``torch.sort`` here, and without the int64 index tensor ``torch.sort``
allocates), one image per task, images spread over ``torch.get_num_threads()`` threads (NumPy releases the GIL
while sorting; each image's numbers do not depend on the thread count); elsewhere (CUDA) it is one batched
``torch.sort`` along dim 1 over chunks of images.  Only the ``(B,)`` results leave the device.

Layers
------
:func:`activation_layers` picks the outputs of the nonlinearities, since that is where sparsity means something:
a rectifier zeroes out (ReLU, ReLU6, Threshold, Hardshrink, Softshrink) or squashes towards zero (LeakyReLU,
PReLU, RReLU, ELU, CELU, SELU, GELU, SiLU, Mish, Hardswish, Softplus, and timm's own Swish/Mish/HardSwish/
HardMish/GELU/GELUTanh/QuickGELU classes), while a linear or conv output is dense.  Saturating squashers
(Sigmoid, Tanh, Hardsigmoid, Hardtanh, Softmax) are left out: they never produce zeros (a sigmoid sits around
0.5), and where they appear they are gates (squeeze-excite in EfficientNet/MobileNet) or bounded outputs (a
VAE decoder's pixels), not representations; pass ``layers=`` to record them anyway.  timm's ``BatchNormAct2d``
applies its activation through the child module ``.act`` (an ``nn.ReLU6`` in ``tf_efficientnet_lite0``), so
that child is found like any other.  Activations applied functionally (``F.relu`` inside ``forward``) have no
module to hook: pass ``layers=`` with modules for those models.

One module object may run at several places of one forward (e.g. a shared ``nn.ReLU()``); every call is its
own layer.  Calls are numbered in execution order within the forward: the first recorded batch fixes the order
and every later batch must repeat it.  A module that runs once is named by its module name; one that runs ``m``
times gives layers ``name#0`` ... ``name#{m-1}``.  ``layer_index`` is the 0-based execution order.

:data:`DEFAULT_THRESHOLD` is defined here, not in ``indexer/defaults.py`` (that file is the pipeline's, kept by
its owner); the CLI and the pipeline import it from this module.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The table's Arrow schema lives with the store's other on-disk contracts; re-exported here because this
# module produces the table (its columns and dtypes are what frame() returns, see the tests).
from indexer.schema import SPARSITY_SCHEMA

__all__ = [
    "DEFAULT_THRESHOLD",
    "METRICS",
    "SPARSITY_SCHEMA",
    "SparsityRecorder",
    "activation_layers",
    "sparsity_metrics",
]

METRICS: tuple[str, ...] = ("near_zero_fraction", "hoyer", "gini", "l1_l2_ratio")

# 1% of the image's peak response in the layer: exact zeros always count, and in a ReLU6 layer whose peak is 6
# anything below 0.06 does too, i.e. a unit that is all but off.
DEFAULT_THRESHOLD: float = 0.01

# Sparsifying activation modules (see the module docstring for why saturating ones are excluded).
# nn.ReLU6 subclasses nn.Hardtanh, which is deliberately not listed.
_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
)
# timm's own activation classes that do not subclass the torch ones, matched by name so that importing this
# module does not import timm (seconds); a model built from them has imported timm already.
_TIMM_ACTIVATIONS: frozenset[str] = frozenset(
    f"timm.layers.{mod}.{cls}"
    for mod, classes in {
        "activations": ("Swish", "Mish", "HardSwish", "HardMish", "GELU", "GELUTanh", "QuickGELU", "PReLU"),
        "activations_me": ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe"),
    }.items()
    for cls in classes
)

# Rows of images sorted together on non-CPU devices: bounds the float64 copy to 512 MiB.
_DEVICE_CHUNK_ELEMENTS = 1 << 26


# ------------------------------------------------------------------------------------------------- metrics


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (a fraction of the layer's max |a|), got {threshold}")
    return threshold


def _gini_weights(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``2k - n - 1`` for k = 1..n, in float64 (exact: integers below 2**53)."""
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return 2.0 * k - (n + 1)


def _row_sums(row: np.ndarray, weights: np.ndarray, threshold: float) -> tuple[float, float, float, float] | None:
    """(L1, sum of squares, sum_k (2k - n - 1) c_k, near-zero count) of one image's |a| (``row``, our own copy,
    sorted here in place); None when the image has a NaN or an infinity."""
    row.sort()  # ascending; NaN sorts last, so row[-1] tells whether the image is finite
    peak = float(row[-1])
    if not math.isfinite(peak):
        return None
    # Zeros (ReLU: about half of the entries) add nothing to any sum: widen and reduce only the rest.
    zeros = int(np.searchsorted(row, row.dtype.type(0), side="right"))
    d = row[zeros:].astype(np.float64)
    near = zeros + int(np.searchsorted(d, threshold * peak, side="right"))
    # einsum, not BLAS (d @ d): single-threaded and deterministic, where OpenBLAS spins up its own threads
    # inside our worker threads and, on a busy 2-core machine, was several times slower.
    sumsq = np.einsum("i,i->", d, d)
    gini_num = np.einsum("i,i->", d, weights[zeros:])
    return float(d.sum()), float(sumsq), float(gini_num), float(near)


def _sums_numpy(flat: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Per-image sums from a CPU (B, n) tensor of activations (read, never written)."""
    b, n = flat.shape
    src = flat.numpy()
    weights = _gini_weights(n).numpy()
    local = threading.local()

    def one(i: int) -> tuple[float, float, float, float] | None:
        # |a| of one image into a buffer reused by this thread: no (B, n) copy, and the sort works in place.
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(n, dtype=src.dtype)
        np.abs(src[i], out=buf)
        return _row_sums(buf, weights, threshold)

    # NumPy releases the GIL while it sorts and reduces, and torch's own threads are idle while a hook runs,
    # so images are spread over as many threads as torch uses (each image's result does not depend on it).
    workers = min(torch.get_num_threads(), b)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, range(b)))
    else:
        results = [one(i) for i in range(b)]
    sums = np.array([r if r is not None else (0.0, 0.0, 0.0, 0.0) for r in results], dtype=np.float64)
    sums = sums.reshape(b, 4)
    finite = np.array([r is not None for r in results], dtype=bool)
    l1, sumsq, gini_num, near = (torch.from_numpy(np.ascontiguousarray(sums[:, j])) for j in range(4))
    return l1, sumsq, gini_num, near, torch.from_numpy(finite)


def _sums_torch(mags: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """The same sums with batched ``torch.sort`` on the tensor's device (CUDA; also correct on CPU, only slower)."""
    b, n = mags.shape
    weights = _gini_weights(n, mags.device)
    parts: list[list[torch.Tensor]] = [[], [], [], [], []]
    step = max(1, _DEVICE_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, b, step):
        c = torch.sort(mags[start : start + step], dim=1).values.to(torch.float64)
        peak = c[:, -1]
        parts[0].append(c.sum(dim=1))
        parts[1].append((c * c).sum(dim=1))
        parts[2].append(c @ weights)
        parts[3].append((c <= (threshold * peak)[:, None]).sum(dim=1).to(torch.float64))
        parts[4].append(torch.isfinite(peak))
    return tuple(torch.cat(p) for p in parts)


def sparsity_metrics(acts: torch.Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> dict[str, torch.Tensor]:
    """Sparsity metrics of one layer's activations for a batch of images (formulas in the module docstring).

    ``acts`` is ``(B, ...)``, flattened per image to ``(B, n)``.  Returns ``metric -> (B,)`` float64 tensors on
    ``acts``' device (the CPU for MPS, which has no float64), keys in :data:`METRICS` order.  ``acts`` is not
    modified.
    """
    return _sparsity_metrics(acts, threshold, method="auto")


def _sparsity_metrics(acts: torch.Tensor, threshold: float, *, method: str) -> dict[str, torch.Tensor]:
    """:func:`sparsity_metrics` with the sort implementation chosen: "auto", "numpy" (CPU) or "torch" (any
    device); the tests check that they agree."""
    threshold = _check_threshold(threshold)
    if acts.dim() < 1:
        raise ValueError("activations need a batch dimension: expected (B, ...), got a 0-d tensor")
    if not acts.is_floating_point():
        raise TypeError(f"activations must be floating point, got {acts.dtype}")
    b = acts.shape[0]
    n = acts[0].numel() if b else math.prod(acts.shape[1:])
    if n == 0:
        raise ValueError(f"activations have no entries per image: shape {tuple(acts.shape)}")
    device = acts.device
    # MPS has no float64: results stay on the CPU there.
    out_device = torch.device("cpu") if device.type == "mps" else device
    with torch.no_grad():
        flat = acts.detach().reshape(b, n)
        if method == "auto":
            method = "numpy" if device.type == "cpu" else "torch"
        if method == "numpy":
            flat = flat.cpu()
            if flat.dtype in (torch.float16, torch.bfloat16):  # NumPy has no bfloat16; widening is exact
                flat = flat.float()
            sums = _sums_numpy(flat, threshold)
        elif method == "torch":
            sums = _sums_torch(flat.to(out_device).abs(), threshold)  # abs: a new tensor, acts stay as they are
        else:
            raise ValueError(f"unknown method {method!r}")
        l1, sumsq, gini_num, near, finite = (x.to(out_device) for x in sums)
        return _combine(l1, sumsq, gini_num, near, finite, n)


def _combine(
    l1: torch.Tensor, sumsq: torch.Tensor, gini_num: torch.Tensor, near: torch.Tensor, finite: torch.Tensor, n: int
) -> dict[str, torch.Tensor]:
    """The four metrics from the per-image sums (all (B,) float64), with the edge cases of the module docstring."""
    zero = l1 == 0  # sums of non-negative float32/float64 values: 0 exactly when every entry is 0
    safe_l1 = torch.where(zero, torch.ones_like(l1), l1)
    safe_l2 = torch.where(zero, torch.ones_like(l1), sumsq.sqrt())
    ratio = torch.where(zero, torch.zeros_like(l1), safe_l1 / safe_l2)
    root_n = math.sqrt(n)
    if n == 1:
        hoyer = torch.where(zero, 1.0, 0.0).to(torch.float64)
    else:
        hoyer = torch.where(zero, torch.ones_like(l1), ((root_n - ratio) / (root_n - 1.0)).clamp(0.0, 1.0))
    gini = torch.where(zero, torch.ones_like(l1), (gini_num / (n * safe_l1)).clamp(0.0, 1.0))
    out = {"near_zero_fraction": near / n, "hoyer": hoyer, "gini": gini, "l1_l2_ratio": ratio}
    nan = torch.full_like(l1, math.nan)
    return {k: torch.where(finite, out[k], nan) for k in METRICS}


# ------------------------------------------------------------------------------------------------- layers


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_ACTIVATIONS):
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in _TIMM_ACTIVATIONS for cls in type(module).__mro__)


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The sparsifying activation modules of ``model`` as ``(name, module)``, each module object once.

    Found statically, so in definition (registration) order, which is execution order for sequential models;
    :class:`SparsityRecorder` numbers layers by the order it observes them run, and splits a module that runs
    several times per forward into one layer per call.
    """
    return [(name, m) for name, m in model.named_modules() if _is_activation(m)]


# ------------------------------------------------------------------------------------------------- recorder


class SparsityRecorder:
    """Records :func:`sparsity_metrics` of every activation layer of ``model`` for the batches run in ``record()``.

    Use as a context manager: hooks are attached on entry and always removed on exit.  Inside, wrap exactly one
    forward pass per batch in ``with rec.record(ids):``; outside ``record()`` the hooks return at once, so the
    same model can run un-recorded.  Every recorded layer's output must have ``len(ids)`` rows: a forward split
    into sub-batches inside one ``record()`` is rejected (``ValueError``), as is calling ``model`` itself twice
    (``RuntimeError``).  Rows accumulate across batches until :meth:`clear`.

    ``layers`` overrides :func:`activation_layers` (e.g. a mapper's explicit list); names and module objects must
    be unique within it.
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        layers: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        self.model = model
        self.model_name = str(model_name)
        self.threshold = _check_threshold(threshold)
        self._layers = list(activation_layers(model) if layers is None else layers)
        names = [name for name, _ in self._layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        if len({id(m) for _, m in self._layers}) != len(self._layers):
            # One hook per module object: a reused module is split per call, not listed twice.
            raise ValueError("each module may be listed once; calls of a reused module are numbered automatically")
        self._handles: list[RemovableHandle] = []
        self._entered = False
        # State of the batch being recorded (None outside record()).
        self._ids: list[str] | None = None
        self._calls: list[int] = []  # per entry of self._layers: calls so far in this forward
        self._pending: list[tuple[int, int, np.ndarray]] = []  # (entry, call k, (len(METRICS), B) values)
        self._root_calls = 0
        # Fixed by the first recorded batch.
        self._order: list[tuple[int, int]] | None = None
        self._layer_names: list[str] = []
        # Recorded batches: ids and (n_layers, len(METRICS), B) values.
        self._batches: list[tuple[list[str], np.ndarray]] = []

    # -- hooks

    def __enter__(self) -> SparsityRecorder:
        if self._entered:
            raise RuntimeError("this SparsityRecorder is already attached")
        try:
            for entry, (_, module) in enumerate(self._layers):
                self._handles.append(module.register_forward_hook(self._make_hook(entry)))
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
        except BaseException:
            self._detach()
            raise
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._entered = False
        self._ids = None
        self._pending = []

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._ids is None:
            return
        self._root_calls += 1
        if self._root_calls > 1:
            # Calls are numbered per forward: a second forward would be read as more layers of the first.
            raise RuntimeError("the model ran twice inside one record() block; use one record() per batch")

    def _make_hook(self, entry: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._ids is None:
                return
            acts = _first_tensor(output)
            if acts is None:
                raise TypeError(f"layer {self._layers[entry][0]!r} returned no tensor ({type(output).__name__})")
            if acts.dim() == 0 or acts.shape[0] != len(self._ids):
                raise ValueError(
                    f"layer {self._layers[entry][0]!r} output has shape {tuple(acts.shape)}, "
                    f"but record() was given {len(self._ids)} ids"
                )
            k = self._calls[entry]
            self._calls[entry] = k + 1
            with torch.no_grad():
                metrics = sparsity_metrics(acts, threshold=self.threshold)
                # One device->host copy per layer; no reference to acts outlives this hook.
                values = torch.stack([metrics[m] for m in METRICS]).cpu().numpy()
            self._pending.append((entry, k, values))

        return hook

    # -- recording

    @contextmanager
    def record(self, ids: Sequence[str]) -> Iterator[None]:
        """Record the activations of the one forward pass run inside this block, for images ``ids`` (in batch order).

        The batch's rows are kept only if the block exits normally; on an exception nothing of it is kept.
        """
        if not self._entered:
            raise RuntimeError("record() needs the recorder attached: `with SparsityRecorder(...) as rec:`")
        if self._ids is not None:
            raise RuntimeError("record() blocks do not nest")
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of ids, not one string")
        batch_ids = [str(i) for i in ids]
        self._ids = batch_ids
        self._calls = [0] * len(self._layers)
        self._pending = []
        self._root_calls = 0
        try:
            yield
            pending, self._pending = self._pending, []
        finally:
            self._ids = None
            self._pending = []
        self._commit(batch_ids, pending)

    def _commit(self, ids: list[str], pending: list[tuple[int, int, np.ndarray]]) -> None:
        order = [(entry, k) for entry, k, _ in pending]
        if self._order is None:
            if not order and self._layers:
                raise RuntimeError("no recorded layer ran inside record(): was this recorder's model called?")
            runs = [0] * len(self._layers)
            for entry, _ in order:
                runs[entry] += 1
            self._layer_names = [
                self._layers[entry][0] if runs[entry] == 1 else f"{self._layers[entry][0]}#{k}" for entry, k in order
            ]
            self._order = order
        elif order != self._order:
            seen = [self._layers[e][0] + f"#{k}" for e, k in order]
            expected = [self._layers[e][0] + f"#{k}" for e, k in self._order]
            first = next((i for i, (a, b) in enumerate(zip(seen, expected, strict=False)) if a != b), None)
            where = f"first difference at layer {first}" if first is not None else "different number of calls"
            raise RuntimeError(
                f"layer calls differ from the first recorded batch ({len(seen)} vs {len(expected)} calls, {where}); "
                "the execution order must be the same for every batch"
            )
        values = (
            np.stack([v for _, _, v in pending]) if pending else np.zeros((0, len(METRICS), len(ids)), dtype=np.float64)
        )
        self._batches.append((ids, values))

    # -- results

    @property
    def layer_names(self) -> list[str]:
        """Recorded layer names by ``layer_index`` (empty until the first batch has been recorded)."""
        return list(self._layer_names)

    def frame(self) -> pd.DataFrame:
        """All rows so far: id order as recorded, then ``layer_index``, then metric in :data:`METRICS` order."""
        n_layers, n_metrics = len(self._layer_names), len(METRICS)
        ids = [i for batch_ids, _ in self._batches for i in batch_ids]
        # (L, M, B) per batch -> (B, L, M) -> flat, matching the row order.
        values = np.concatenate(
            [v.transpose(2, 0, 1).reshape(-1) for _, v in self._batches] or [np.zeros(0, dtype=np.float64)]
        )
        n_images = len(ids)
        return pd.DataFrame(
            {
                "id": pd.Series(np.repeat(np.array(ids, dtype=object), n_layers * n_metrics), dtype="str"),
                "model": pd.Series([self.model_name] * (n_images * n_layers * n_metrics), dtype="str"),
                "layer_index": np.tile(np.repeat(np.arange(n_layers, dtype=np.int32), n_metrics), n_images),
                "layer_name": pd.Series(
                    np.tile(np.repeat(np.array(self._layer_names, dtype=object), n_metrics), n_images), dtype="str"
                ),
                "metric": pd.Series(np.tile(np.array(METRICS, dtype=object), n_images * n_layers), dtype="str"),
                "value": values.astype(np.float64, copy=False),
            }
        )

    def table(self) -> pa.Table:
        """:meth:`frame` as an Arrow table with :data:`SPARSITY_SCHEMA`."""
        return pa.Table.from_pandas(self.frame(), schema=SPARSITY_SCHEMA, preserve_index=False)

    def clear(self) -> None:
        """Drop the rows collected so far (the layer order fixed by the first batch stays)."""
        self._batches = []


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself, or the first tensor of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None
