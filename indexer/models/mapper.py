"""Identity/attribute mapper over frozen image embeddings, after Nitzan et al. 2020 ("Face Identity
Disentanglement via Latent Space Mapping"), adapted from faces to cat and dog breeds.

The mapper is trained on embedding vectors (e.g. the 1280-d EfficientNet-Lite0 features of the store), not on
pixels. Two encoders split an embedding ``x`` into ``z = [z_id | z_attr]``: ``z_id`` should carry the breed
(identity) and ``z_attr`` what is left (pose, colour, framing, background). A decoder maps ``z`` back to the
embedding space. Losses, per batch (weights and the reasons for their defaults in ``MapperConfig``):

* reconstruction: ``decode(z_id(A), z_attr(A))`` has high cosine with ``A`` (all images, labelled or not);
* same-breed cross reconstruction: ``decode(z_id(A'), z_attr(A))`` with ``A'`` another image of A's breed also
  reconstructs ``A``. A breed is shared by all its photos as a person's identity is by all theirs, so z_id should
  not care which photo it came from; this keeps instance detail out of z_id and makes z_attr necessary;
* identity, through a breed classifier trained first on the raw embeddings and then frozen:
  ``decode(z_id(A), z_attr(B))``, ``B`` a shuffled partner in the batch, must be classified as A's breed. This is
  Nitzan et al.'s swap + identity loss; the classifier plays the role of their frozen face-recognition network;
* triplet (batch-hard, cosine distance, margin, P x K batches) on the L2-normalised ``z_id`` by breed, plus a
  normalised-softmax loss against learned breed proxies, so that ``z_id`` is a search space where breeds cluster;
* breed out of z_attr: the swap + identity loss only teaches the *decoder* to ignore breed in z_attr; nothing
  stops the attribute *encoder* from copying breed into z_attr too (it helps reconstruction), and a probe then
  reads it back. A Fisher penalty, trace(S_T^-1 S_B) of z_attr by breed within the batch (the squared canonical
  correlations with the breed, i.e. what the best linear read-out of the batch gets), removes the linearly
  readable part without a min-max game. A gradient-reversal adversary and Nitzan-style swap cycle are options,
  off by default (``MapperConfig`` says what they did on the pets photos).

Unlabelled images (breed ``None``) take part in reconstruction only (and serve as swap attribute partners).

Everything is deterministic for a given seed on the CPU: one seeded global RNG fork for the weights, one seeded
``torch.Generator`` for batches and partners, a seeded ``numpy.random.Generator`` for the split, and
``torch.use_deterministic_algorithms`` while training.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from indexer.errors import UsageError
from indexer.models.checkpoint import CheckpointFormat, read_checkpoint, save_checkpoint
from indexer.models.scoped import deterministic, eval_mode, num_threads

FORMAT = "mammals-space-mapper"
FORMAT_VERSION = 1
WEIGHTS_FILE = "mapper.safetensors"
META_FILE = "mapper.json"
_MAPPER_PREFIX = "mapper."
_CLASSIFIER_PREFIX = "classifier."
_EVAL_BATCH = 1024
_PROXY_SCALE = 16.0  # cosine-softmax temperature: 16 lets 45 classes reach confident probabilities (NormFace)
_PROBE_SEED = 0  # random_state of the sklearn probes: fixed, independent of the mapper's seed


class MapperError(UsageError):
    """A mapper file, input or setting that cannot be used (bad shapes, unknown format, bad labels)."""


CHECKPOINT = CheckpointFormat(FORMAT, FORMAT_VERSION, WEIGHTS_FILE, META_FILE, MapperError, "mapper")


# --------------------------------------------------------------------------------------------------- config


@dataclass
class MapperConfig:
    """Architecture, losses and training settings of a mapper (saved beside the weights).

    The defaults train on the 1,140 shared pets embeddings (1280-d) in well under a minute on a 2-core CPU.
    """

    id_dim: int = 64
    """Size of z_id (identity = breed); 45 breeds fit comfortably on a 64-d sphere."""
    attr_dim: int = 32
    """Size of z_attr (pose, colour, framing, background). Small next to the 1280-d input, so there is little room
    to hide breed nonlinearly; 32 rather than 16 because a 16-d linear code of the within-breed residual recovers
    only about half of what a 64-d one does on the pets (PCA of x minus its breed mean)."""
    hidden: int = 256
    """Width of the hidden layer of each encoder and of the two hidden layers of the decoder."""
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay of the mapper (and adversary)."""
    rec_weight: float = 1.0
    """Reconstruction: mean (1 - cosine(x, decode(encode(x)))), every image (labelled or not)."""
    cross_weight: float = 1.0
    """Same-breed cross reconstruction: decode(z_id(A'), z_attr(A)) reconstructs A, A' a random train image of A's
    breed. A breed's identity is shared by all its images (as a person's is by all their photos in Nitzan et al.),
    so this pushes instance detail out of z_id; without it z_attr ends up unused or carrying everything."""
    id_weight: float = 0.2
    """Identity: cross-entropy of the frozen classifier on decode(z_id(A), z_attr(B)) against A's breed. At 1 the
    decoder learns to ignore z_attr (any attribute can tip a linear classifier) and reconstruction drops below
    what the breed means alone give; at 0.2, 75-83% of the validation swaps still read as A's breed."""
    triplet_weight: float = 1.0
    """Batch-hard triplet loss on the normalised z_id, by breed (labelled images only)."""
    proxy_weight: float = 1.0
    """Normalised-softmax breed loss on z_id against one learned proxy per breed (scale 16; NormFace/proxy-NCA
    style). With the triplet loss alone z_id's validation kNN accuracy swung by about 3 points around that of
    the raw embeddings from seed to seed (batch-hard mining on 8-32 images per breed is noisy); the proxies give
    every step a signal from all breeds, and over seeds 0-3 z_id then beat the raw embeddings by 1-3 points."""
    triplet_margin: float = 0.2
    """Margin in cosine distance (1 - cosine) between the hardest positive and the hardest negative."""
    samples_per_breed: int = 4
    """K of the P x K batches (P = batch_size // K breeds, K images each); 0: plain shuffled batches."""
    fisher_weight: float = 0.3
    """Linear breed information in z_attr within a batch, trace(S_T^-1 S_B) / attr_dim: the mean squared canonical
    correlation between z_attr and the breed, i.e. what the best linear probe could read from the batch. A
    closed-form stand-in for a linear adversary, with no min-max game to destabilise."""
    adversarial_weight: float = 0.0
    """Breed cross-entropy of a linear adversary on z_attr through a gradient-reversal layer (0: off). Off by
    default: at lr 3e-3 it destabilised training (pets, tuning run with the cycle loss on and before the proxy
    loss: reconstruction cosine 0.54, swap accuracy 0.25), and in an earlier setup (lr 1e-3, no Fisher term) it
    left 0.74 probe accuracy in z_attr, the encoder dodging whichever adversary it currently faced."""
    adversary_lr_scale: float = 1.0
    """Learning rate of the adversary relative to ``lr``."""
    adversary_warmup: float = 0.3
    """Fraction of training over which the gradient-reversal strength ramps from 0 to 1 (smooth DANN schedule):
    early on z_attr is noise and a full-strength reversal only makes the training unstable."""
    cycle_weight: float = 0.0
    """Swap cycle: z_id(swap) close to z_id(A), z_attr(swap) close to z_attr(B) (0: off, and not computed). Off by
    default: at 0.5 it raised swap accuracy by 4 points but cost 4 points of z_id kNN accuracy (one tuning run)."""
    classifier_epochs: int = 300
    """Full-batch Adam steps of the breed classifier (a linear softmax layer on the raw embeddings)."""
    classifier_lr: float = 3e-3
    classifier_weight_decay: float = 1e-2
    knn_k: int = 10
    """k of the kNN breed accuracies in the report."""
    val_fraction: float = 0.2
    seed: int = 0
    num_threads: int = 1
    """CPU threads while training. One by default: these matmuls are small and gain little from a second thread,
    while on a busy machine an oversubscribed BLAS runs several times slower; it also keeps runs reproducible."""

    def __post_init__(self) -> None:
        positive = ("id_dim", "attr_dim", "hidden", "epochs", "batch_size", "classifier_epochs", "knn_k", "num_threads")
        if self.samples_per_breed < 0:
            raise MapperError(f"samples_per_breed must not be negative, got {self.samples_per_breed}")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise MapperError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise MapperError("batch_size must be at least 2 (swap partners and triplets need pairs)")
        if not (self.lr > 0 and self.classifier_lr > 0):
            raise MapperError("lr and classifier_lr must be positive")
        non_negative = ("weight_decay", "classifier_weight_decay", "rec_weight", "id_weight", "triplet_weight",
                        "adversarial_weight", "cycle_weight", "cross_weight", "fisher_weight", "adversary_lr_scale",
                        "proxy_weight",
                        "triplet_margin")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise MapperError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.adversary_warmup <= 1.0:
            raise MapperError(f"adversary_warmup must be in [0, 1], got {self.adversary_warmup}")
        if not 0.0 < self.val_fraction < 1.0:
            raise MapperError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MapperConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            # A config from a newer version: refuse rather than silently train or build a different model.
            raise MapperError(f"unknown mapper config keys: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- model


class Mapper(nn.Module):
    """Two MLP encoders (identity, attributes) and one MLP decoder over embedding vectors.

    The encoders are separate networks rather than two heads of one trunk, as in Nitzan et al. (E_id and E_attr):
    a shared trunk would put breed features one linear layer away from z_attr. Activations are ``nn.ReLU``
    modules (one per layer, never functional calls) so forward hooks can record per-layer sparsity.

    ``encode`` returns z_id on the unit sphere (the triplet loss works in cosine distance, and the decoder reads
    the same normalised code) and z_attr unnormalised (its size is information the decoder may use).
    """

    def __init__(self, input_dim: int, id_dim: int, attr_dim: int, hidden: int) -> None:
        super().__init__()
        self.input_dim, self.id_dim, self.attr_dim, self.hidden = input_dim, id_dim, attr_dim, hidden
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
        return cls(input_dim, config.id_dim, config.attr_dim, config.hidden)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, input_dim)`` -> ``(z_id (N, id_dim), unit norm; z_attr (N, attr_dim))``."""
        return F.normalize(self.id_encoder(x), dim=1), self.attr_encoder(x)

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


class _GradReverse(torch.autograd.Function):
    """Identity forward, gradient times ``-strength`` backward (Ganin & Lempitsky 2015): one optimizer step then
    trains the adversary to find breed in z_attr and the attribute encoder to hide it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def _grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    out = _GradReverse.apply(x, strength)
    assert isinstance(out, torch.Tensor)
    return out


