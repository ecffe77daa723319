"""The Ray Data engine: pass 1 of `mammals index` as a streaming Ray Data pipeline.

    paths -> [CPU tasks: read, hash, decode, preprocess] -> [model actors: ShardRunner] -> driver

The model stage runs the very :class:`indexer.shard.ShardRunner` the local engine runs, rebuilt in each actor from
the encoder's name, the store's trained models and the run's plan; the driver receives its outputs as
:class:`indexer.shard.ShardOutput` and appends and commits them exactly as for the local engine. Nothing here
writes the store, so a retried task or a restarted actor (Ray retries both) can only produce rows the driver
already has (content-hash ids), and a killed run resumes from what the driver last committed.

Columns crossing stages are plain bytes (tensors, vectors, sparsity values) plus strings and numbers, so every
block has the same schema whatever its photos (a batch without one good photo included). Pixels travel as uint8
and are converted and normalised in the model stage (:func:`split_transform`). Paths must be readable
at the same place on every node (shared storage).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.encoders import load_encoder, resolve_device
from indexer.engines import EngineOptions
from indexer.extract import Batch, FileResult, PhotoDataset, StageTimes, collate, lower_thread_priority
from indexer.latents import ENCODER, MAPPER, VAE, TrainedModels, load_trained_models
from indexer.runtime import SINGLE_ARENA_ENV, keep_freed_memory
from indexer.shard import RunPlan, ShardOutput, ShardRunner, decode_side, shard_transforms
from indexer.store import Store

log = logging.getLogger(__name__)

_PRECISION = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_RESULT_COLUMNS = ("index", "status", "id", "width", "height", "reason")
_MODELS = (ENCODER, MAPPER, VAE)  # forward seconds travel per model
# Blocks of this many batches: enough blocks for every decode task slot of a cluster, few enough to stay cheap.
_BATCHES_PER_BLOCK = 4


class ToFloat:
    """uint8 ``(..., C, H, W)`` -> float32 in [0, 1]: what ``ToTensor`` does after ``PILToTensor``, bit for bit."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div(255)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ShipFused:
    """The decode stage of a fused preprocessing (indexer/encoders/fused.py) whose crop fits every resized photo:
    the cropped photo's uint8 pixels, ``(3, H, W)``."""

    def __init__(self, fused: Any) -> None:
        self.fused = fused

    def __call__(self, img: Any) -> torch.Tensor:
        return self.fused.pixels(img)  # split_transform ships pixels only when the crop always fits


def split_transform(transform: Any) -> tuple[Any, Any]:
    """(photo -> transported tensor, transported batch -> model input) for one preprocessing.

    A torchvision ``Compose`` with one ``ToTensor`` is cut there: the decode stage ships uint8 pixels (a quarter
    of float32's bytes through Ray's object store) and the model stage converts and normalises the whole batch,
    with the same arithmetic ``ToTensor`` and ``Normalize`` do on one image. The fused step of a channels-last
    encoder (indexer/encoders/fused.py) is cut the same way. Any other preprocessing ships its float32 output
    unchanged (the second part is the identity)."""
    from torchvision.transforms import Compose, PILToTensor, ToTensor

    from indexer.encoders.fused import FusedResizeCrop

    if isinstance(transform, FusedResizeCrop):
        if max(transform.crop) > transform.short:  # some photos take the float fallback: ship floats
            return transform, Compose([])
        return ShipFused(transform), transform.normalise  # a bound method pickles with its object
    steps = list(getattr(transform, "transforms", []))
    cuts = [i for i, step in enumerate(steps) if isinstance(step, ToTensor)]
    if not isinstance(transform, Compose) or len(cuts) != 1:
        return transform, Compose([])
    i = cuts[0]
    return Compose([*steps[:i], PILToTensor()]), Compose([ToFloat(), *steps[i + 1:]])


@dataclass(frozen=True)
class ModelSpec:
    """What a model actor needs to rebuild the driver's ShardRunner (pickled to every actor)."""

    encoder: str
    precision: str
    store: str  # trained models are loaded from it when ``models`` is true (a new store has none, nor a manifest)
    models: bool
    plan: RunPlan
    gpu: bool
    threads: int
    finish: dict[str, Any]  # per transform name: the batch part of split_transform


