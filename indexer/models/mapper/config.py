"""The mapper's settings (``MapperConfig``, saved beside the weights) and its error type."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from indexer.errors import UsageError
from indexer.models.config_docs import check_config_keys


class MapperError(UsageError):
    """A mapper file, input or setting that cannot be used (bad shapes, unknown format, bad labels)."""


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
    """Passes over the training images (each epoch draws as many rows as there are, give or take a batch)."""
    batch_size: int = 64
    """Rows per optimizer step (at least 2: swap partners and triplets need pairs)."""
    lr: float = 3e-3
    """AdamW learning rate of the mapper and the breed proxies."""
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
    """Full-batch AdamW steps of the breed classifier (a linear softmax layer on the raw embeddings)."""
    classifier_lr: float = 3e-3
    """AdamW learning rate of the breed classifier (on standardised embeddings)."""
    classifier_weight_decay: float = 1e-2
    """AdamW weight decay of the breed classifier."""
    knn_k: int = 10
    """k of the validation kNN breed accuracies (raw embeddings, z_id, z_attr) reported for a trained mapper; the
    mapper's own training and report do not use it."""
    val_fraction: float = 0.2
    """Share of each breed's labelled images held out for validation (never all of a breed)."""
    seed: int = 0
    """Seeds the split, the initial weights, the batches, the swap partners and the validation swap pairs."""
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
        check_config_keys(cls, d, MapperError, "mapper")
        return cls(**d)
