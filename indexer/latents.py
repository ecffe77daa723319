"""A store's trained models (mapper, VAE) and the feature spaces they produce.

One place for which model makes which space, where its files live, and whether a space or a sparsity record
is still current: a space is current when it was computed by the model file whose sha256 the manifest names.
Retraining writes a new file, so exactly the spaces (and sparsity rows) of that model go stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from indexer import defaults
from indexer.store import Store, StoreError
from indexer.store.hashing import file_sha256_cached

MODELS_DIR = "models"
ENCODER, MAPPER, VAE = "encoder", "mapper", "vae"
# Which spaces each trained model produces, in the order they are computed.
MODEL_SPACES: dict[str, tuple[str, ...]] = {
    MAPPER: ("mapper_id", "mapper_attr"),
    VAE: ("vae_mu", "vae_logvar"),
}
SPACE_MODEL: dict[str, str] = {sp: m for m, spaces in MODEL_SPACES.items() for sp in spaces}


@dataclass
class TrainedModels:
    """The models a store has, loaded for inference (CPU or the run's device), with their file hashes."""

    mapper: Any = None  # indexer.models.mapper.Mapper
    mapper_classifier: Any = None
    mapper_meta: dict[str, Any] = field(default_factory=dict)
    vae: Any = None  # indexer.models.vae.ConvVAE
    vae_meta: dict[str, Any] = field(default_factory=dict)
    vae_autocast: torch.dtype | None = None  # what the VAE's encoder computes in when it indexes (vae_autocast)
    sha256: dict[str, str] = field(default_factory=dict)  # model -> weights file sha256

    def available(self) -> list[str]:
        return [m for m in (MAPPER, VAE) if getattr(self, m) is not None]

    @property
    def vae_image_size(self) -> int:
        return int(self.vae_meta["config"]["image_size"])


def load_trained_models(store: Store, device: torch.device | str = "cpu",
                        precision: str = defaults.PRECISION) -> TrainedModels:
    """Load every model the manifest lists, refusing a weights file that differs from the recorded one.
    ``precision`` (as for encoders: ``auto``, ``fp32``, ``fp16``, ``bf16``) sets :func:`vae_autocast`."""
    from indexer.models.mapper import WEIGHTS_FILE as MAPPER_WEIGHTS
    from indexer.models.mapper import load_mapper
    from indexer.models.vae import WEIGHTS_FILE as VAE_WEIGHTS
    from indexer.models.vae import load_vae

    out = TrainedModels()
    recorded: Mapping[str, Any] = store.manifest.get("models", {})
    for name, weights_file in ((MAPPER, MAPPER_WEIGHTS), (VAE, VAE_WEIGHTS)):
        if name not in recorded:
            continue
        d = store.path / recorded[name]["dir"]
        weights = d / weights_file
        if not weights.exists():
            raise StoreError(f"{weights}: the manifest lists a trained {name} but its weights are missing "
                             f"(retrain with `mammals train {name} --store {store.path}`)")
        sha = file_sha256_cached(weights)
        if sha != recorded[name]["sha256"]:
            raise StoreError(f"{weights}: sha256 {sha[:12]}… differs from the manifest's "
                             f"{recorded[name]['sha256'][:12]}… (retrain, or restore the file)")
        out.sha256[name] = sha
        if name == MAPPER:
            out.mapper, out.mapper_classifier, out.mapper_meta = load_mapper(d)
            out.mapper.to(device).eval()
            out.mapper_classifier.to(device).eval()
        else:
            out.vae, out.vae_meta = load_vae(d)
            vae_for_inference(out.vae.to(device).eval())
            out.vae_autocast = vae_autocast(precision, torch.device(device))
    return out


def vae_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the VAE's encoder when it computes the ``vae_*`` spaces (None: float32).

    ``"auto"``: bfloat16 on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), else float32. Unlike
    EfficientNet-Lite0's, the default VAE's encoder keeps its numbers in bfloat16: on the pets photos ``vae_mu``
    is within cosine 0.99996 of float32 (tests/test_latent_spaces.py asserts 0.999), at 2.8x the speed on this
    project's CPU (18.5 -> 6.5 ms for a batch of 32). On CUDA ``"auto"`` stays float32: half precision there is
    unmeasured (no GPU here), and the VAE's share of a GPU run is small. ``"fp16"``/``"bf16"`` force a half
    precision as for encoders (:func:`indexer.encoders.registry.autocast_dtype`), ``"fp32"`` turns it off. The
    decoder (the latent explorer's images) always runs in float32."""
    from indexer.encoders.registry import autocast_dtype, cpu_has_bf16

    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return autocast_dtype(precision, device, torch.channels_last)


def vae_for_inference(vae: Any) -> int:
    """Fold the VAE encoder's BatchNorms into its convolutions and run it channels-last: its posterior for
    indexing in about half the time (106 -> 48 ms for a batch of 32 at 64 px on this project's 2-core CPU), the
    same numbers (the fold checks its output; indexer/encoders/fold.py). The decoder is left as trained.
    Returns how many BatchNorms were folded."""
    from indexer.encoders.fold import fold_batchnorm

    dev = next(vae.parameters()).device
    probe = torch.rand(2, 3, vae.image_size, vae.image_size, generator=torch.Generator().manual_seed(0)).to(dev)
    folded = fold_batchnorm(vae.encoder, probe)
    for module in (vae.encoder, vae.fc_mu, vae.fc_logvar):
        module.to(memory_format=torch.channels_last)
    return folded


def space_is_current(store: Store, space: str, models: TrainedModels) -> bool:
    model = SPACE_MODEL[space]
    meta = store.space_meta(space) if space in store.space_names() else {}
    return bool(meta) and meta.get("model_sha256") == models.sha256.get(model)


def space_meta(model: str, models: TrainedModels) -> dict[str, Any]:
    from indexer.encoders.registry import precision_name

    meta = {"kind": model, "model": model, "model_sha256": models.sha256[model]}
    if model == VAE:
        meta["precision"] = precision_name(models.vae_autocast)
    return meta


def sparsity_method(info: Mapping[str, Any]) -> str:
    """How a store's sparsity rows of one model were computed: ``"exact"`` or ``"sampled:<units>"`` (rows written
    before sampling existed carry no method and are exact)."""
    method = str(info.get("method", "exact"))
    return f"sampled:{int(info.get('sample_units', 0))}" if method == "sampled" else method


def sparsity_is_current(store: Store, model: str, sha: str, threshold: float, method: str = "exact") -> bool:
    """The model's rows were computed from these weights, with this threshold and method (``sparsity_method``)."""
    info = store.sparsity_models().get(model) or {}
    return (info.get("model_sha256") == sha and info.get("threshold") == threshold
            and sparsity_method(info) == method)


@torch.inference_mode()
def mapper_vectors(models: TrainedModels, encoder_vectors: np.ndarray) -> dict[str, np.ndarray]:
    """z_id and z_attr of encoder embeddings (L2-normalised by the mapper, ready for cosine search)."""
    from indexer.models.mapper import encode

    z_id, z_attr = encode(models.mapper, encoder_vectors)
    return {"mapper_id": z_id.astype(np.float32), "mapper_attr": z_attr.astype(np.float32)}


@torch.inference_mode()
def vae_vectors(models: TrainedModels, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The VAE posterior mean and log-variance of a batch of preprocessed images (raw, for decoding)."""
    dev = next(models.vae.parameters()).device
    half = models.vae_autocast
    with torch.autocast(dev.type, dtype=half or torch.bfloat16, enabled=half is not None):
        mu, logvar = models.vae.encode(images.to(dev).contiguous(memory_format=torch.channels_last))
    return {"vae_mu": mu.float().cpu().numpy(), "vae_logvar": logvar.float().cpu().numpy()}