# ------------------------------------------------------------------------------------------------- result


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


# ------------------------------------------------------------------------------------------------- helpers


def _as_matrix(vectors: np.ndarray | torch.Tensor, dim: int | None, what: str) -> torch.Tensor:
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


def _normalise(x: torch.Tensor, what: str = "vectors") -> torch.Tensor:
    norms = x.norm(dim=1)
    if bool((norms < 1e-12).any()):
        raise MapperError(f"{what}: {int((norms < 1e-12).sum())} zero vector(s) cannot be L2-normalised")
    return x / norms[:, None]


def stratified_split(
    ids: Sequence[str], breeds: Sequence[str | None], val_fraction: float, seed: int
) -> dict[str, str]:
    """Seeded split stratified by breed: ``round(val_fraction * n)`` of each breed to ``"val"`` (Python's round,
    halves to even), but never all of a breed (its train images are the classifier's and the kNN gallery's only
    examples), so a breed with one image stays in train. Unlabelled images go to train (they cannot be scored)."""
    rng = np.random.default_rng(seed)
    by_breed: dict[str, list[int]] = {}
    for i, b in enumerate(breeds):
        if b is not None:
            by_breed.setdefault(b, []).append(i)
    split = {i: "train" for i in ids}
    for breed in sorted(by_breed):
        # Sorted breeds, and ids sorted within a breed: the split depends on the ids, labels and seed only, not on
        # the order the rows come in (a store may list the same images in another order).
        idx = np.array(sorted(by_breed[breed], key=lambda i: ids[i]))
        rng.shuffle(idx)
        n_val = min(round(val_fraction * len(idx)), len(idx) - 1)
        for i in idx[:n_val]:
            split[ids[int(i)]] = "val"
    return split


