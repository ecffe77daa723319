"""`mammals index`: folders -> catalog -> embeddings, latents and sparsity -> store, incrementally and resumably.

One run has two passes:

1. **new photos**: read, hash, decode, embed with the encoder, and compute every derived space whose model is
   current (mapper from the embedding, VAE from the pixels), recording per-layer sparsity with forward hooks;
2. **backfill**: spaces that are missing or stale (a model was trained or retrained since they were computed)
   and sparsity rows that are missing are computed for every image already in the store — the mapper from the
   stored embeddings, pixel models by reading the photos again.

The store is committed every ``commit_every_seconds`` in pass 1 and after each backfilled model, so a killed run
keeps what it committed and the next run picks up exactly what is still missing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from indexer import defaults
from indexer.encoders import Encoder, load_encoder, resolve_device
from indexer.encoders.registry import precision_name
from indexer.engines import EngineOptions
from indexer.extract import Batch, FileResult, StageTimes, embed, iter_batches
from indexer.latents import (
    ENCODER,
    MAPPER,
    MODEL_SPACES,
    VAE,
    TrainedModels,
    load_trained_models,
    mapper_vectors,
    space_is_current,
    space_meta,
    sparsity_is_current,
    sparsity_method,
    vae_vectors,
)
from indexer.runtime import keep_freed_memory
from indexer.shard import (
    Recorders,
    RunPlan,
    ShardOutput,
    ShardRunner,
    decode_side,
    shard_transforms,
)
from indexer.sources import CatalogRow, is_utf8_path, join_labels, printable_path, scan
from indexer.sparsity import DEFAULT_THRESHOLD, sparsity_frame
from indexer.store import Store, StoreError, schema, utcnow
from indexer.store.lock import StoreLockedError, WriterLock

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one `index` run did (printed by the CLI, recorded in the manifest's run history)."""

    store: str
    scanned: int = 0
    added: int = 0
    already_indexed: int = 0
    duplicates: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    labels_matched: int | None = None
    labels_updated: int | None = None  # already-indexed images whose labels the CSV changed
    spaces: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)  # spaces / sparsity records backfilled for all images

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "scanned": self.scanned,
            "added": self.added,
            "already_indexed": self.already_indexed,
            "duplicates": self.duplicates,
            "errors": len(self.errors),
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 2),
            "stages": self.stages,
            "labels_matched": self.labels_matched,
            "labels_updated": self.labels_updated,
            "spaces": self.spaces,
            "recomputed": self.recomputed,
        }


def catalog(
    sources: Sequence[Path], *, layout: str = "auto", species: str | None = None, labels_csv: Path | None = None
) -> tuple[list[CatalogRow], int | None]:
    """Scan every source (in order, first occurrence of a path wins) and join extra labels."""
    rows: list[CatalogRow] = []
    seen: set[Path] = set()
    for src in sources:
        for row in scan(src, layout=layout, species=species):
            if row.path not in seen:
                seen.add(row.path)
                rows.append(row)
    matched = None
    if labels_csv is not None:
        rows, matched = join_labels(rows, labels_csv)
    return rows, matched


def _image_rows(batch_rows: list[tuple[CatalogRow, FileResult]], now: Any) -> pd.DataFrame:
    records = []
    for row, res in batch_rows:
        assert res.id is not None
        rec = {
            "id": res.id,
            "faiss_id": schema.faiss_id_of(res.id),
            "path": str(row.path),
            "relpath": row.relpath,
            "species": row.species,
            "breed": row.breed,
            "dataset": row.dataset,
            "layout": row.layout,
            "width": res.width,
            "height": res.height,
            "indexed_at": now,
        }
        for k, v in row.labels.items():
            if k not in rec:  # label columns never shadow the schema's own columns
                rec[k] = v
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    df["width"] = df["width"].astype("int32")
    df["height"] = df["height"].astype("int32")
    df["indexed_at"] = pd.to_datetime(df["indexed_at"], utc=True)
    return df


