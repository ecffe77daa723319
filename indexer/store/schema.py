"""The store's on-disk contract, in one place: file names, table schemas, the schema version.

A store is a directory a user can open without our code: every table is a Delta Lake table (Parquet parts plus a
transaction log; ``deltalake``, polars, duckdb and Spark read it), and ``manifest.json`` publishes one store
version by naming the Delta version of every table and the FAISS files of every space::

    STORE/
      manifest.json            the published version: encoder, tables (Delta versions), spaces, indexes, counts, runs
      images/                  Delta table, one row per image (IMAGE_COLUMNS + any joined label columns)
      errors/                  Delta table, an append-only log of files that could not be used (latest per path wins;
                               a path indexed since is no longer an error)
      sparsity/                Delta table partitioned by model: per image, layer and metric the activation sparsity
      spaces/<name>/           Delta table: id, faiss_id, vector list<float32>[dim]
      indexes/<name>/          immutable FAISS segment files of that space, keyed by faiss_id (see store/vectors.py)
      models/<model>/          trained models (safetensors + JSON config) that produce the derived spaces
      .lock, .lock.json        the writer lock and who holds it

A reader pins the versions the manifest names, so a commit in progress (or one a killed run left half done) is
never seen; files no version still names are removed only after KEEP_OLD_FILES_SECONDS.
"""

from __future__ import annotations

import pyarrow as pa

# Bump when a reader of the previous version would misread a store written by this one.
# 1: one Parquet file per table, rewritten whole by every commit.  2: Delta tables + FAISS segments, versioned.
SCHEMA_VERSION = 2

MANIFEST = "manifest.json"
IMAGES = "images"
ERRORS = "errors"
SPACES_DIR = "spaces"
INDEXES_DIR = "indexes"
SPARSITY = "sparsity"
LOCK = ".lock"
LOCK_INFO = ".lock.json"

# The frozen pretrained encoder's space: every store has it.
ENCODER_SPACE = "encoder"

# Columns every image row has, in order; label columns joined from a CSV follow them.
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha256 of the file's bytes: stable across moves and renames
        pa.field("faiss_id", pa.int64(), nullable=False),  # the id FAISS returns for this image
        # 0, 1, 2, ... in the order images were added (set by the store): Delta keeps no row order across parts.
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # absolute path when indexed
        pa.field("relpath", pa.string(), nullable=False),  # path relative to the dataset root
        pa.field("species", pa.string()),  # "cat" | "dog" | null when unknown
        pa.field("breed", pa.string()),  # normalised breed name | null when unknown
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("layout", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),  # Delta keeps microseconds
    ]
)
IMAGE_COLUMNS = tuple(IMAGE_SCHEMA.names)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("seen_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # True on the record written when a path that failed before is indexed: the log is append-only, so a
        # fixed file is not deleted from it but marked as no longer an error.
        pa.field("resolved", pa.bool_(), nullable=False),
    ]
)


# Per-layer activation sparsity, one row per (image, model, layer, metric): a layer's curve is one filter away.
SPARSITY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # "encoder" | "mapper" | "vae"
        pa.field("layer_index", pa.int32(), nullable=False),  # execution order, 0-based
        pa.field("layer_name", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # see indexer.sparsity.metrics.METRICS
        pa.field("value", pa.float64(), nullable=False),  # NaN only where the activations were not finite
    ]
)


SPACE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("faiss_id", pa.int64(), nullable=False),
        # Delta has no fixed-size list: every row holds exactly the space's ``dim`` floats (the manifest says dim).
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
    ]
)


def faiss_id_of(image_id: str) -> int:
    """The int64 FAISS id of an image: the first 60 bits of its sha256 (positive, collision odds ~n²/2^61)."""
    return int(image_id[:15], 16)
