"""`mammals train mapper|vae`: train a store's models on what the store holds, evaluate them and register them.

Training itself is the models' (:mod:`indexer.models`); this module feeds them the store's vectors or photos,
adds the neighbour-vote measures of :mod:`analysis.evaluate` to their reports (which is why it lives in the
analysis layer), and installs the result.

A trained model goes into ``STORE/models/<model>/<sha256[:16]>/`` (written into a temp folder and renamed), the
manifest is swapped to name it, and only then is the previous version removed: a run killed at any point
leaves a store whose manifest names a complete model.  Registering a model drops exactly the spaces and
sparsity rows computed by its previous version; the next `mammals index` recomputes them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from analysis.appearance import (
    appearance_codes,
    appearance_report,
    cross_breed_neighbours,
    save_neighbour_grid,
)
from indexer import defaults
from indexer.latents import MAPPER, MODEL_SPACES, MODELS_DIR, VAE
from indexer.store import Store, StoreError, schema, utcnow
from indexer.store.atomic import current_umask

if TYPE_CHECKING:
    from indexer.models.mapper import MapperConfig, MapperResult
    from indexer.models.vae import FeatureMatch, VAEConfig, VAEResult

log = logging.getLogger(__name__)

ATTRIBUTE_GRID_ROWS = 8  # validation photos in the mapper's z_attr neighbour grid
ATTRIBUTE_GRID_NEIGHBOURS = 5  # other-breed neighbours per photo, in the grid and the appearance report


def _install_model(store_path: Path, model: str, tmp_dir: Path, info: dict[str, Any]) -> Path:
    """Move a finished model folder into place, register it, invalidate what its predecessor computed.

    Training only reads the store; the writer lock is taken here, waiting for a writer that holds it (an index
    run can finish its commits while this model trained; the model is then registered on top of them).
    """
    with Store.open(store_path, write=True, wait=True) as store:
        final = store.path / MODELS_DIR / model / info["sha256"][:16]
        if final.exists():  # retrained to identical weights (same seed, same data): keep the existing copy
            shutil.rmtree(tmp_dir)
        else:
            os.replace(tmp_dir, final)
        previous = store.manifest.get("models", {}).get(model)
        store.manifest.setdefault("models", {})[model] = {**info, "dir": str(final.relative_to(store.path)),
                                                          "trained_at": utcnow().isoformat()}
        if previous is None or previous.get("sha256") != info["sha256"]:
            for sp in MODEL_SPACES[model]:
                if sp in store.space_names():
                    store.drop_space(sp)
            if model in store.sparsity_models():
                store.drop_sparsity(model)
        store.commit()
        # Older versions go only after the manifest has stopped naming them.
        for old in (store.path / MODELS_DIR / model).iterdir():
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return final


def _check_writable(store_path: Path) -> None:
    """Refuse before training (minutes) rather than after it when another process is writing the store."""
    with Store.open(store_path, write=True):
        pass


def _temp_model_dir(store: Store, model: str) -> Path:
    parent = store.path / MODELS_DIR / model
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".training-", dir=parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from a lab's other users
    return tmp


def _labelled_breeds(store: Store, ids: list[str]) -> list[str | None]:
    breeds = store.images.set_index("id").loc[ids, "breed"]
    return [None if b is None or (isinstance(b, float) and np.isnan(b)) else str(b) for b in breeds]


def fit_store_mapper(store_path: Path, config: MapperConfig | None = None, *,
                     progress: bool = True) -> MapperResult:
    """Train the identity/attribute mapper on the store's encoder embeddings and breed labels (nothing is written).

    The report gets the held-out kNN breed accuracy of the raw embeddings and of both codes (same split, same k)."""
    from analysis.evaluate import knn_accuracy
    from indexer.models.mapper import MapperConfig, encode, train_mapper

    store = Store.open(store_path)
    cfg = config or MapperConfig()
    sp = store.space(schema.ENCODER_SPACE)
    breeds = _labelled_breeds(store, sp.ids)
    if sum(b is not None for b in breeds) < 2 or len({b for b in breeds if b}) < 2:
        raise StoreError(f"{store_path}: the mapper needs breed labels for at least two breeds")
    result = train_mapper(sp.vectors, breeds, sp.ids, cfg, progress=progress)
    z_id, z_attr = encode(result.mapper, sp.vectors)
    rows = {part: [i for i, (id_, b) in enumerate(zip(sp.ids, breeds, strict=True))
                   if b is not None and result.split.get(id_) == part] for part in ("train", "val")}
    tr, va = rows["train"], rows["val"]
    ytr, yva = [str(breeds[i]) for i in tr], [str(breeds[i]) for i in va]
    for name, x in (("raw", sp.vectors), ("z_id", z_id), ("z_attr", z_attr)):
        result.report[f"val_knn_breed_acc_{name}"] = knn_accuracy(x[tr], ytr, x[va], yva, cfg.knn_k)
    # What z_attr holds instead: val photos' nearest photos of other breeds should look alike (colour, framing).
    codes = appearance_codes(_store_paths(store, sp.ids))
    appearance = appearance_report(codes, {"raw": sp.vectors, "z_id": z_id, "z_attr": z_attr}, breeds, va,
                                   k=ATTRIBUTE_GRID_NEIGHBOURS, seed=cfg.seed)
    result.report.update({f"val_{key}": value for key, value in appearance.items()})
    return result


def _store_paths(store: Store, ids: list[str]) -> list[str]:
    return [str(p) for p in store.images.set_index("id").loc[ids, "path"]]


def save_attribute_grid(store: Store, result: MapperResult, out: Path, n: int = ATTRIBUTE_GRID_ROWS) -> None:
    """PNG of the first ``n`` validation photos, each followed by its nearest photos of other breeds in z_attr."""
    from indexer.models.mapper import encode

    sp = store.space(schema.ENCODER_SPACE)
    breeds = _labelled_breeds(store, sp.ids)
    val = [i for i, (id_, b) in enumerate(zip(sp.ids, breeds, strict=True))
           if b is not None and result.split.get(id_) == "val"]
    val = val[:: max(1, len(val) // n)][:n]  # spread over the store's order, which groups breeds
    if not val:
        return
    _, z_attr = encode(result.mapper, sp.vectors)
    nbrs = cross_breed_neighbours(z_attr, breeds, val, ATTRIBUTE_GRID_NEIGHBOURS)
    save_neighbour_grid(_store_paths(store, sp.ids), breeds, val, nbrs, out)


def install_mapper(store_path: Path, result: MapperResult) -> dict[str, Any]:
    """Save a trained mapper into the store and register it (its spaces are recomputed by the next index run)."""
    from indexer.models.mapper import save_mapper

    store = Store.open(store_path)
    tmp = _temp_model_dir(store, MAPPER)
    saved = save_mapper(result, tmp)
    save_attribute_grid(store, result, tmp / "attribute_neighbours.png")
    info = {"sha256": saved["sha256"], "config": result.config.to_dict(), "report": result.report,
            "trained_on": {"images": len(result.split), "encoder": store.encoder["name"]}}
    final = _install_model(store_path, MAPPER, tmp, info)
    return {**info, "dir": str(final), "attribute_neighbours_png": str(final / "attribute_neighbours.png")}


def new_store_with_models(src: Path, dst: Path) -> None:
    """A new, empty store at ``dst`` with the encoder and trained models of the store at ``src`` (trained models
    reused on another collection): its first index run computes every space and sparsity record of each photo."""
    trained = Store.open(src)
    new = Store.create(dst, trained.encoder)
    try:
        new.manifest["models"] = trained.manifest["models"]
        shutil.copytree(src / MODELS_DIR, dst / MODELS_DIR)
        new.commit()
    finally:
        new.close()


def train_store_mapper(store_path: Path, config: MapperConfig | None = None, *,
                       progress: bool = True) -> dict[str, Any]:
    """`mammals train mapper`: refuse early if the store is being written, fit, evaluate, install."""
    _check_writable(store_path)
    return install_mapper(store_path, fit_store_mapper(store_path, config, progress=progress))


@dataclass
class FittedVAE:
    """A trained VAE and its validation photos (the reconstruction grid is drawn from them when installed)."""

    result: VAEResult
    val_images: torch.Tensor


def fit_store_vae(store_path: Path, config: VAEConfig | None = None, *, progress: bool = True,
                  workers: int = 1, device: str = defaults.DEVICE) -> FittedVAE:
    """Train the convolutional VAE on the store's photos (nothing is written); the report gets the species
    agreement of its validation reconstructions. ``device`` ``"auto"`` trains on CUDA when there is one."""
    from analysis.evaluate import reconstruction_report
    from indexer.models.vae import VAEConfig, load_images, train_vae

    store = Store.open(store_path)
    cfg = config or VAEConfig()
    ids = store.images["id"].tolist()
    if len(ids) < 10:
        raise StoreError(f"{store_path}: the VAE needs at least 10 indexed photos, the store has {len(ids)}")
    images = load_images(store.images["path"].tolist(), cfg.image_size, workers=workers)
    result = train_vae(images, ids, cfg, progress=progress, perceptual=_feature_match(store, cfg), device=device)
    val_rows = [k for k, i in enumerate(ids) if result.split.get(i) == "val"]
    val_images = images[val_rows]
    quality = reconstruction_report(store, result.model, val_images, [ids[k] for k in val_rows])
    result.report.update({f"val_{name}": value for name, value in quality.items()})
    return FittedVAE(result, val_images)


def _feature_match(store: Store, cfg: VAEConfig) -> FeatureMatch | None:
    """The perceptual term through the store's own frozen encoder, when the config asks for one."""
    from analysis.neighbours import encoder_for_store
    from indexer.models.vae import FeatureMatch

    if cfg.perceptual_weight <= 0:
        return None
    enc = encoder_for_store(store)
    pre = enc.preprocessing
    size = cfg.perceptual_size or int(pre.get("size") or pre.get("crop") or 224)
    return FeatureMatch(enc.model, pre.get("mean", (0.0,) * 3), pre.get("std", (1.0,) * 3), size,
                        crop=cfg.perceptual_crop)