def resolve_sparsity(store: Store, sparsity: bool | str) -> str:
    """The sparsity method of a run: ``"off"``, ``"exact"`` or ``"sampled:<units>"``.

    ``True``/``"auto"``: the method the store's rows were computed with (one store, one method: mixing would make
    images incomparable), else :data:`indexer.defaults.SPARSITY`. A method other than the store's recomputes
    every image's rows, as a new threshold does."""
    if sparsity is False or sparsity == "off":
        return "off"
    if sparsity is True or sparsity == "auto":
        recorded = store.sparsity_models()
        kinds = {sparsity_method(info) for info in recorded.values()}
        if len(kinds) == 1:
            return kinds.pop()
        sparsity = defaults.SPARSITY
    if sparsity == "exact":
        return "exact"
    if sparsity == "sampled":
        return f"sampled:{defaults.SPARSITY_SAMPLE_UNITS}"
    raise StoreError(f"unknown sparsity method {sparsity!r} (choose from auto, {', '.join(defaults.SPARSITY_METHODS)})")


def _plan(store: Store, enc: Encoder, models: TrainedModels, *, sparsity: str, threshold: float) -> RunPlan:
    live: list[str] = []
    backfill: list[str] = []
    for model in models.available():
        spaces = MODEL_SPACES[model]
        if all(space_is_current(store, sp, models) for sp in spaces):
            live.extend(spaces)
        elif not len(store):
            # No photo to backfill (trained models given to a new store): start the model's spaces empty, as the
            # encoder's starts, and compute them for the new photos as they come, instead of reading every
            # photo a second time in pass 2.
            _start_spaces(store, enc, models, model)
            live.extend(spaces)
        else:
            for sp in spaces:
                if sp in store.space_names():
                    store.drop_space(sp)  # stale: computed by an older model file
            backfill.append(model)
    shas = {ENCODER: enc.weights_sha256, **models.sha256}
    recorded: dict[str, str] = {}
    if sparsity != "off":
        for model, sha in shas.items():
            if model in store.sparsity_models() and not sparsity_is_current(store, model, sha, threshold, sparsity):
                store.drop_sparsity(model)
            recorded[model] = sha
    return RunPlan(live, backfill, recorded, threshold, sparsity if sparsity != "off" else "exact")


def _start_spaces(store: Store, enc: Encoder, models: TrainedModels, model: str) -> None:
    """Empty spaces of ``model`` in a store without photos, their widths read off one probe forward pass."""
    if model == MAPPER:
        probe = mapper_vectors(models, np.full((1, enc.dim), enc.dim ** -0.5, dtype=np.float32))
    else:
        side = models.vae_image_size
        probe = vae_vectors(models, torch.full((1, 3, side, side), 0.5))
    for sp in MODEL_SPACES[model]:
        store.set_space(sp, [], np.zeros((0, probe[sp].shape[1]), np.float32), space_meta(model, models))


def run_index(
    sources: Sequence[Path],
    store_path: Path,
    *,
    encoder: str | Encoder = defaults.ENCODER,
    layout: str = "auto",
    species: str | None = None,
    labels_csv: Path | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    workers: int = defaults.WORKERS,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    progress: bool = True,
    commit_every_seconds: float = defaults.COMMIT_EVERY_SECONDS,
    sparsity: bool | str = True,
    sparsity_threshold: float = DEFAULT_THRESHOLD,
    wait: bool = False,
    index_kind: str | None = None,
    engine: EngineOptions | str = defaults.ENGINE,
) -> IndexReport:
    """Index the photos under ``sources`` into the store at ``store_path`` (created if missing).

    Only files whose content hash is not yet in the store are embedded; spaces of models trained since the last
    run, and sparsity rows still missing, are computed for every stored image.  The run holds the store's writer
    lock throughout (``wait`` for it when another process holds it; else a StoreError naming the holder).
    ``index_kind`` forces the vector index type (see ``indexer.store.vectors.INDEX_KINDS``; default: by size).
    ``sparsity``: ``"auto"`` (or True: the store's method, else ``"sampled"``), ``"sampled"``, ``"exact"`` or
    ``"off"`` (or False); see :func:`resolve_sparsity`.  ``engine``: where new photos are decoded and embedded
    (:class:`indexer.engines.EngineOptions`, or just its name: ``"local"`` or ``"ray"``); this process writes the
    store either way.
    """
    engine = engine if isinstance(engine, EngineOptions) else EngineOptions(engine)
    t_start = time.perf_counter()
    keep_freed_memory()  # 2-3x faster CPU forward passes (indexer/runtime.py says why)
    if not wait:
        _refuse_if_locked(store_path)  # before minutes of scanning and model loading, not after
    rows, matched = catalog(sources, layout=layout, species=species, labels_csv=labels_csv)
    dev = resolve_device(device)
    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder, device=str(dev), precision=precision)
    with Store.open_or_create(store_path, enc.describe(), wait=wait) as store:
        return _run_locked(store, rows, matched, enc, dev, sources=sources, layout=layout, species=species,
                           labels_csv=labels_csv, batch_size=batch_size, workers=workers, progress=progress,
                           commit_every_seconds=commit_every_seconds, sparsity=sparsity,
                           sparsity_threshold=sparsity_threshold, index_kind=index_kind, t_start=t_start,
                           engine=engine, precision=precision)