def _result_columns(results: list[FileResult]) -> dict[str, np.ndarray]:
    return {
        "index": np.array([r.index for r in results], dtype=np.int64),
        "status": np.array([r.status for r in results], dtype=object),
        "id": np.array([r.id or "" for r in results], dtype=object),
        "width": np.array([r.width for r in results], dtype=np.int32),
        "height": np.array([r.height for r in results], dtype=np.int32),
        "reason": np.array([r.reason for r in results], dtype=object),
    }


def _results(batch: Mapping[str, np.ndarray], paths: list[str] | None = None) -> list[FileResult]:
    return [FileResult(int(i), paths[int(i)] if paths is not None else "", str(st), str(cid) or None, int(w), int(h),
                       str(reason))
            for i, st, cid, w, h, reason in zip(*(batch[c] for c in _RESULT_COLUMNS), strict=True)]


class DecodeStage:
    """CPU stage: one batch of paths -> results and preprocessed tensors (bytes per row, empty if not decoded)."""

    def __init__(self, transforms: dict[str, Any], known: frozenset[str], side: int) -> None:
        self.transforms, self.known, self.side = transforms, known, side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Decoding at the lowest priority, as the local engine's decode threads do (extract.lower_thread_priority
        # says why): on a machine shared with a model actor, decode then fills the cores the forward pass leaves
        # idle instead of slowing it down. Per call, because Ray Data may run batches on more than one thread of
        # the actor, and Linux sets nice values per thread.
        lower_thread_priority()
        data = PhotoDataset([str(p) for p in batch["path"]], self.transforms, self.known, self.side)
        items = [data[k] for k in range(len(data))]
        out = collate(items)
        for r, index in zip(out.results, batch["index"], strict=True):
            r.index = int(index)  # the run's position, not the batch's
        cols = _result_columns(out.results)
        ok = [k for k, r in enumerate(out.results) if r.status == "ok"]
        for name in self.transforms:
            tensor = out.tensors.get(name)
            rows = np.full(len(items), b"", dtype=object)
            shape, dtype = "", ""
            if tensor is not None:
                arr = tensor.numpy()
                shape, dtype = ",".join(str(d) for d in arr.shape[1:]), arr.dtype.str
                for j, k in enumerate(ok):
                    rows[k] = arr[j].tobytes()
            cols[f"t:{name}"] = rows
            cols[f"shape:{name}"] = np.full(len(items), shape, dtype=object)
            cols[f"dtype:{name}"] = np.full(len(items), dtype, dtype=object)
        return cols


