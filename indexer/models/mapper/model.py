"""The mapper network, its trained result, its files, and inference on embedding vectors (encode, swap,
interpolate, predict_breeds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from indexer.models.checkpoint import CheckpointFormat, read_checkpoint, save_checkpoint
from indexer.models.interpolate import lerp, slerp
from indexer.models.mapper.config import MapperConfig, MapperError
from indexer.models.scoped import eval_mode

FORMAT = "mammals-space-mapper"
FORMAT_VERSION = 1
WEIGHTS_FILE = "mapper.safetensors"
META_FILE = "mapper.json"
_MAPPER_PREFIX = "mapper."
_CLASSIFIER_PREFIX = "classifier."
_EVAL_BATCH = 1024

CHECKPOINT = CheckpointFormat(FORMAT, FORMAT_VERSION, WEIGHTS_FILE, META_FILE, MapperError, "mapper")


class Mapper(nn.Module):
    """Two MLP encoders (identity, attributes) and one MLP decoder over embedding vectors.

    The encoders are separate networks rather than two heads of one trunk, as in Nitzan et al. (E_id and E_attr):
    a shared trunk would put breed features one linear layer away from z_attr. Activations are ``nn.ReLU``
    modules (one per layer, never functional calls) so forward hooks can record per-layer sparsity.

    ``encode`` returns z_id on the unit sphere (the triplet loss works in cosine distance, and the decoder reads
    the same normalised code) and z_attr unnormalised (its size is information the decoder may use).

    While training, the encoders may read standardised inputs (``set_input_scaling``, unsaved buffers) and the
    identity encoder's input takes dropout; ``fold_input_scaling`` then moves the standardisation into the
    weights, so a trained mapper's state is the same networks over unit embeddings as ever.
    """

    input_shift: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, input_dim: int, id_dim: int, attr_dim: int, hidden: int, id_input_dropout: float = 0.0) -> None:
        super().__init__()
        self.input_dim, self.id_dim, self.attr_dim, self.hidden = input_dim, id_dim, attr_dim, hidden
        self.id_input_dropout = id_input_dropout
        # Per-dimension standardisation of the encoders' input while training (not saved: ``fold_input_scaling``
        # moves it into the encoders' first layers, so a trained mapper reads unit embeddings directly).
        self.register_buffer("input_shift", torch.zeros(input_dim), persistent=False)
        self.register_buffer("input_scale", torch.ones(input_dim), persistent=False)
        self.id_encoder = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, id_dim))
        self.attr_encoder = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, attr_dim))
        self.decoder = nn.Sequential(
            nn.Linear(id_dim + attr_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, input_dim),
        )

    @classmethod
    def from_config(cls, input_dim: int, config: MapperConfig) -> Mapper:
        return cls(input_dim, config.id_dim, config.attr_dim, config.hidden, config.id_input_dropout)

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_shift) / self.input_scale

    def encode_id(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, input_dim)`` -> z_id ``(N, id_dim)``, unit norm (input dropout while training)."""
        xs = F.dropout(self._standardised(x), self.id_input_dropout, self.training)
        return F.normalize(self.id_encoder(xs), dim=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, input_dim)`` -> ``(z_id (N, id_dim), unit norm; z_attr (N, attr_dim))``."""
        return self.encode_id(x), self.attr_encoder(self._standardised(x))

    def set_input_scaling(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Encoders read ``(x - shift) / scale`` (per dimension) until ``fold_input_scaling``."""
        self.input_shift.copy_(shift)
        self.input_scale.copy_(scale)

    @torch.no_grad()
    def fold_input_scaling(self) -> None:
        """Fold the input standardisation into the first layer of each encoder, exactly as far as the algebra
        goes: ``W (x - shift) / scale + b == (W / scale) x + (b - (W / scale) shift)``; then read ``x`` as is."""
        for part in (self.id_encoder, self.attr_encoder):
            first = part[0]
            assert isinstance(first, nn.Linear)
            w = first.weight / self.input_scale
            first.bias.copy_(first.bias - w @ self.input_shift)
            first.weight.copy_(w)
        self.input_shift.zero_()
        self.input_scale.fill_(1.0)

    def decode(self, z_id: torch.Tensor, z_attr: torch.Tensor) -> torch.Tensor:
        """``(z_id, z_attr)`` -> reconstructed embedding ``(N, input_dim)`` (not normalised: callers compare by
        cosine or normalise, as the embeddings of the store are)."""
        return self.decoder(torch.cat([z_id, z_attr], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_id, z_attr = self.encode(x)
        return z_id, z_attr, self.decode(z_id, z_attr)

    def activation_layers(self) -> list[tuple[str, nn.Module]]:
        """The encoder-side activation modules in forward order: identity encoder first, then attributes."""
        out: list[tuple[str, nn.Module]] = []
        for prefix, part in (("id_encoder", self.id_encoder), ("attr_encoder", self.attr_encoder)):
            out.extend((f"{prefix}.{name}", m) for name, m in part.named_children() if isinstance(m, nn.ReLU))
        return out


@dataclass
class MapperResult:
    """A trained mapper with its frozen breed classifier, the split it was trained on and its validation report."""

    mapper: Mapper
    classifier: nn.Module
    """Frozen ``nn.Linear(input_dim, len(breeds))`` on L2-normalised embeddings; logits in ``breeds`` order."""
    breeds: list[str]
    split: dict[str, str]
    """Image id -> ``"train"`` or ``"val"`` (unlabelled images are always ``"train"``)."""
    report: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: MapperConfig = field(default_factory=MapperConfig)


# ------------------------------------------------------------------------------------------------- inputs


def as_matrix(vectors: np.ndarray | torch.Tensor, dim: int | None, what: str) -> torch.Tensor:
    """Float32 ``(N, D)`` tensor from one vector or a matrix; checks the width and finiteness."""
    t = torch.as_tensor(np.asarray(vectors, dtype=np.float32) if not isinstance(vectors, torch.Tensor) else vectors)
    t = t.detach().cpu().float()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise MapperError(f"{what}: expected a vector or an (N, D) matrix, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise MapperError(f"{what}: width {t.shape[1]}, the mapper takes {dim}")
    if not bool(torch.isfinite(t).all()):
        raise MapperError(f"{what}: contains NaN or infinite values")
    return t


def normalise(x: torch.Tensor, what: str = "vectors") -> torch.Tensor:
    """Rows scaled to unit L2 norm; ``MapperError`` for a zero row."""
    norms = x.norm(dim=1)
    if bool((norms < 1e-12).any()):
        raise MapperError(f"{what}: {int((norms < 1e-12).sum())} zero vector(s) cannot be L2-normalised")
    return x / norms[:, None]


# ------------------------------------------------------------------------------------------------ save/load


def _state(mapper: Mapper, classifier: nn.Module) -> dict[str, torch.Tensor]:
    state = {_MAPPER_PREFIX + k: v for k, v in mapper.state_dict().items()}
    state.update({_CLASSIFIER_PREFIX + k: v for k, v in classifier.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_mapper(result: MapperResult, directory: Path) -> dict[str, Any]:
    """Write ``mapper.safetensors`` (mapper and classifier weights, keys prefixed ``mapper.`` / ``classifier.``)
    and ``mapper.json`` (format, input dim, config, breeds, split, report, history, weights sha256), each
    atomically, weights first (see :mod:`indexer.models.checkpoint`).

    Returns ``{"sha256": <weights sha256>, "weights": path, "meta": path}``.
    """
    return save_checkpoint(CHECKPOINT, directory, _state(result.mapper, result.classifier), {
        "input_dim": result.mapper.input_dim,
        "config": result.config.to_dict(),
        "breeds": list(result.breeds),
        "split": result.split,
        "report": result.report,
        "history": result.history,
    })


def load_mapper(directory: Path) -> tuple[Mapper, nn.Module, dict[str, Any]]:
    """Read what ``save_mapper`` wrote: ``(mapper, frozen classifier, mapper.json contents)``, both in eval mode.

    Only safetensors are read (no pickles). Raises ``MapperError`` when a file is missing, the format is unknown,
    a tensor is missing or has a shape other than the config and breeds need, or the weights are not the ones
    the JSON names.
    """
    ckpt = read_checkpoint(CHECKPOINT, directory)
    meta = ckpt.meta
    try:
        config = MapperConfig.from_dict(meta["config"])
        input_dim = int(meta["input_dim"])
        breeds = [str(b) for b in meta["breeds"]]
    except (KeyError, TypeError, ValueError) as e:
        raise MapperError(f"{ckpt.meta_path}: bad metadata ({e})") from None
    mapper = Mapper.from_config(input_dim, config)
    classifier = nn.Linear(input_dim, len(breeds))
    ckpt.load_into(_state(mapper, classifier), needs=(
        f"{META_FILE} (input_dim {input_dim}, id_dim {config.id_dim}, attr_dim {config.attr_dim}, "
        f"hidden {config.hidden}, {len(breeds)} breeds)"))
    state = ckpt.state
    n_m = len(_MAPPER_PREFIX)
    mapper.load_state_dict({k[n_m:]: v for k, v in state.items() if k.startswith(_MAPPER_PREFIX)})
    n_c = len(_CLASSIFIER_PREFIX)
    classifier.load_state_dict({k[n_c:]: v for k, v in state.items() if k.startswith(_CLASSIFIER_PREFIX)})
    mapper.eval()
    classifier.eval()
    classifier.requires_grad_(False)
    return mapper, classifier, meta


# ------------------------------------------------------------------------------------------------ inference


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _codes(mapper: Mapper, vectors: np.ndarray | torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-ready codes (z_id unit norm, z_attr raw) of vectors, batched, in eval mode, on the CPU (the mapper
    itself may sit on another device)."""
    x = normalise(as_matrix(vectors, mapper.input_dim, what), what)
    dev = _device(mapper)
    ids, attrs = [], []
    with eval_mode(mapper):
        for s in range(0, len(x), _EVAL_BATCH):
            zi, za = mapper.encode(x[s : s + _EVAL_BATCH].to(dev))
            ids.append(zi.cpu())
            attrs.append(za.cpu())
    if not ids:
        return torch.zeros((0, mapper.id_dim)), torch.zeros((0, mapper.attr_dim))
    return torch.cat(ids), torch.cat(attrs)


def _decode(mapper: Mapper, z_id: torch.Tensor, z_attr: torch.Tensor) -> np.ndarray:
    dev = _device(mapper)
    out = []
    with eval_mode(mapper):
        for s in range(0, len(z_id), _EVAL_BATCH):
            dec = mapper.decode(z_id[s : s + _EVAL_BATCH].to(dev), z_attr[s : s + _EVAL_BATCH].to(dev))
            out.append(F.normalize(dec, dim=1).cpu())
    if not out:
        return np.zeros((0, mapper.input_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def encode(mapper: Mapper, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z_id (N, id_dim), z_attr (N, attr_dim))`` float32 for embeddings ``(N, D)`` (or one ``(D,)``).

    Both are L2-normalised so that inner product is cosine similarity, ready for a FAISS ``IndexFlatIP`` like the
    store's spaces. z_id is unit norm in the model too; z_attr's length, which the decoder also reads, is dropped
    here (use ``Mapper.encode`` for the decoder's own codes).
    """
    z_id, z_attr = _codes(mapper, vectors, "vectors")
    zi = z_id.numpy().astype(np.float32, copy=False)
    za = F.normalize(z_attr, dim=1).numpy().astype(np.float32, copy=False)
    return zi, za


def predict_breeds(classifier: nn.Module, breeds: Sequence[str], vectors: np.ndarray) -> list[str]:
    """The frozen classifier's breed for each embedding (e.g. of ``swap``'s output)."""
    x = normalise(as_matrix(vectors, None, "vectors"))
    with torch.no_grad():
        return [breeds[int(i)] for i in classifier(x.to(_device(classifier))).argmax(1).cpu()]


def _check_pair(mapper: Mapper, classifier: nn.Module, breeds: Sequence[str]) -> None:
    w = getattr(classifier, "weight", None)
    if isinstance(w, torch.Tensor) and tuple(w.shape) != (len(breeds), mapper.input_dim):
        raise MapperError(
            f"classifier is {tuple(w.shape)}, but {len(breeds)} breeds x input_dim {mapper.input_dim} were given"
        )


def swap(mapper: Mapper, classifier: nn.Module, breeds: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Decoded embedding(s), L2-normalised ``(N, D)``, with the identity (breed) of ``a`` and the attributes of
    ``b``. ``a`` and ``b`` are ``(N, D)`` or ``(D,)``; one row on either side is broadcast against the other.

    ``classifier`` and ``breeds`` are the pair saved with the mapper; they are checked against it here, and
    ``predict_breeds(classifier, breeds, swap(...))`` names the breed the swap reads as.
    """
    _check_pair(mapper, classifier, breeds)
    zi_a, _ = _codes(mapper, a, "a")
    _, za_b = _codes(mapper, b, "b")
    if len(zi_a) != len(za_b):
        if len(zi_a) == 1:
            zi_a = zi_a.expand(len(za_b), -1)
        elif len(za_b) == 1:
            za_b = za_b.expand(len(zi_a), -1)
        else:
            raise MapperError(f"a has {len(zi_a)} rows and b has {len(za_b)}: give equal counts or one row")
    return _decode(mapper, zi_a, za_b)


def interpolate(mapper: Mapper, a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` embeddings ``(steps, D)``, L2-normalised, decoded along the path from z(a) to z(b), endpoints
    included: z_id moves along the great circle (it lives on the unit sphere; where a and b are (anti)parallel and
    there is no unique great circle, along the chord, renormalised), z_attr along the straight line."""
    if steps < 2:
        raise MapperError(f"steps must be at least 2 (the path includes both ends), got {steps}")
    zi_a, za_a = _codes(mapper, a, "a")
    zi_b, za_b = _codes(mapper, b, "b")
    if len(zi_a) != 1 or len(zi_b) != 1:
        raise MapperError("interpolate takes one embedding for a and one for b")
    t = torch.linspace(0.0, 1.0, steps)
    z_id = F.normalize(slerp(zi_a[0], zi_b[0], t), dim=1)
    return _decode(mapper, z_id, lerp(za_a[0], za_b[0], t))