def _refuse_if_locked(store_path: Path) -> None:
    """A StoreError naming the writer when another process holds the lock (only a probe: released at once)."""
    if (store_path / schema.MANIFEST).exists():
        lock = WriterLock(store_path)
        try:
            lock.acquire()
        except StoreLockedError as e:
            raise StoreError(str(e)) from None
        lock.release()


def recompute_spaces(store_path: Path, spaces: Sequence[str], *, device: str = defaults.DEVICE,
                     progress: bool = True) -> list[str]:
    """Recompute whole spaces for every image (`mammals verify --repair` on unreadable ones): drop them from the
    published version, then one run of this pipeline computes them again from the photos (encoder, VAE) or from
    the encoder space (mapper).  Their old files stay on disk until garbage collection, as for any version."""
    with Store.open(store_path, write=True) as store:
        encoder = store.encoder["name"]
        for name in spaces:
            store.drop_space(name)
        store.commit()
    run_index([], store_path, encoder=encoder, device=device, progress=progress,
              sparsity=bool(Store.open(store_path).sparsity_models()))
    now = Store.open(store_path).space_names()
    return [s for s in spaces if s in now]


def _run_locked(
    store: Store, rows: list[CatalogRow], matched: int | None, enc: Encoder, dev: torch.device, *,
    sources: Sequence[Path], layout: str, species: str | None, labels_csv: Path | None, batch_size: int,
    workers: int, progress: bool, commit_every_seconds: float, sparsity: bool | str, sparsity_threshold: float,
    index_kind: str | None, t_start: float, engine: EngineOptions, precision: str = defaults.PRECISION,
) -> IndexReport:
    store_path = store.path
    if schema.ENCODER_SPACE not in store.space_names() and len(store):
        _recompute_encoder_space(store, enc, dev, batch_size=batch_size, workers=workers, progress=progress)
    models = load_trained_models(store, dev, precision)
    method = resolve_sparsity(store, sparsity)
    plan = _plan(store, enc, models, sparsity=method, threshold=sparsity_threshold)
    report = IndexReport(store=str(store_path), scanned=len(rows), labels_matched=matched)
    if labels_csv is not None:
        report.labels_updated = _relabel(store, rows)
    parameters = {
        "sources": [str(Path(s).resolve()) for s in sources],
        "layout": layout,
        "species": species,
        "labels_csv": str(labels_csv) if labels_csv else None,
        "batch_size": batch_size,
        "workers": workers,
        "device": str(dev),
        "precision": precision_name(enc.autocast),
        "sparsity": method,
        "sparsity_threshold": sparsity_threshold,
        "index": index_kind or store.manifest.get("parameters", {}).get("index") or "auto",
        "engine": engine.name,
    }
    store.manifest.setdefault("parameters", {})["index"] = parameters["index"]
    started = utcnow()
    times = StageTimes()
    with ShardRunner(enc, models, plan, dev) as runner:
        _add_new_photos(rows, store, runner, report, times, parameters, engine=engine, batch_size=batch_size,
                        workers=workers, progress=progress, commit_every_seconds=commit_every_seconds)
        _backfill(store, enc, models, plan, runner.recorders, report, times, dev, parameters,
                  batch_size=batch_size, workers=workers, progress=progress)
    report.seconds = time.perf_counter() - t_start
    report.stages = times.as_dict()
    report.spaces = store.space_names()
    run = {"started_at": started.isoformat(), "finished_at": utcnow().isoformat(),
           **{k: v for k, v in report.as_dict().items() if k != "store"}}
    store.commit(parameters=parameters, run=run)
    # Index maintenance (merging segments, an approximate index once a space is large) is its own version, so
    # that no append commit pays for it.
    t = time.perf_counter()
    if store.optimize():
        times.add_forward("optimize_index", time.perf_counter() - t)
    return report