class ModelStage:
    """Actor stage: the run's ShardRunner over decoded batches -> vectors and sparsity values (bytes per row)."""

    def __init__(self, spec: ModelSpec) -> None:
        keep_freed_memory()  # with SINGLE_ARENA_ENV (set at the actor's start) it covers Ray Data's batch thread
        torch.set_num_threads(spec.threads or os.cpu_count() or 1)
        device = resolve_device("cuda" if spec.gpu else "cpu")
        enc = load_encoder(spec.encoder, device=str(device), precision=spec.precision)
        models = (load_trained_models(Store.open(Path(spec.store)), device, spec.precision) if spec.models
                  else TrainedModels())
        self.plan = spec.plan
        self.finish = spec.finish
        self.runner = ShardRunner(enc, models, spec.plan, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = _results(batch)
        ok = [k for k, r in enumerate(results) if r.status == "ok"]
        tensors: dict[str, torch.Tensor] = {}
        for col in batch:
            if col.startswith("t:") and ok:
                name = col[2:]
                shape = tuple(int(d) for d in str(batch[f"shape:{name}"][ok[0]]).split(","))
                dtype = np.dtype(str(batch[f"dtype:{name}"][ok[0]]))
                flat = np.stack([np.frombuffer(batch[col][k], dtype=dtype) for k in ok])
                tensors[name] = self.finish[name](torch.from_numpy(flat.reshape(len(ok), *shape)))
        out = self.runner(Batch(results, tensors))
        cols = _result_columns(results)
        n = len(results)
        for space in self.plan.output_spaces():
            rows = np.full(n, b"", dtype=object)
            for j, k in enumerate(ok):
                rows[k] = np.ascontiguousarray(out.vectors[space][j], dtype=np.float32).tobytes()
            cols[f"v:{space}"] = rows
        for model in self.plan.sparsity:
            names, values = out.sparsity.get(model, ([], np.zeros((0, 0, 0))))
            rows = np.full(n, b"", dtype=object)
            for j, k in enumerate(ok):
                rows[k] = np.ascontiguousarray(values[j], dtype=np.float64).tobytes()
            cols[f"s:{model}"] = rows
            cols[f"layers:{model}"] = np.array([json.dumps(names) if k == 0 else "" for k in range(n)], dtype=object)
        for model in _MODELS:
            cols[f"fwd:{model}"] = np.array([out.forward_seconds.get(model, 0.0) if k == 0 else 0.0
                                             for k in range(n)], dtype=np.float64)
        return cols


def _shard_output(batch: Mapping[str, np.ndarray], paths: list[str], plan: RunPlan) -> ShardOutput:
    results = _results(batch, paths)
    ok = [k for k, r in enumerate(results) if r.status == "ok"]
    vectors = {space: np.stack([np.frombuffer(batch[f"v:{space}"][k], dtype=np.float32) for k in ok])
               for space in plan.output_spaces()} if ok else {}
    sparsity: dict[str, tuple[list[str], np.ndarray]] = {}
    for model in plan.sparsity:
        names: list[str] = next((json.loads(s) for s in batch[f"layers:{model}"] if s), [])
        if ok and names:
            values = np.stack([np.frombuffer(batch[f"s:{model}"][k], dtype=np.float64) for k in ok])
            sparsity[model] = (names, values.reshape(len(ok), len(names), -1))
    seconds = {m: float(np.sum(batch[f"fwd:{m}"])) for m in _MODELS}
    return ShardOutput(results, vectors, sparsity, {m: s for m, s in seconds.items() if s})


def ray_outputs(paths: list[str], runner: ShardRunner, known: frozenset[str], times: StageTimes,
                engine: EngineOptions, *, batch_size: int, store_path: Path,
                progress: bool = True) -> Iterator[ShardOutput]:
    """Pass 1 on Ray Data, in input order: the driver's ShardOutputs, one per model-stage batch."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'mammals-space[ray]'") from None
    if not paths:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=engine.ray_address, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the same first path for duplicate photos as the local run
        ctx.enable_progress_bars = progress
        enc = runner.enc
        transforms = shard_transforms(enc, runner.models, runner.plan)
        split = {name: split_transform(t) for name, t in transforms.items()}
        spec = ModelSpec(enc.name, _PRECISION.get(enc.autocast, "fp32"), str(store_path),
                         bool(runner.models.available()), runner.plan,
                         engine.num_gpus_per_worker > 0, engine.threads_per_worker,
                         {name: finish for name, (_, finish) in split.items()})
        blocks = max(1, math.ceil(len(paths) / (batch_size * _BATCHES_PER_BLOCK)))
        items = [{"index": i, "path": p} for i, p in enumerate(paths)]
        ds: Any = ray.data.from_items(items, override_num_blocks=blocks)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Actor pools: Ray Data restarts a dead actor and retries its batches (max_restarts / max_task_retries
        # default to -1 for them), which is what makes a killed worker harmless.
        ds = ds.map_batches(DecodeStage, fn_constructor_args=({name: ship for name, (ship, _) in split.items()}, known,
                                                              decode_side(enc, runner.models, transforms)),
                            batch_size=batch_size, batch_format="numpy", num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus))
        ds = ds.map_batches(ModelStage, fn_constructor_args=(spec,), batch_size=batch_size, batch_format="numpy",
                            num_cpus=1, num_gpus=engine.num_gpus_per_worker or None,
                            compute=ray.data.ActorPoolStrategy(size=engine.concurrency),
                            # Ray Data runs the forward pass on a thread of the actor (indexer/runtime.py says why).
                            runtime_env={"env_vars": SINGLE_ARENA_ENV})
        it = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        while True:
            t0 = time.perf_counter()
            batch: Mapping[str, np.ndarray] | None = next(it, None)
            times.wait += time.perf_counter() - t0
            if batch is None:
                return
            yield _shard_output(batch, paths, runner.plan)
    finally:
        if started:
            ray.shutdown()
