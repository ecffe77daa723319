"""One shard of indexing, the same code on every engine: decoded photos in, vectors and sparsity rows out.

The local engine runs a :class:`ShardRunner` on the batches of its decode threads (indexer/extract.py); the Ray
engine (indexer/engines/ray_data.py) decodes in a CPU stage and runs one :class:`ShardRunner` per actor of its
model stage. Either way only the driver writes the store: it drops content ids it already has, appends and
commits (indexer/pipeline.py), so a shard that is retried, or a run that is killed and run again, never
duplicates a row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from indexer import defaults
from indexer.encoders import Encoder
from indexer.extract import Batch, FileResult, StageTimes, embed
from indexer.latents import ENCODER, MAPPER, MODEL_SPACES, VAE, TrainedModels, mapper_vectors, vae_vectors
from indexer.sparsity import SparsityRecorder
from indexer.sparsity.metrics import GINI_ESTIMATOR, SAMPLE_DESIGN, gini_units
from indexer.store import Store, schema


@dataclass
class RunPlan:
    """What this run computes for new photos (live) and what it recomputes for all photos (backfill)."""

    live_spaces: list[str]  # derived spaces computed for new photos in pass 1
    backfill_models: list[str]  # models whose spaces are (re)computed for every photo in pass 2
    sparsity: dict[str, str]  # model -> weights sha256 of the models whose sparsity is recorded
    threshold: float
    method: str = "exact"  # "exact" or "sampled:<units>" (indexer.latents.sparsity_method)

    @property
    def sampling(self) -> tuple[str, int]:
        """The recorder's (method, units)."""
        kind, _, units = self.method.partition(":")
        return kind, int(units or defaults.SPARSITY_SAMPLE_UNITS)

    def sparsity_info(self, model: str) -> dict[str, Any]:
        kind, units = self.sampling
        info: dict[str, Any] = {"model_sha256": self.sparsity[model], "threshold": self.threshold, "method": kind}
        return {**info, "sample_units": units, "gini_units": gini_units(units),
                "sample_design": SAMPLE_DESIGN, "gini_estimator": GINI_ESTIMATOR} if kind == "sampled" else info

    def needs_vae_pixels(self) -> bool:
        return any(s in self.live_spaces for s in MODEL_SPACES[VAE])

    def live_models(self) -> list[str]:
        """The models :func:`forward_spaces` runs on new photos: the encoder, and the mapper and VAE when their
        spaces are live (otherwise pass 2 computes their spaces, and records their sparsity, for every photo)."""
        out = [ENCODER]
        if any(sp in self.live_spaces for sp in MODEL_SPACES[MAPPER]):
            out.append(MAPPER)
        if self.needs_vae_pixels():
            out.append(VAE)
        return out

    def output_spaces(self) -> list[str]:
        """The spaces :func:`forward_spaces` returns for new photos, in its order."""
        return [schema.ENCODER_SPACE, *(sp for model in self.live_models()[1:] for sp in MODEL_SPACES[model])]


class Recorders:
    """One SparsityRecorder per model whose sparsity this run records, attached for the run's duration."""

    def __init__(self, stack: ExitStack, enc: Encoder, models: TrainedModels, plan: RunPlan):
        self.plan = plan
        self.by_model: dict[str, SparsityRecorder] = {}
        nets: dict[str, tuple[torch.nn.Module, Any]] = {ENCODER: (enc.model, None)}
        if models.mapper is not None:
            nets[MAPPER] = (models.mapper, models.mapper.activation_layers())
        if models.vae is not None:
            nets[VAE] = (models.vae, models.vae.activation_layers())
        for model, (net, layers) in nets.items():
            if model in plan.sparsity:
                method, units = plan.sampling
                self.by_model[model] = stack.enter_context(
                    SparsityRecorder(net, model, threshold=plan.threshold, layers=layers, method=method,
                                     units=units))

    def record(self, model: str, ids: list[str]) -> Any:
        rec = self.by_model.get(model)
        return rec.record(ids) if rec is not None else ExitStack()

    def flush(self, store: Store, keep_ids: set[str] | None = None) -> None:
        """Move recorded rows into the store (only rows of ``keep_ids`` when given: duplicates are dropped)."""
        for model, rec in self.by_model.items():
            df = rec.frame()
            rec.clear()
            if keep_ids is not None:
                df = df[df["id"].isin(keep_ids)]
            if len(df):
                store.add_sparsity(df.reset_index(drop=True), model,
                                   {**self.plan.sparsity_info(model), "layers": rec.layer_names})

    def take(self, models: Sequence[str]) -> dict[str, tuple[list[str], np.ndarray]]:
        """The rows recorded since the last take, per model of ``models`` that has a recorder: (layer names,
        ``(images, layers, metrics)`` values) in the order the images were recorded."""
        out = {}
        for model in models:
            if model in self.by_model:
                names, _, values = self.by_model[model].take()
                out[model] = (names, values)
        return out

    def missing_ids(self, store: Store, model: str) -> list[str]:
        """Store ids without sparsity rows of ``model`` (all of them after a retrain or a --no-sparsity run)."""
        if model not in self.by_model:
            return []
        have = store.sparsity_ids(model)
        return [i for i in store.image_ids() if i not in have]


