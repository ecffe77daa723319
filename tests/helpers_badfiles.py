"""A corpus of unusable files, one of each way a photo folder goes wrong, for the image-reading and indexing tests.

Every file carries an image extension so the scanner takes it as a candidate and the indexer
has to report it (a file with another extension is never read).
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

from indexer.defaults import MAX_FILE_BYTES

_PETS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pets"


def real_photo_bytes() -> bytes:
    """A real JPEG from the shared pets photos (a synthetic noisy JPEG when they are not there)."""
    photos = sorted(_PETS.glob("cat/*/*.jpg"))
    if photos:
        return photos[0].read_bytes()
    rng = random.Random(0)
    img = Image.frombytes("RGB", (160, 120), rng.randbytes(160 * 120 * 3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height`` RGB pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def make_bad_corpus(dir: Path) -> dict[str, str]:
    """Write the bad files into ``dir``; returns file name -> a keyword its ImageError reason must contain."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    photo = real_photo_bytes()
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, keyword: str) -> None:
        (dir / name).write_bytes(data)
        expected[name] = keyword

    put("empty.jpg", b"", "empty file")
    put("truncated.jpg", photo[: len(photo) // 2], "truncated or corrupt")
    put("random_bytes.jpg", random.Random(42).randbytes(4096), "unrecognised format")
    put("notes.jpg", b"Shopping list\n- cat food\n- dog treats\n" * 20, "text file")
    put("page.png", b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>gone</body></html>\n", "HTML")
    put("bomb.png", png_header_only(100_000, 100_000), "image too large")
    put("logo.png", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<circle cx="32" cy="32" r="30" fill="orange"/></svg>\n', "SVG")  # fmt: skip
    put("scan.jpg", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n", "PDF")

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cat.jpg", photo)
    put("archive.png", buf.getvalue(), "ZIP")

    # A real photo as PNG, cut inside its pixel data.
    buf = io.BytesIO()
    with Image.open(io.BytesIO(photo)) as im:
        im.convert("RGB").save(buf, "PNG")
    png = buf.getvalue()
    put("truncated.png", png[: len(png) * 6 // 10], "truncated or corrupt")

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buf, "PNG")
    put("tiny.png", buf.getvalue(), "image too small")

    (dir / "broken_link.jpg").symlink_to(dir / "no-such-target.jpg")
    expected["broken_link.jpg"] = "broken symlink"

    (dir / "folder.jpg").mkdir()
    expected["folder.jpg"] = "is a directory"

    # Sparse: one byte over the limit costs no disk.
    with open(dir / "huge.jpg", "wb") as f:
        f.write(photo[:64])
        f.truncate(MAX_FILE_BYTES + 1)
    expected["huge.jpg"] = "file too large"
    return expected