def knn_accuracy(
    gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray, query_labels: Sequence[str], k: int = 10
) -> float:
    """Breed kNN accuracy of queries against a separate gallery: cosine similarity (rows are L2-normalised here),
    k nearest, similarity-weighted vote (negative similarities count 0), ties to the label seen first (nearest) —
    the protocol of ``analysis.neighbours.knn_predictions``, with a held-out gallery instead of leave-one-out."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    kk = min(k, g.shape[0])
    # Stable sort on -sim: equal similarities keep gallery order, so the result is deterministic.
    order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    correct = 0
    for i in range(len(q)):
        scores: dict[str, float] = {}
        first: dict[str, int] = {}
        for rank, j in enumerate(order[i]):
            lab = gallery_labels[int(j)]
            scores[lab] = scores.get(lab, 0.0) + max(float(sims[i, j]), 0.0)
            first.setdefault(lab, rank)
        pred = max(scores, key=lambda lab: (scores[lab], -first[lab]))
        correct += pred == query_labels[i]
    return correct / max(len(q), 1)


def _probe_accuracy(x_train: np.ndarray, y_train: Sequence[str], x_val: np.ndarray, y_val: Sequence[str]) -> float:
    """Validation accuracy of a standardised multinomial logistic-regression probe fitted on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=_PROBE_SEED))
    probe.fit(x_train, list(y_train))
    return float(probe.score(x_val, list(y_val)))