def _recompute_encoder_space(store: Store, enc: Encoder, dev: torch.device, *, batch_size: int, workers: int,
                             progress: bool) -> None:
    """Embed every indexed photo again (the encoder space was unreadable and `mammals verify --repair` dropped
    it).  A photo that cannot be read again is left out of the space and counted as missing, never invented."""
    ids = store.image_ids()
    path_of = dict(zip(store.images["id"], store.images["path"], strict=True))
    have: list[str] = []
    parts: list[np.ndarray] = []
    bar = tqdm(total=len(ids), unit="img", desc="re-embed", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for batch in iter_batches([path_of[i] for i in ids], {"encoder": enc.preprocess}, batch_size=batch_size,
                                  workers=workers, pin_memory=dev.type == "cuda", side=enc.input_side):
            sel = [k for k, r in enumerate(batch.ok) if r.id == ids[r.index]]
            for r in batch.results:
                if r.status != "ok" or r.id != ids[r.index]:
                    log.warning("could not re-read %s for the encoder space: %s", r.path, r.reason or "file changed")
            if sel:
                parts.append(embed(enc.model, batch.tensors["encoder"][sel], dev, **enc.run_options))
                have.extend(str(batch.ok[k].id) for k in sel)
            bar.update(len(batch.results))
    finally:
        bar.close()
    mat = np.concatenate(parts) if parts else np.zeros((0, int(enc.describe()["dim"])), np.float32)
    store.set_space(schema.ENCODER_SPACE, have, mat, {"kind": "encoder"})
    store.commit()


def _relabel(store: Store, rows: list[CatalogRow]) -> int:
    """Give photos indexed by an earlier run the labels this run's CSV has for them (matched by path).

    A run only embeds new photos, but a labels CSV (e.g. ratings) given later must still reach the old ones.
    """
    id_of = dict(zip(store.images["path"], store.images["id"], strict=True))
    records: dict[str, dict[str, Any]] = {}
    for r in rows:
        image_id = id_of.get(str(r.path))
        if image_id is not None:
            records[image_id] = {**r.labels, "species": r.species, "breed": r.breed}
    if not records:
        return 0
    return store.set_labels(pd.DataFrame.from_dict(records, orient="index"))


def _local_outputs(paths: list[str], runner: ShardRunner, known: frozenset[str], times: StageTimes, *,
                   batch_size: int, workers: int) -> Iterator[ShardOutput]:
    """The local engine: decode threads feed batches to the one :class:`ShardRunner` of this process."""
    transforms = shard_transforms(runner.enc, runner.models, runner.plan)
    it = iter_batches(paths, transforms, known_ids=known, batch_size=batch_size, workers=workers,
                      pin_memory=runner.device.type == "cuda",
                      side=decode_side(runner.enc, runner.models, transforms))
    while True:
        t0 = time.perf_counter()
        batch: Batch | None = next(it, None)
        times.wait += time.perf_counter() - t0
        if batch is None:
            return
        yield runner(batch)


def _add_new_photos(
    rows: list[CatalogRow], store: Store, runner: ShardRunner, report: IndexReport, times: StageTimes,
    parameters: dict[str, Any], *, engine: EngineOptions, batch_size: int, workers: int, progress: bool,
    commit_every_seconds: float,
) -> None:
    """Pass 1: shards of new photos from the engine; this process alone appends them to the store and commits."""
    known = frozenset(store.known_ids())
    seen_now: set[str] = set()
    rows, bad_names = _split_undecodable_names(rows)
    for row in bad_names:
        path = printable_path(row.path)
        report.errors.append((path, NON_UTF8_REASON))
        log.warning("skipped %s: %s", path, NON_UTF8_REASON)
    pending_rows: list[tuple[CatalogRow, FileResult]] = []
    pending_vecs: dict[str, list[np.ndarray]] = {}
    pending_sparsity: dict[str, tuple[list[str], list[tuple[list[str], np.ndarray]]]] = {}
    pending_errors: list[dict[str, Any]] = [
        {"path": printable_path(r.path), "reason": NON_UTF8_REASON, "dataset": r.dataset, "seen_at": utcnow()}
        for r in bad_names]
    plan = runner.plan

    def flush() -> None:
        nonlocal pending_rows, pending_vecs, pending_sparsity, pending_errors
        if pending_rows:
            store.add_images(_image_rows(pending_rows, utcnow()),
                             {sp: np.concatenate(v) for sp, v in pending_vecs.items()})
            for model, (names, batches) in pending_sparsity.items():
                if any(len(ids) for ids, _ in batches):
                    store.add_sparsity(sparsity_frame(model, names, batches), model,
                                       {**plan.sparsity_info(model), "layers": names})
        store.set_errors(pending_errors)
        if store.dirty:  # a run that found nothing new publishes no empty version
            store.commit(parameters=parameters)
        pending_rows, pending_vecs, pending_sparsity, pending_errors = [], {}, {}, []

    paths = [str(r.path) for r in rows]
    if engine.name == "ray":
        from indexer.engines.ray_data import ray_outputs

        outputs = ray_outputs(paths, runner, known, times, engine, batch_size=batch_size, store_path=store.path,
                              progress=progress)
    else:
        outputs = _local_outputs(paths, runner, known, times, batch_size=batch_size, workers=workers)
    bar = tqdm(total=len(rows), unit="img", desc="index", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    last_commit = time.perf_counter()
    try:
        for out in outputs:
            for res in out.results:
                if res.status == "known":
                    report.already_indexed += 1
                elif res.status == "error":
                    report.errors.append((res.path, res.reason))
                    log.warning("skipped %s: %s", res.path, res.reason)
                    pending_errors.append({"path": res.path, "reason": res.reason,
                                           "dataset": rows[res.index].dataset, "seen_at": utcnow()})
            for model, seconds in out.forward_seconds.items():
                times.add_forward(model, seconds)
            keep = []
            for k, res in enumerate(out.ok):
                assert res.id is not None
                if res.id in seen_now:  # the same bytes under a second path (or a retried shard): index once
                    report.duplicates += 1
                    continue
                seen_now.add(res.id)
                keep.append(k)
                pending_rows.append((rows[res.index], res))
            if keep:
                for sp, v in out.vectors.items():
                    pending_vecs.setdefault(sp, []).append(v[keep])
                kept_ids = [str(out.ok[k].id) for k in keep]
                for model, (names, values) in out.sparsity.items():
                    pending_sparsity.setdefault(model, (names, []))[1].append((kept_ids, values[keep]))
                report.added += len(keep)
            bar.update(len(out.results))
            if time.perf_counter() - last_commit > commit_every_seconds:
                flush()
                last_commit = time.perf_counter()
    finally:
        bar.close()
    flush()


# Arrow and Parquet strings are UTF-8: a name that is not cannot be stored as a path, nor safely re-read later.
NON_UTF8_REASON = "file name is not valid UTF-8 (rename the file to index it)"


def _split_undecodable_names(rows: list[CatalogRow]) -> tuple[list[CatalogRow], list[CatalogRow]]:
    good: list[CatalogRow] = []
    bad: list[CatalogRow] = []
    for r in rows:
        (good if is_utf8_path(r.path) else bad).append(r)
    return good, bad


def _backfill(
    store: Store, enc: Encoder, models: TrainedModels, plan: RunPlan, recorders: Recorders, report: IndexReport,
    times: StageTimes, dev: torch.device, parameters: dict[str, Any], *, batch_size: int, workers: int,
    progress: bool,
) -> None:
    """Compute, for photos already in the store, the spaces and sparsity rows that are missing."""
    ids = store.image_ids()
    if not ids:
        return
    # The mapper reads stored embeddings: no photo is read again.
    mapper_ids = ids if MAPPER in plan.backfill_models else recorders.missing_ids(store, MAPPER)
    if mapper_ids and models.mapper is not None:
        enc_space = store.space(schema.ENCODER_SPACE)
        row_of = {i: k for k, i in enumerate(enc_space.ids)}
        mapper_ids = [i for i in mapper_ids if i in row_of]  # an image missing from the encoder space has no input
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(mapper_ids), batch_size):
            chunk = mapper_ids[start:start + batch_size]
            t = time.perf_counter()
            with recorders.record(MAPPER, chunk):
                for sp, v in mapper_vectors(models, enc_space.vectors[[row_of[i] for i in chunk]]).items():
                    parts.setdefault(sp, []).append(v)
            times.add_forward(MAPPER, time.perf_counter() - t)
        if MAPPER in plan.backfill_models:
            for sp in MODEL_SPACES[MAPPER]:
                mat = np.concatenate(parts[sp]) if parts else np.zeros((0, 1), np.float32)
                store.set_space(sp, mapper_ids, mat, space_meta(MAPPER, models))
            report.recomputed.extend(MODEL_SPACES[MAPPER])
        recorders.flush(store)
        store.commit(parameters=parameters)

    # Pixel models: read the photos of the ids that need the encoder's sparsity or the VAE again.
    need_enc = set(recorders.missing_ids(store, ENCODER))
    vae_all = VAE in plan.backfill_models and models.vae is not None
    need_vae = set(ids) if vae_all else set(recorders.missing_ids(store, VAE))
    todo = [i for i in ids if i in need_enc or i in need_vae]
    if not todo:
        return
    from indexer.models.vae import vae_transform

    transforms: dict[str, Any] = {}
    if need_enc:
        transforms["encoder"] = enc.preprocess
    if need_vae and models.vae is not None:
        transforms[VAE] = vae_transform(models.vae_image_size)
    path_of = dict(zip(store.images["id"], store.images["path"], strict=True))
    vae_rows: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(total=len(todo), unit="img", desc="backfill", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for batch in iter_batches([path_of[i] for i in todo], transforms, batch_size=batch_size, workers=workers,
                                  pin_memory=dev.type == "cuda", side=decode_side(enc, models, transforms)):
            good = [r for r in batch.ok if r.id == todo[r.index]]
            for r in batch.results:
                if r.status != "ok" or r.id != todo[r.index]:
                    log.warning("could not re-read %s for the backfill: %s", r.path, r.reason or "file changed")
            sel = [k for k, r in enumerate(batch.ok) if r.id == todo[r.index]]
            if good and need_enc and "encoder" in batch.tensors:
                enc_ids = [r.id for r in good if r.id in need_enc]
                pick = [k for k, r in zip(sel, good, strict=True) if r.id in need_enc]
                if enc_ids:
                    t = time.perf_counter()
                    with recorders.record(ENCODER, [str(i) for i in enc_ids]):
                        embed(enc.model, batch.tensors["encoder"][pick], dev, **enc.run_options)
                    times.add_forward(ENCODER, time.perf_counter() - t)
            if good and VAE in batch.tensors:
                vae_ids = [str(r.id) for r in good if r.id in need_vae]
                pick = [k for k, r in zip(sel, good, strict=True) if r.id in need_vae]
                if vae_ids:
                    t = time.perf_counter()
                    with recorders.record(VAE, vae_ids):
                        latents = vae_vectors(models, batch.tensors[VAE][pick])
                    times.add_forward(VAE, time.perf_counter() - t)
                    for k, i in enumerate(vae_ids):
                        vae_rows[i] = {sp: arr[k] for sp, arr in latents.items()}
            bar.update(len(batch.results))
    finally:
        bar.close()
    if vae_all:
        have = [i for i in ids if i in vae_rows]
        if len(have) < len(ids):
            # A photo that moved or broke since it was indexed has no VAE latent: it is left out of the VAE spaces
            # (counted as `missing` in their metadata), never given a made-up vector that search would return.
            log.warning("%d photo(s) could not be re-read for the VAE spaces; they are left out of them",
                        len(ids) - len(have))
        for sp in MODEL_SPACES[VAE]:
            dim = models.vae.latent_dim
            mat = np.stack([vae_rows[i][sp] for i in have]) if have else np.zeros((0, dim), np.float32)
            store.set_space(sp, have, mat, space_meta(VAE, models))
        report.recomputed.extend(MODEL_SPACES[VAE])
    recorders.flush(store)
    store.commit(parameters=parameters)
