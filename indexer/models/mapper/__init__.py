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

The identity encoder is regularised so that z_id generalises to photos it never saw (912 labelled train images
against 330k weights in its first layer): both encoders read standardised inputs (folded into their first layers
after training), the identity encoder's input takes dropout 0.8 while training, and the trained mapper is an
exponential moving average of the weights over the steps.

Unlabelled images (breed ``None``) take part in reconstruction only (and serve as swap attribute partners).

Everything is deterministic for a given seed on the CPU: one seeded global RNG fork for the weights, one seeded
``torch.Generator`` for batches and partners, a seeded ``numpy.random.Generator`` for the split, and
``torch.use_deterministic_algorithms`` while training.

Modules: :mod:`~indexer.models.mapper.config` (``MapperConfig``), :mod:`~indexer.models.mapper.model` (the network,
its files and inference helpers), :mod:`~indexer.models.mapper.losses`, :mod:`~indexer.models.mapper.train` and
:mod:`~indexer.models.mapper.evaluate` (the validation report). The names callers use are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexer.lazy import lazy_attributes

if TYPE_CHECKING:
    from indexer.models.mapper.config import MapperConfig, MapperError
    from indexer.models.mapper.evaluate import evaluate_mapper
    from indexer.models.mapper.model import (
        FORMAT,
        FORMAT_VERSION,
        META_FILE,
        WEIGHTS_FILE,
        Mapper,
        MapperResult,
        encode,
        interpolate,
        load_mapper,
        predict_breeds,
        save_mapper,
        swap,
    )
    from indexer.models.mapper.train import stratified_split, train_mapper

# name -> submodule; loaded on first use (indexer/lazy.py), so that reading a config does not import torch.
_WHERE = {
    "FORMAT": "model",
    "FORMAT_VERSION": "model",
    "META_FILE": "model",
    "Mapper": "model",
    "MapperConfig": "config",
    "MapperError": "config",
    "MapperResult": "model",
    "WEIGHTS_FILE": "model",
    "encode": "model",
    "evaluate_mapper": "evaluate",
    "interpolate": "model",
    "load_mapper": "model",
    "predict_breeds": "model",
    "save_mapper": "model",
    "stratified_split": "train",
    "swap": "model",
    "train_mapper": "train",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
