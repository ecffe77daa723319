"""Safe image reading: a path's bytes -> a validated, fully decoded RGB PIL image.

Every way a file can be unusable (missing, empty, huge, not an image, truncated, a
decompression bomb, too small) ends as one ``ImageError`` with a short human reason, so an
indexing run can record the file as an error and carry on. Everything here is picklable,
because it runs inside torch DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.defaults import IMAGE_EXTENSIONS, MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE

__all__ = ["ImageError", "content_id", "decode_image", "load_image", "read_bytes"]

# Pillow formats we decode: those of the indexed extensions, found by content (a PNG named
# .jpg is fine; camera JPEGs that Pillow calls MPO come through the JPEG opener).
# Restricting Image.open to these also stops Pillow "recognising" random bytes as a
# header-less format such as TGA.
_ALLOWED_FORMATS: tuple[str, ...] = tuple(sorted({Image.registered_extensions()[ext] for ext in IMAGE_EXTENSIONS}))

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_MAX_DETAIL = 120  # keep decoder messages short enough for a one-line error column


class ImageError(Exception):
    """A file that cannot be used as an image; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit so the error survives the trip back from a DataLoader worker process.
        return (type(self), (self.path, self.reason))


def _size_text(n: float) -> str:
    """``52428800`` -> ``"50 MB"``, ``62914560`` -> ``"60 MB"``, ``1500`` -> ``"1.5 KB"``."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} bytes"


def read_bytes(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a whole file, refusing anything that is not a readable, non-empty regular file of at most ``max_bytes``."""
    name = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        # os.stat follows links; a link that exists itself but whose target does not is "broken".
        raise ImageError(name, "broken symlink" if os.path.islink(path) else "file not found") from None
    except OSError as e:
        raise ImageError(name, f"unreadable ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO or device could block forever or never end.
        raise ImageError(name, "not a regular file")
    # Size checks come before reading so a huge file costs nothing.
    if st.st_size == 0:
        raise ImageError(name, "empty file")
    if st.st_size > max_bytes:
        size, limit = _size_text(st.st_size), _size_text(max_bytes)
        if size == limit:  # just over the limit: rounding would print "50 MB exceeds the 50 MB limit"
            size = f"{st.st_size} bytes"
        raise ImageError(name, f"file too large: {size} exceeds the {limit} limit")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # bounded: the file may have grown since stat
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as e:
        raise ImageError(name, f"unreadable ({e.strerror or e})") from None
    if not data:
        raise ImageError(name, "empty file")
    if len(data) > max_bytes:
        raise ImageError(name, f"file too large: exceeds the {_size_text(max_bytes)} limit")
    return data


def content_id(data: bytes) -> str:
    """The stable image id: the sha256 hex digest of the file's bytes (same photo, same id, whatever its name)."""
    return hashlib.sha256(data).hexdigest()


def _not_an_image_reason(data: bytes) -> str:
    """Name what a file Pillow could not open actually is, so the error says more than "unrecognised"."""
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "unsupported format SVG"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        return "not an image (HTML page)"
    if data.startswith(b"%PDF"):
        return "unsupported format PDF"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "not an image (ZIP archive)"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        if brand in {"heic", "heix", "hevc", "hevx", "mif1", "msf1"}:
            return "unsupported format HEIC"
        if brand in {"avif", "avis"}:
            return "unsupported format AVIF"
    # Any format Pillow knows but we do not index (EPS, PSD, ICO, ...): name it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as other:
                if other.format:
                    return f"unsupported format {other.format}"
    except Exception:  # only used to word the message
        pass
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text):
        return "not an image (text file)"
    return "not an image (unrecognised format)"


def _bomb_reason(data: bytes, message: str, max_pixels: int) -> str:
    """The "image too large" reason for a file Pillow refused in open(), with the size its header claims."""
    size: tuple[int, int] | None = None
    # Pillow's open() drops the parsed header when it raises; parse it again with the format's
    # own class, which does no bomb check. Only the wording of the error depends on this.
    for fmt in _ALLOWED_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        try:
            if factory is not None and (accept is None or accept(data[:16])):
                with factory(io.BytesIO(data), "") as im:
                    size = im.size
                    break
        except Exception:  # not this format: try the next
            continue
    m = _BOMB_PIXELS.search(message)
    if size:
        pixels: int | None = size[0] * size[1]
        shown = f"{size[0]}x{size[1]} px"
    elif m:
        pixels = int(m.group(1))
        shown = f"{pixels} px"
    else:
        pixels, shown = None, "its size"
    if pixels is not None and pixels <= max_pixels:
        # The caller allowed more than Pillow's hard limit; say whose limit it was.
        return f"image too large: {shown} exceeds Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} px"
    return f"image too large: {shown} exceeds the {max_pixels} px limit"


def _detail(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 8 bits; Pillow's own convert would clip it to near-white."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        # Floats in [0, 1] are normalised intensities; anything else is taken as 0..255.
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        arr = arr.astype(np.int64)
        # 16-bit sources (PNG, TIFF) span 0..65535; an "I" image holding 8-bit values stays as is.
        if arr.size and arr.max() > 255:
            arr = arr >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Any mode -> a new RGB image.

    Transparency is composed onto white: transparent padding turned black would look like content.
    """
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _high_bit_depth_to_8bit(img)
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")  # always a copy, detached from the source file
    except (ValueError, OSError) as e:
        raise ImageError(path, f"unsupported colour mode {img.mode} ({_detail(e)})") from None


def decode_image(
    data: bytes,
    path: str,
    *,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Decode image bytes into a fully loaded, upright RGB image, or raise ``ImageError``.

    The pixel count from the header is checked before any pixel is decoded (decompression
    bombs), the whole image is decoded so truncated files fail here rather than later, only
    the first frame of an animation is kept, and the EXIF orientation is applied.
    """
    if not data:
        raise ImageError(path, "empty file")
    try:
        # Pillow warns from ~89 Mpx; our own limit below is the one that decides, so the
        # warning is only noise. catch_warnings restores the filters on exit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(path, _not_an_image_reason(data)) from None
    except Image.DecompressionBombError as e:
        # Pillow refuses > 2x its own limit inside open(), before we see the size.
        raise ImageError(path, _bomb_reason(data, str(e), max_pixels)) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on malformed headers
        raise ImageError(path, f"truncated or corrupt image data ({_detail(e)})") from None

    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(path, f"image too large: {width}x{height} px exceeds the {max_pixels} px limit")
        if min(width, height) < min_side:
            raise ImageError(path, f"image too small: {width}x{height} px")
        try:
            img.seek(0)  # animations and multi-page files: the first frame only
            img.load()  # decode everything now, so truncation is reported for this file
        except MemoryError:
            raise
        except Exception as e:  # OSError, SyntaxError, ValueError, zlib/struct errors...
            raise ImageError(path, f"truncated or corrupt image data ({_detail(e)})") from None
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:
            # Unparseable EXIF does not make the pixels unusable: keep the stored orientation.
            upright = img
        return _to_rgb(upright, path)


def load_image(
    path: Path,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> tuple[str, Image.Image]:
    """Read and decode one file: ``(content_id, RGB image)``, or ``ImageError``."""
    data = read_bytes(path, max_bytes=max_bytes)
    return content_id(data), decode_image(data, str(path), max_pixels=max_pixels, min_side=min_side)
