"""`mammals train mapper|vae`: train a store's models on what the store holds and register them in its manifest.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.latents import MAPPER, MODEL_SPACES, MODELS_DIR, VAE
from indexer.store import Store, StoreError, schema, utcnow
from indexer.store.atomic import current_umask

log = logging.getLogger(__name__)


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


def train_store_mapper(store_path: Path, config: Any = None, *, progress: bool = True) -> dict[str, Any]:
    """Train the identity/attribute mapper on the store's encoder embeddings and breed labels."""
    from indexer.models.mapper import MapperConfig, save_mapper, train_mapper

    _check_writable(store_path)
    store = Store.open(store_path)
    cfg = config or MapperConfig()
    sp = store.space(schema.ENCODER_SPACE)
    breeds = _labelled_breeds(store, sp.ids)
    if sum(b is not None for b in breeds) < 2 or len({b for b in breeds if b}) < 2:
        raise StoreError(f"{store_path}: the mapper needs breed labels for at least two breeds")
    result = train_mapper(sp.vectors, breeds, sp.ids, cfg, progress=progress)
    tmp = _temp_model_dir(store, MAPPER)
    saved = save_mapper(result, tmp)
    info = {"sha256": saved["sha256"], "config": cfg.to_dict(), "report": result.report,
            "trained_on": {"images": len(sp.ids), "encoder": store.encoder["name"]}}
    final = _install_model(store_path, MAPPER, tmp, info)
    return {**info, "dir": str(final)}


def train_store_vae(store_path: Path, config: Any = None, *, progress: bool = True,
                    workers: int = 1) -> dict[str, Any]:
    """Train the convolutional VAE on the store's photos; write grids; check reconstructions' species."""
    from indexer.models.vae import (
        VAEConfig,
        load_images,
        save_reconstruction_grid,
        save_sample_grid,
        save_vae,
        train_vae,
    )

    _check_writable(store_path)
    store = Store.open(store_path)
    cfg = config or VAEConfig()
    ids = store.images["id"].tolist()
    if len(ids) < 10:
        raise StoreError(f"{store_path}: the VAE needs at least 10 indexed photos, the store has {len(ids)}")
    images = load_images(store.images["path"].tolist(), cfg.image_size, workers=workers)
    result = train_vae(images, ids, cfg, progress=progress)
    val_rows = [k for k, i in enumerate(ids) if result.split.get(i) == "val"]
    val_images = images[val_rows]
    report: dict[str, Any] = dict(result.report)
    report["val_species_agreement"] = reconstruction_species_agreement(store, result.model, val_images,
                                                                       [ids[k] for k in val_rows])
    tmp = _temp_model_dir(store, VAE)
    saved = save_vae(result, tmp)
    save_reconstruction_grid(result.model, val_images, tmp / "reconstructions.png")
    save_sample_grid(result.model, tmp / "samples.png", seed=cfg.seed)
    info = {"sha256": saved["sha256"], "config": cfg.to_dict(), "report": report,
            "trained_on": {"images": len(ids)}}
    final = _install_model(store_path, VAE, tmp, info)
    return {**info, "dir": str(final), "reconstructions_png": str(final / "reconstructions.png"),
            "samples_png": str(final / "samples.png")}


@torch.inference_mode()
def reconstruction_species_agreement(store: Store, vae: Any, images: torch.Tensor, ids: list[str],
                                     k: int = 10) -> float | None:
    """How often the pretrained encoder puts a VAE reconstruction in the same species as its original.

    Each reconstruction is embedded with the store's encoder and given the species of a similarity-weighted
    vote of its k nearest indexed photos (the original excluded); compared with the original's label.
    """
    from indexer.extract import embed
    from indexer.models.vae import decode_latents, encode_images, to_pil
    from indexer.query import encoder_for_store, search_vectors

    species = store.images.set_index("id").loc[ids, "species"]
    keep = [k_ for k_, s in enumerate(species) if isinstance(s, str)]
    if not keep:
        return None
    enc = encoder_for_store(store)
    recon = decode_latents(vae, encode_images(vae, images[keep]))
    batch = torch.stack([enc.preprocess(im) for im in to_pil(recon)])
    vecs = embed(enc.model, batch, torch.device("cpu"))
    hits = 0
    for row, nbrs in zip(keep, search_vectors(store, vecs, k=k + 1), strict=True):
        votes: dict[str, float] = {}
        for n in [n for n in nbrs if n.id != ids[row]][:k]:
            if n.species:
                votes[n.species] = votes.get(n.species, 0.0) + max(n.similarity, 0.0)
        if votes and max(votes, key=lambda s: votes[s]) == species.iloc[row]:
            hits += 1
    return hits / len(keep)
