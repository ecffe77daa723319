"""Per-layer activation sparsity: the metrics of one layer's activations and the recorder that hooks a model."""

from indexer.sparsity.metrics import DEFAULT_THRESHOLD, METRICS, sparsity_metrics
from indexer.sparsity.recorder import SPARSITY_SCHEMA, SparsityRecorder, activation_layers, sparsity_frame

__all__ = [
    "DEFAULT_THRESHOLD",
    "METRICS",
    "SPARSITY_SCHEMA",
    "SparsityRecorder",
    "activation_layers",
    "sparsity_frame",
    "sparsity_metrics",
]