def forward_spaces(
    batch: Batch, oks: list[FileResult], enc: Encoder, models: TrainedModels, plan: RunPlan, recorders: Recorders,
    times: StageTimes, dev: torch.device,
) -> dict[str, np.ndarray]:
    """Every live space for the batch's good photos: encoder, then mapper (from it), then VAE (from pixels)."""
    ids = [r.id for r in oks if r.id is not None]
    t = time.perf_counter()
    with recorders.record(ENCODER, ids):
        enc_vecs = embed(enc.model, batch.tensors["encoder"], dev, **enc.run_options)
    times.add_forward(ENCODER, time.perf_counter() - t)
    out = {schema.ENCODER_SPACE: enc_vecs}
    live = plan.live_models()
    if MAPPER in live:
        t = time.perf_counter()
        with recorders.record(MAPPER, ids):
            out.update(mapper_vectors(models, enc_vecs))
        times.add_forward(MAPPER, time.perf_counter() - t)
    if VAE in live:
        t = time.perf_counter()
        with recorders.record(VAE, ids):
            out.update(vae_vectors(models, batch.tensors[VAE]))
        times.add_forward(VAE, time.perf_counter() - t)
    return out


def shard_transforms(enc: Encoder, models: TrainedModels, plan: RunPlan) -> dict[str, Any]:
    """The per-photo preprocessing a shard of new photos needs: the encoder's, and the VAE's when it runs."""
    transforms: dict[str, Any] = {"encoder": enc.preprocess}
    if plan.needs_vae_pixels():
        from indexer.models.vae import vae_transform

        transforms[VAE] = vae_transform(models.vae_image_size)
    return transforms


def decode_side(enc: Encoder, models: TrainedModels, transforms: dict[str, Any]) -> int:
    """The largest shorter side the run's transforms resize to (reduced-scale JPEG decoding stays above it)."""
    sides = []
    if "encoder" in transforms:
        if not enc.input_side:
            return 0  # a preprocessing we cannot read: decode at full size
        sides.append(enc.input_side)
    if VAE in transforms:
        sides.append(models.vae_image_size)
    return max(sides, default=0)


@dataclass
class ShardOutput:
    """What one shard produced: every file's result, and for its "ok" files (in order) the vectors of each live
    space and the sparsity values of each recorded model."""

    results: list[FileResult]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # space -> (n_ok, dim) float32
    sparsity: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)  # model -> (layers, values)
    forward_seconds: dict[str, float] = field(default_factory=dict)  # model -> seconds

    @property
    def ok(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "ok"]


class ShardRunner:
    """The models of one run, loaded and hooked once (a Ray actor holds one): ``runner(batch)`` -> ShardOutput."""

    def __init__(self, enc: Encoder, models: TrainedModels, plan: RunPlan, device: torch.device) -> None:
        self.enc, self.models, self.plan, self.device = enc, models, plan, device
        self._stack = ExitStack()
        self.recorders = Recorders(self._stack, enc, models, plan)

    def __call__(self, batch: Batch) -> ShardOutput:
        oks = batch.ok
        if not oks:
            return ShardOutput(batch.results)
        times = StageTimes()
        vectors = forward_spaces(batch, oks, self.enc, self.models, self.plan, self.recorders, times, self.device)
        # Only the models that ran: a recorded model whose spaces pass 2 computes has no rows for this batch.
        sparsity = self.recorders.take(self.plan.live_models())
        return ShardOutput(batch.results, vectors, sparsity, dict(times.forward))

    def close(self) -> None:
        """Remove the sparsity hooks."""
        self._stack.close()

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
