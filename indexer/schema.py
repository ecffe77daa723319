"""The store's on-disk contract, in one place: file names, table schemas, the schema version.

A store is a directory a user can open without our code::

    STORE/
      manifest.json            what is here: encoder, spaces, counts, parameters, versions (swapped in last)
      images.parquet           one row per image (IMAGE_COLUMNS + any joined label columns)
      errors.parquet           every file that could not be used, with the reason
      spaces/<name>.parquet    id, faiss_id, vector: fixed_size_list<float32>[dim]
      spaces/<name>.faiss      the same rows, in the same order, as a FAISS IndexIDMap2 keyed by faiss_id
      sparsity.parquet         per image, model, layer and metric: the activation sparsity (SPARSITY_SCHEMA)
      models/<model>/          trained models (safetensors + JSON config) that produce the derived spaces
"""

from __future__ import annotations

import pyarrow as pa

# Bump when a reader of the previous version would misread a store written by this one.
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
IMAGES = "images.parquet"
ERRORS = "errors.parquet"
SPACES_DIR = "spaces"
SPARSITY = "sparsity.parquet"

# The frozen pretrained encoder's space: every store has it.
ENCODER_SPACE = "encoder"

# Columns every image row has, in order; label columns joined from a CSV follow them.
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha256 of the file's bytes: stable across moves and renames
        pa.field("faiss_id", pa.int64(), nullable=False),  # the id FAISS returns for this image
        pa.field("path", pa.string(), nullable=False),  # absolute path when indexed
        pa.field("relpath", pa.string(), nullable=False),  # path relative to the dataset root
        pa.field("species", pa.string()),  # "cat" | "dog" | null when unknown
        pa.field("breed", pa.string()),  # normalised breed name | null when unknown
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("layout", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("indexed_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)
IMAGE_COLUMNS = tuple(IMAGE_SCHEMA.names)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("seen_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)


# Per-layer activation sparsity, one row per (image, model, layer, metric): a layer's curve is one filter away.
SPARSITY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # "encoder" | "mapper" | "vae"
        pa.field("layer_index", pa.int32(), nullable=False),  # execution order, 0-based
        pa.field("layer_name", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # see indexer.sparsity.METRICS
        pa.field("value", pa.float64(), nullable=False),  # NaN only where the activations were not finite
    ]
)


def space_schema(dim: int) -> pa.Schema:
    """The Arrow schema of one feature space's table (a fixed-size list reads as an array column everywhere)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("faiss_id", pa.int64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def faiss_id_of(image_id: str) -> int:
    """The int64 FAISS id of an image: the first 60 bits of its sha256 (positive, collision odds ~n²/2^61)."""
    return int(image_id[:15], 16)