def _batch_hard_triplet(z: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) in cosine distance over unit vectors ``z``.

    Each anchor with at least one positive and one negative in the batch takes its farthest positive and nearest
    negative; anchors without a pair are skipped (rare breeds often have no partner in a random batch).
    """
    dist = 1.0 - z @ z.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return z.sum() * 0.0  # keeps the graph (and the step) uniform when no triplet exists
    hardest_pos = torch.where(pos, dist, torch.full_like(dist, -math.inf)).max(1).values
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, math.inf)).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def _train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, config: MapperConfig) -> nn.Linear:
    """Linear softmax breed classifier on the raw (normalised) train embeddings, then frozen.

    It is fitted on standardised features (per-dimension train mean and std: the unit-norm 1280-d features are
    tiny and very unequal in scale, which makes plain gradient descent slow and the weights huge) with
    full-batch AdamW, then the standardisation is folded into the one ``nn.Linear`` that is returned, so it reads
    unit-norm embeddings directly.
    """
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    xs = (x - mu) / sd
    clf = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=config.classifier_lr, weight_decay=config.classifier_weight_decay)
    for _ in range(config.classifier_epochs):
        opt.zero_grad()
        F.cross_entropy(clf(xs), y).backward()
        opt.step()
    folded = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        # W (x - mu) / sd + b  ==  (W / sd) x + (b - (W / sd) mu)
        w = clf.weight / sd
        folded.weight.copy_(w)
        folded.bias.copy_(clf.bias - w @ mu)
    folded.eval()
    folded.requires_grad_(False)
    return folded


def _fisher_ratio(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear breed information in ``z`` within a batch: trace(S_T^-1 S_B) / dim, the mean squared canonical
    correlation between z and the one-hot breed (0: every breed has the same mean z; 1: z is the breed).

    This is what a linear probe reads: with equal class means no linear rule separates breeds. Only breeds with
    two or more images in the batch count (a singleton's mean is its own z, pure estimation bias).
    """
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    keep = counts[y] >= 2
    if int(keep.sum()) < 4:
        return z.sum() * 0.0
    z, y = z[keep], y[keep]
    n, d = z.shape
    zc = z - z.mean(0)
    s_t = zc.T @ zc / n
    # Ridge relative to the overall scale, so shrinking z_attr is no way to lower the ratio.
    s_t = s_t + 1e-3 * torch.trace(s_t).detach() / d * torch.eye(d)
    onehot = F.one_hot(y).to(z.dtype)
    onehot = onehot[:, onehot.sum(0) > 0]
    means = (onehot.T @ zc) / onehot.sum(0)[:, None]  # (classes, d), centred class means
    s_b = (means.T * (onehot.sum(0) / n)) @ means
    return torch.trace(torch.linalg.solve(s_t, s_b)) / d


