"""Training the mapper: the seeded stratified split, the frozen breed classifier, the P x K and same-breed
samplers, and the optimisation loop (losses in :mod:`indexer.models.mapper.losses`)."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from indexer.models.mapper.config import MapperConfig, MapperError
from indexer.models.mapper.evaluate import evaluate_mapper
from indexer.models.mapper.losses import TrainingHeads, batch_losses, loss_weights
from indexer.models.mapper.model import Mapper, MapperResult, as_matrix, normalise
from indexer.models.scoped import deterministic, num_threads


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


def train_mapper(
    vectors: np.ndarray,
    breeds: Sequence[str | None],
    ids: Sequence[str],
    config: MapperConfig | None = None,
    *,
    progress: bool = True,
) -> MapperResult:
    """Train a breed classifier, then the mapper, on ``vectors`` ``(N, D)`` with ``breeds`` (``None`` =
    unlabelled) and unique ``ids``; return the mapper, the frozen classifier, the split and the validation report
    (:func:`~indexer.models.mapper.evaluate.evaluate_mapper`, plus ``train_seconds``).

    Vectors are L2-normalised here (the store's already are; this only guards against other callers). The
    split is stratified by breed and seeded with ``config.seed``.
    """
    config = config or MapperConfig()
    x_all = normalise(as_matrix(vectors, None, "vectors"))
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
        report = evaluate_mapper(mapper, classifier, x_all, y_all, train_idx, val_idx, breed_names, config)
    report["train_seconds"] = train_seconds
    return MapperResult(mapper, classifier, breed_names, split, report, history, config)


def _train_mapper(
    x: torch.Tensor, y: torch.Tensor, classifier: nn.Module, n_classes: int, config: MapperConfig, progress: bool
) -> tuple[Mapper, list[dict[str, float]]]:
    mapper = Mapper.from_config(x.shape[1], config)
    if config.standardise_inputs:
        # A floor under the std: a dimension (nearly) constant over train must not blow up where it is not.
        sd = x.std(0)
        mapper.set_input_scaling(x.mean(0), sd.clamp_min(1e-2 * float(sd.mean())) + 1e-6)
    with torch.no_grad():
        # Start the decoder at the mean embedding (cosine ~0.5 to any photo here) instead of at 0: the shared
        # component is then free and the first steps go to what differs between photos.
        out_layer = mapper.decoder[-1]
        assert isinstance(out_layer, nn.Linear)
        out_layer.bias.copy_(x.mean(0))
    heads = TrainingHeads(config, n_classes)
    groups: list[dict[str, Any]] = [
        {"params": [*mapper.parameters(), heads.proxies]},
        {"params": list(heads.adversary.parameters()), "lr": config.lr * config.adversary_lr_scale},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    # The weight average starts at the initial weights; their share after t steps is ema_decay ** t.
    average = copy.deepcopy(mapper) if config.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(config.seed)
    same_breed = _SameBreedSampler(y)
    n = x.shape[0]
    batch = min(config.batch_size, n)
    steps_per_epoch = max(n // batch, 1)  # as many rows per epoch as there are images (give or take a batch)
    total = steps_per_epoch * config.epochs
    sampler = _BatchSampler(y, batch, config.samples_per_breed)
    weights = loss_weights(config)
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
            losses = batch_losses(mapper, classifier, heads, xb, yb, x_same, config, strength, gen)
            loss = sum((losses[k] * w for k, w in weights.items()), torch.zeros(()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if average is not None:
                with torch.no_grad():
                    for avg, p in zip(average.parameters(), mapper.parameters(), strict=True):
                        avg.lerp_(p, 1.0 - config.ema_decay)
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["total"] = sums.get("total", 0.0) + float(loss.detach())
        row = {k: v / steps_per_epoch for k, v in sums.items()}
        row["epoch"] = float(epoch + 1)
        history.append(row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("rec", "cross", "id", "triplet", "proxy", "fisher")})
    bar.close()
    if average is not None:
        mapper = average
    mapper.fold_input_scaling()
    mapper.eval()
    return mapper, history
