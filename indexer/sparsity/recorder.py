"""Per-layer activation sparsity, recorded with forward hooks while a model indexes images.

For every image and every recorded layer the four metrics of :mod:`indexer.sparsity.metrics` go into a long
table ``(id, model, layer_index, layer_name, metric, value)`` (:data:`SPARSITY_SCHEMA`)::

    with SparsityRecorder(encoder, "encoder") as rec:
        for ids, x in batches:
            with rec.record(ids):
                encoder(x)
    table = rec.frame()

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
"""


from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The table's Arrow schema lives with the store's other on-disk contracts.
from indexer.sparsity.metrics import (
    DEFAULT_SAMPLE_UNITS,
    DEFAULT_THRESHOLD,
    METRICS,
    BatchSample,
    LayerSample,
    _check_threshold,
    finish_samples,
    sampled_sparsity_metrics,
    sparsity_metrics,
    take_sample,
)
from indexer.store.schema import SPARSITY_SCHEMA

__all__ = ["SPARSITY_SCHEMA", "SparsityRecorder", "activation_layers"]

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
# Activations whose output is never negative: their peak |a| is their max (ReLU6 subclasses Hardtanh, which may be
# negative, so it is listed by its own class).
_NONNEGATIVE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
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
    be unique within it. ``method`` is ``"exact"`` (every entry) or ``"sampled"`` (``units`` random entries per
    image and layer, seeded by the image's id: :func:`~indexer.sparsity.metrics.sampled_sparsity_metrics`).
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        layers: list[tuple[str, nn.Module]] | None = None,
        method: str = "exact",
        units: int = DEFAULT_SAMPLE_UNITS,
    ) -> None:
        if method not in ("exact", "sampled"):
            raise ValueError(f"method must be 'exact' or 'sampled', not {method!r}")
        if units < 2:
            raise ValueError(f"units must be at least 2, got {units}")
        self.method = method
        self.units = int(units)
        self._sample: BatchSample | None = None
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
        # (entry, call k, (len(METRICS), B) values, or a sampled layer's reads until the forward pass is over)
        self._pending: list[tuple[int, int, np.ndarray | LayerSample]] = []
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
            nonnegative = isinstance(module, _NONNEGATIVE)
            ceiling = 6.0 if isinstance(module, nn.ReLU6) else None
            with torch.no_grad():
                if self._sample is not None and _deferrable(acts, self._sample):
                    # Only the reads that need the activations happen here; the arithmetic runs for all
                    # layers at once when the forward pass is over (_finish).
                    self._pending.append((entry, k, take_sample(acts.detach(), self._sample,
                                                                nonnegative=nonnegative, ceiling=ceiling)))
                    return
                if self._sample is not None:
                    metrics = sampled_sparsity_metrics(acts, self._sample, threshold=self.threshold,
                                                       nonnegative=nonnegative, ceiling=ceiling)
                else:
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
        self._sample = BatchSample(batch_ids, self.units) if self.method == "sampled" else None
        self._calls = [0] * len(self._layers)
        self._pending = []
        self._root_calls = 0
        try:
            yield
            pending, self._pending = self._finish(self._pending), []
        finally:
            self._ids = None
            self._pending = []
            self._sample = None
        self._commit(batch_ids, pending)

    def _finish(self, pending: list[tuple[int, int, np.ndarray | LayerSample]]) -> list[tuple[int, int, np.ndarray]]:
        """The pending layers with the deferred samples' metrics computed, all in one call."""
        deferred = [(k, v) for k, (_, _, v) in enumerate(pending) if isinstance(v, LayerSample)]
        done = finish_samples([v for _, v in deferred], self.threshold)
        computed = {k: done[row] for row, (k, _) in enumerate(deferred)}
        return [(e, c, v if isinstance(v, np.ndarray) else computed[k]) for k, (e, c, v) in enumerate(pending)]

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
        return sparsity_frame(self.model_name, self._layer_names,
                              [(ids, v.transpose(2, 0, 1)) for ids, v in self._batches])

    def take(self) -> tuple[list[str], list[str], np.ndarray]:
        """The rows so far as (layer names, ids, ``(images, layers, len(METRICS))`` values), then :meth:`clear`:
        the form that travels between processes (a Ray worker returns it; the driver stores it)."""
        ids = [i for batch_ids, _ in self._batches for i in batch_ids]
        n_layers = len(self._layer_names)
        values = (np.concatenate([v.transpose(2, 0, 1) for _, v in self._batches]) if self._batches
                  else np.zeros((0, n_layers, len(METRICS)), dtype=np.float64))
        self.clear()
        return self.layer_names, ids, values

    def table(self) -> pa.Table:
        """:meth:`frame` as an Arrow table with :data:`SPARSITY_SCHEMA`."""
        return pa.Table.from_pandas(self.frame(), schema=SPARSITY_SCHEMA, preserve_index=False)

    def clear(self) -> None:
        """Drop the rows collected so far (the layer order fixed by the first batch stays)."""
        self._batches = []


def sparsity_frame(model_name: str, layer_names: Sequence[str],
                   batches: Sequence[tuple[Sequence[str], np.ndarray]]) -> pd.DataFrame:
    """The long sparsity table of recorded batches, each (ids, ``(images, layers, len(METRICS))`` values): rows in
    id order, then ``layer_index``, then metric in :data:`METRICS` order."""
    n_layers, n_metrics = len(layer_names), len(METRICS)
    ids = [i for batch_ids, _ in batches for i in batch_ids]
    values = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for _, v in batches]
                            or [np.zeros(0, dtype=np.float64)])
    n_images = len(ids)
    return pd.DataFrame(
        {
            "id": pd.Series(np.repeat(np.array(ids, dtype=object), n_layers * n_metrics), dtype="str"),
            "model": pd.Series([model_name] * (n_images * n_layers * n_metrics), dtype="str"),
            "layer_index": np.tile(np.repeat(np.arange(n_layers, dtype=np.int32), n_metrics), n_images),
            "layer_name": pd.Series(
                np.tile(np.repeat(np.array(list(layer_names), dtype=object), n_metrics), n_images), dtype="str"
            ),
            "metric": pd.Series(np.tile(np.array(METRICS, dtype=object), n_images * n_layers), dtype="str"),
            "value": values,
        }
    )


def _deferrable(acts: torch.Tensor, sample: BatchSample) -> bool:
    """A CPU float layer larger than the sample, of a batch of the sample's size: what :func:`take_sample` reads
    (anything else goes through :func:`sampled_sparsity_metrics` at once, which also gives its errors)."""
    return (acts.device.type == "cpu" and acts.is_floating_point() and acts.dim() >= 2 and acts.shape[0] > 0
            and len(sample) == acts.shape[0] and acts[0].numel() > sample.units)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself, or the first tensor of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None
