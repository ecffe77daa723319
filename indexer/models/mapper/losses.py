"""The mapper's training losses, per batch: reconstruction, same-breed cross reconstruction, swap identity
(frozen classifier), batch-hard triplet and breed proxies on z_id, Fisher ratio and gradient-reversal adversary
on z_attr, swap cycle. Weights and the reasons for their defaults: ``MapperConfig``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from indexer.models.mapper.config import MapperConfig
from indexer.models.mapper.model import Mapper

_PROXY_SCALE = 16.0  # cosine-softmax temperature: 16 lets 45 classes reach confident probabilities (NormFace)


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


def grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    out = _GradReverse.apply(x, strength)
    assert isinstance(out, torch.Tensor)
    return out


def batch_hard_triplet(z: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
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


def fisher_ratio(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


class TrainingHeads(nn.Module):
    """What training needs beside the mapper and is not saved: the z_attr adversary and the z_id breed proxies."""

    def __init__(self, config: MapperConfig, n_classes: int) -> None:
        super().__init__()
        # A linear adversary: the report's probe is linear, and a linear adversary is the stablest to reverse.
        self.adversary = nn.Linear(config.attr_dim, n_classes)
        self.proxies = nn.Parameter(torch.randn(n_classes, config.id_dim))


def loss_weights(config: MapperConfig) -> dict[str, float]:
    """The weight of each of ``batch_losses``' terms."""
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


def batch_losses(
    mapper: Mapper,
    classifier: nn.Module,
    heads: TrainingHeads,
    x: torch.Tensor,
    y: torch.Tensor,
    x_same: torch.Tensor,
    config: MapperConfig,
    strength: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The losses of one batch (unweighted): rows ``x`` with breed codes ``y`` (-1: unlabelled), ``x_same`` a
    same-breed partner of each labelled row, ``strength`` the gradient reversal's."""
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
        triplet = batch_hard_triplet(z_id[lab], y[lab], config.triplet_margin)
        if config.adversarial_weight > 0:
            adv = F.cross_entropy(heads.adversary(grad_reverse(z_attr[lab], strength)), y[lab])
        else:
            adv = zero
        fisher = fisher_ratio(z_attr[lab], y[lab]) if config.fisher_weight > 0 else zero
        if config.proxy_weight > 0:
            cos = z_id[lab] @ F.normalize(heads.proxies, dim=1).T
            proxy = F.cross_entropy(_PROXY_SCALE * cos, y[lab])
        else:
            proxy = zero
        if config.cross_weight > 0:
            z_id_same = mapper.encode_id(x_same)
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