class _TrainingHeads(nn.Module):
    """What training needs beside the mapper and is not saved: the z_attr adversary and the z_id breed proxies."""

    def __init__(self, config: MapperConfig, n_classes: int) -> None:
        super().__init__()
        # A linear adversary: the report's probe is linear, and a linear adversary is the stablest to reverse.
        self.adversary = nn.Linear(config.attr_dim, n_classes)
        self.proxies = nn.Parameter(torch.randn(n_classes, config.id_dim))


class _BatchSampler:
    """Batches of row indices. With ``k`` > 0, P x K batches (Hermans et al. 2017): ``batch // k`` breeds, ``k``
    images of each, so that every anchor of the batch-hard triplet loss has positives (a random batch of 64 out
    of 45 breeds mostly has none for the rarer breeds) and the Fisher term sees no singleton classes. Breeds are
    drawn from a cycling permutation, so each comes up equally often. Unlabelled rows fill their share of each
    batch. With ``k`` = 0, plain shuffled batches."""

    def __init__(self, y: torch.Tensor, batch: int, k: int) -> None:
        self.y, self.batch, self.k = y, batch, k
        self.unlabelled = torch.nonzero(y < 0).flatten()
        labelled = torch.nonzero(y >= 0).flatten()
        self.members = [labelled[y[labelled] == c] for c in torch.unique(y[labelled]).tolist()]
        self.n_unlabelled = round(batch * len(self.unlabelled) / max(len(y), 1))
        self.p = max((batch - self.n_unlabelled) // max(k, 1), 2)
        self._breeds: list[int] = []
        self._unl: list[int] = []

    def epoch(self, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        if self.k == 0 or not self.members:
            perm = torch.randperm(len(self.y), generator=gen)
            for s in range(steps):
                yield perm[s * self.batch : (s + 1) * self.batch]
            return
        for _ in range(steps):
            parts = []
            for c in self._take(self._breeds, len(self.members), min(self.p, len(self.members)), gen):
                m = self.members[c]
                parts.append(m[torch.randperm(len(m), generator=gen)[: self.k]])
            if self.n_unlabelled:
                parts.append(self.unlabelled[self._take(self._unl, len(self.unlabelled), self.n_unlabelled, gen)])
            yield torch.cat(parts)

    @staticmethod
    def _take(queue: list[int], n: int, count: int, gen: torch.Generator) -> list[int]:
        """``count`` items from a queue refilled with fresh permutations of ``range(n)`` (distinct if count <= n)."""
        out: list[int] = []
        while len(out) < count:
            if not queue:
                queue.extend(torch.randperm(n, generator=gen).tolist())
            item = queue.pop()
            if item not in out or count > n:
                out.append(item)
        return out


class _SameBreedSampler:
    """Draws, for each labelled row of a batch, a random train row of the same breed (possibly itself)."""

    def __init__(self, y: torch.Tensor) -> None:
        labelled = torch.nonzero(y >= 0).flatten()
        order = labelled[torch.argsort(y[labelled], stable=True)]
        self.rows = order
        n_classes = int(y.max()) + 1 if len(labelled) else 0
        self.counts = torch.bincount(y[labelled], minlength=n_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def __call__(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(len(y), generator=gen)
        pick = (u * self.counts[y]).long().clamp_max(self.counts[y] - 1)
        return self.rows[self.offsets[y] + pick]


def _adversary_strength(progress: float, warmup: float) -> float:
    """Gradient-reversal strength: smooth ramp 0 -> 1 over the first ``warmup`` of training (DANN schedule)."""
    if warmup <= 0:
        return 1.0
    p = min(progress / warmup, 1.0)
    return float(2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


# ------------------------------------------------------------------------------------------------ training


def train_mapper(
    vectors: np.ndarray,
    breeds: Sequence[str | None],
    ids: Sequence[str],
    config: MapperConfig | None = None,
    *,
    progress: bool = True,
) -> MapperResult:
    """Train a breed classifier, then the mapper, on ``vectors`` ``(N, D)`` with ``breeds`` (``None`` =
    unlabelled) and unique ``ids``; return the mapper, the frozen classifier, the split and the validation report.

    Vectors are L2-normalised here (the store's already are; this only guards against other callers). The
    split is stratified by breed and seeded with ``config.seed``.
    """
    config = config or MapperConfig()
    x_all = _normalise(_as_matrix(vectors, None, "vectors"))
    n = x_all.shape[0]
    if len(breeds) != n or len(ids) != n:
        raise MapperError(f"vectors has {n} rows but {len(breeds)} breeds and {len(ids)} ids")
    ids = [str(i) for i in ids]
    if len(set(ids)) != n:
        raise MapperError("ids must be unique")
    labels: list[str | None] = [None if b is None or (isinstance(b, float) and math.isnan(b)) else str(b)
                                for b in breeds]

    split = stratified_split(ids, labels, config.val_fraction, config.seed)
    train_idx = [i for i in range(n) if split[ids[i]] == "train"]
    val_idx = [i for i in range(n) if split[ids[i]] == "val"]
    breed_names = sorted({b for i in train_idx if (b := labels[i]) is not None})
    if len(breed_names) < 2:
        raise MapperError(f"need at least two labelled breeds in train, got {breed_names}")
    if not val_idx:
        raise MapperError("the validation split is empty (too few labelled images per breed)")
    code = {b: k for k, b in enumerate(breed_names)}
    y_all = torch.tensor([code[b] if b is not None else -1 for b in labels], dtype=torch.long)

    t0 = time.perf_counter()
    # fork_rng: seeding for the weights must not reset the caller's global RNG.
    with torch.random.fork_rng(devices=[]), deterministic(), num_threads(config.num_threads):
        torch.manual_seed(config.seed)
        x_tr, y_tr = x_all[train_idx], y_all[train_idx]
        labelled = y_tr >= 0
        classifier = _train_classifier(x_tr[labelled], y_tr[labelled], len(breed_names), config)
        mapper, history = _train_mapper(x_tr, y_tr, classifier, len(breed_names), config, progress)
    train_seconds = time.perf_counter() - t0

    with num_threads(config.num_threads):
        report = _evaluate(mapper, classifier, x_all, y_all, train_idx, val_idx, breed_names, config)
    report["train_seconds"] = train_seconds
    return MapperResult(mapper, classifier, breed_names, split, report, history, config)


def _train_mapper(
    x: torch.Tensor, y: torch.Tensor, classifier: nn.Module, n_classes: int, config: MapperConfig, progress: bool
) -> tuple[Mapper, list[dict[str, float]]]:
    mapper = Mapper.from_config(x.shape[1], config)
    with torch.no_grad():
        # Start the decoder at the mean embedding (cosine ~0.5 to any photo here) instead of at 0: the shared
        # component is then free and the first steps go to what differs between photos.
        out_layer = mapper.decoder[-1]
        assert isinstance(out_layer, nn.Linear)
        out_layer.bias.copy_(x.mean(0))
    heads = _TrainingHeads(config, n_classes)
    groups: list[dict[str, Any]] = [
        {"params": [*mapper.parameters(), heads.proxies]},
        {"params": list(heads.adversary.parameters()), "lr": config.lr * config.adversary_lr_scale},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    gen = torch.Generator().manual_seed(config.seed)
    same_breed = _SameBreedSampler(y)
    n = x.shape[0]
    batch = min(config.batch_size, n)
    steps_per_epoch = max(n // batch, 1)  # as many rows per epoch as there are images (give or take a batch)
    total = steps_per_epoch * config.epochs
    sampler = _BatchSampler(y, batch, config.samples_per_breed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(config.epochs), desc="mapper", unit="epoch", disable=not progress, file=sys.stderr)
    step = 0
    for epoch in bar:
        mapper.train()
        sums: dict[str, float] = {}
        for idx in sampler.epoch(steps_per_epoch, gen):
            xb, yb = x[idx], y[idx]
            strength = _adversary_strength(step / max(total, 1), config.adversary_warmup)
            lab = yb >= 0
            x_same = x[same_breed(yb[lab], gen)]
            losses = _losses(mapper, classifier, heads, xb, yb, x_same, config, strength, gen)
            loss = sum((losses[k] * w for k, w in _weights(config).items()), torch.zeros(()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["total"] = sums.get("total", 0.0) + float(loss.detach())
        row = {k: v / steps_per_epoch for k, v in sums.items()}
        row["epoch"] = float(epoch + 1)
        history.append(row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("rec", "cross", "id", "triplet", "proxy", "fisher")})
    bar.close()
    mapper.eval()
    return mapper, history


def _weights(config: MapperConfig) -> dict[str, float]:
    return {
        "rec": config.rec_weight,
        "id": config.id_weight,
        "triplet": config.triplet_weight,
        "adv": config.adversarial_weight,
        "cycle": config.cycle_weight,
        "fisher": config.fisher_weight,
        "cross": config.cross_weight,
        "proxy": config.proxy_weight,
    }


def _losses(
    mapper: Mapper,
    classifier: nn.Module,
    heads: _TrainingHeads,
    x: torch.Tensor,
    y: torch.Tensor,
    x_same: torch.Tensor,
    config: MapperConfig,
    strength: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The losses of one batch (unweighted)."""
    zero = torch.zeros(())
    z_id, z_attr = mapper.encode(x)
    x_hat = mapper.decode(z_id, z_attr)
    rec = (1.0 - F.cosine_similarity(x_hat, x, dim=1)).mean()

    # Swap partner B of each A: a random permutation of the batch (B may be unlabelled: only A's breed counts).
    partner = torch.randperm(len(x), generator=gen)
    x_swap = mapper.decode(z_id, z_attr[partner])
    lab = y >= 0
    if bool(lab.any()):
        # The classifier was trained on unit vectors, so it reads the decoded embeddings normalised.
        ident = F.cross_entropy(classifier(F.normalize(x_swap[lab], dim=1)), y[lab])
        triplet = _batch_hard_triplet(z_id[lab], y[lab], config.triplet_margin)
        if config.adversarial_weight > 0:
            adv = F.cross_entropy(heads.adversary(_grad_reverse(z_attr[lab], strength)), y[lab])
        else:
            adv = zero
        fisher = _fisher_ratio(z_attr[lab], y[lab]) if config.fisher_weight > 0 else zero
        if config.proxy_weight > 0:
            cos = z_id[lab] @ F.normalize(heads.proxies, dim=1).T
            proxy = F.cross_entropy(_PROXY_SCALE * cos, y[lab])
        else:
            proxy = zero
        if config.cross_weight > 0:
            z_id_same = F.normalize(mapper.id_encoder(x_same), dim=1)
            x_cross = mapper.decode(z_id_same, z_attr[lab])
            cross = (1.0 - F.cosine_similarity(x_cross, x[lab], dim=1)).mean()
        else:
            cross = zero
    else:
        ident = triplet = adv = fisher = cross = proxy = zero

    # Cycle: the swapped embedding, encoded again, carries A's identity and B's attributes.
    if config.cycle_weight > 0:
        c_id, c_attr = mapper.encode(F.normalize(x_swap, dim=1))
        cycle = (1.0 - (c_id * z_id).sum(1)).mean() + F.mse_loss(c_attr, z_attr[partner])
    else:
        cycle = zero
    return {"rec": rec, "id": ident, "triplet": triplet, "adv": adv, "cycle": cycle, "fisher": fisher,
            "cross": cross, "proxy": proxy}


# ------------------------------------------------------------------------------------------------ evaluation


def _evaluate(
    mapper: Mapper,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train_idx: list[int],
    val_idx: list[int],
    breeds: list[str],
    config: MapperConfig,
) -> dict[str, float]:
    """The validation report: breed kNN (val queries against the labelled train gallery) on raw x, z_id, z_attr;
    linear probes on z_id and z_attr; swap and reconstruction measures. Everything is scored on val only.

    The probes (standardised logistic regression) read the codes the decoder reads: z_id on the unit sphere and
    z_attr unnormalised, so its length is available to them too."""
    tr = [i for i in train_idx if int(y[i]) >= 0]  # the gallery and probe training set: labelled train images
    va = list(val_idx)
    y_np = y.numpy()
    ytr = [breeds[int(c)] for c in y_np[tr]]
    yva = [breeds[int(c)] for c in y_np[va]]
    with eval_mode(mapper):
        z_id, z_attr, x_hat = mapper(x)
        x_hat = F.normalize(x_hat, dim=1)
        clf_val = classifier(x[va]).argmax(1)
        clf_rec = classifier(x_hat[va]).argmax(1)
    x_np, zi, za = x.numpy(), z_id.numpy(), z_attr.numpy()
    k = config.knn_k

    # Swap pairs: each val image is A once; B is a seeded random val image of another breed.
    rng = np.random.default_rng(config.seed + 1)
    y_va = y_np[va]
    partners = []
    for a in range(len(va)):
        others = np.flatnonzero(y_va != y_va[a])
        partners.append(va[int(others[rng.integers(len(others))])] if len(others) else va[a])
    with eval_mode(mapper):
        swapped = mapper.decode(z_id[va], z_attr[partners])
        swap_pred = classifier(F.normalize(swapped, dim=1)).argmax(1)
        sw_id, sw_attr = mapper.encode(F.normalize(swapped, dim=1))
    # The swap read as a reconstruction of A (B's attributes instead of A's): next to reconstruction_cosine it
    # says how much z_attr carries. A z_attr that carried nothing would pass the probe check trivially.
    foreign = F.normalize(swapped, dim=1)
    # Attributes kept in the swap: the swapped embedding re-encodes to a z_attr whose nearest val z_attr is B's.
    # Cosine after centring on the train mean, since a shared offset would make every z_attr look alike.
    centre = z_attr[tr].mean(0)
    sa = F.normalize(sw_attr - centre, dim=1)
    vb = F.normalize(z_attr[va] - centre, dim=1)
    nearest = (sa @ vb.T).argmax(1)
    partner_pos = torch.as_tensor([va.index(p) for p in partners])
    y_va_t = torch.as_tensor(y_va)
    report = {
        "n_train": float(len(train_idx)),
        "n_train_labelled": float(len(tr)),
        "n_val": float(len(va)),
        "n_breeds": float(len(breeds)),
        "chance_acc": float(np.bincount(y_va).max() / len(y_va)),
        "val_classifier_acc": float((clf_val == y_va_t).float().mean()),
        "val_knn_breed_acc_raw": knn_accuracy(x_np[tr], ytr, x_np[va], yva, k),
        "val_knn_breed_acc_z_id": knn_accuracy(zi[tr], ytr, zi[va], yva, k),
        "val_knn_breed_acc_z_attr": knn_accuracy(za[tr], ytr, za[va], yva, k),
        "probe_z_id_acc": _probe_accuracy(zi[tr], ytr, zi[va], yva),
        "probe_z_attr_acc": _probe_accuracy(za[tr], ytr, za[va], yva),
        "swap_acc": float((swap_pred == y_va_t).float().mean()),
        "swap_id_cosine": float((sw_id * z_id[va]).sum(1).mean()),
        "swap_attr_top1": float((nearest == partner_pos).float().mean()),
        "reconstruction_cosine": float((x_hat[va] * x[va]).sum(1).mean()),
        "reconstruction_cosine_foreign_attr": float((foreign * x[va]).sum(1).mean()),
        "reconstruction_classifier_acc": float((clf_rec == y_va_t).float().mean()),
    }
    return report


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
    x = _normalise(_as_matrix(vectors, mapper.input_dim, what), what)
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
    x = _normalise(_as_matrix(vectors, None, "vectors"))
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
    included: z_id moves along the great circle (it lives on the unit sphere), z_attr along the straight line."""
    if steps < 2:
        raise MapperError(f"steps must be at least 2 (the path includes both ends), got {steps}")
    zi_a, za_a = _codes(mapper, a, "a")
    zi_b, za_b = _codes(mapper, b, "b")
    if len(zi_a) != 1 or len(zi_b) != 1:
        raise MapperError("interpolate takes one embedding for a and one for b")
    t = torch.linspace(0.0, 1.0, steps)[:, None]
    cos = float(torch.clamp((zi_a * zi_b).sum(), -1.0, 1.0))
    omega = math.acos(cos)
    if math.sin(omega) < 1e-6:  # (anti)parallel: no unique great circle, fall back to the chord
        z_id = F.normalize((1 - t) * zi_a + t * zi_b, dim=1)
    else:
        z_id = (torch.sin((1 - t) * omega) * zi_a + torch.sin(t * omega) * zi_b) / math.sin(omega)
    z_attr = (1 - t) * za_a + t * za_b
    return _decode(mapper, z_id, z_attr)