def install_vae(store_path: Path, fitted: FittedVAE) -> dict[str, Any]:
    """Save a trained VAE and its grids into the store and register it."""
    from indexer.models.vae import save_reconstruction_grid, save_sample_grid, save_vae

    store = Store.open(store_path)
    result = fitted.result
    tmp = _temp_model_dir(store, VAE)
    saved = save_vae(result, tmp)
    save_reconstruction_grid(result.model, fitted.val_images, tmp / "reconstructions.png")
    save_sample_grid(result.model, tmp / "samples.png", seed=result.config.seed)
    info = {"sha256": saved["sha256"], "config": result.config.to_dict(), "report": result.report,
            "trained_on": {"images": len(result.split)}}
    final = _install_model(store_path, VAE, tmp, info)
    return {**info, "dir": str(final), "reconstructions_png": str(final / "reconstructions.png"),
            "samples_png": str(final / "samples.png")}


def train_store_vae(store_path: Path, config: VAEConfig | None = None, *, progress: bool = True,
                    workers: int = 1, device: str = defaults.DEVICE) -> dict[str, Any]:
    """`mammals train vae`: refuse early if the store is being written, fit, evaluate, install."""
    _check_writable(store_path)
    return install_vae(store_path, fit_store_vae(store_path, config, progress=progress, workers=workers,
                                                 device=device))
