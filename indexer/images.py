"""Safe image reading: a path's bytes -> a validated, fully decoded RGB PIL image.

Every way a file can be unusable (missing, empty, huge, not an image, truncated, a
decompression bomb, too small) ends as one ``ImageError`` with a short human reason, so an
indexing run can record the file as an error and carry on. Everything here is picklable,
because it also runs in other processes (a Ray Data worker).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.defaults import IMAGE_EXTENSIONS, MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE

__all__ = ["ImageError", "content_id", "decode_image", "is_utf8_path", "load_image", "printable_path", "read_bytes"]

# Pillow formats we decode: those of the indexed extensions, found by content (a PNG named
# .jpg is fine; camera JPEGs that Pillow calls MPO come through the JPEG opener).
# Restricting Image.open to these also stops Pillow "recognising" random bytes as a
# header-less format such as TGA.
_ALLOWED_FORMATS: tuple[str, ...] = tuple(sorted({Image.registered_extensions()[ext] for ext in IMAGE_EXTENSIONS}))

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_MAX_DETAIL = 120  # keep decoder messages short enough for a one-line error column

_AnyPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def is_utf8_path(path: _AnyPath) -> bool:
    """Whether ``path`` is valid UTF-8 on disk (and so storable as an Arrow/Parquet string).

    Python lists a name with undecodable bytes (``b"bad\\xff.jpg"``) as a ``str`` holding a
    surrogate escape (``"bad\\udcff.jpg"``), which cannot be encoded as UTF-8.
    """
    try:
        os.fsencode(path).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):  # a lone surrogate not from a file name fails to encode
        return False
    return True


def printable_path(path: _AnyPath) -> str:
    """``path`` as a valid-UTF-8 ``str`` for messages and stores: each undecodable byte becomes ``\\xNN``.

    ``b"/d/bad\\xff.jpg"`` (listed by Python as ``"/d/bad\\udcff.jpg"``) -> ``"/d/bad\\\\xff.jpg"``; a valid
    path comes back unchanged (as ``str``). Not reversible: for showing and recording a path, never for opening it.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that no file name produced ("\\ud800")
        return str(os.fspath(path)).encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class ImageError(Exception):
    """A file that cannot be used as an image; ``str(e) == f"{path}: {reason}"``.

    ``path`` is kept as given (it may hold surrogate escapes); ``str(e)`` shows it printably.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{printable_path(self.path)}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit so the error survives the trip back from another process (a Ray worker).
        return (type(self), (self.path, self.reason))


def _size_text(n: float) -> str:
    """``52428800`` -> ``"50 MB"``, ``62914560`` -> ``"60 MB"``, ``1500`` -> ``"1.5 KB"``."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} bytes"


def _not_regular_reason(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return f"not a regular file ({what})"
    return "not a regular file"


def _stat_reason(path: Path, e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        # os.stat follows links; a link that exists itself but whose target does not is "broken".
        return "broken symlink" if os.path.islink(path) else "file not found"
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"unreadable ({e.strerror or e})"


def read_bytes(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a whole file, refusing anything that is not a readable, non-empty regular file of at most ``max_bytes``.

    Never blocks on a FIFO or device, even one swapped in after the first check: the file is
    opened non-blocking and checked again through its descriptor before anything is read.
    A path that is not valid UTF-8 is refused too ("file name is not valid UTF-8"): no store
    can record it.
    """
    name = str(path)
    if not is_utf8_path(path):
        where = "file name" if not is_utf8_path(os.path.basename(path)) else "folder name"
        raise ImageError(name, f"{where} is not valid UTF-8")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(name, _stat_reason(Path(path), e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO or device could block forever or never end.
        raise ImageError(name, _not_regular_reason(st.st_mode))
    # Size checks come before reading so a huge file costs nothing.
    if st.st_size == 0:
        raise ImageError(name, "empty file")
    if st.st_size > max_bytes:
        size, limit = _size_text(st.st_size), _size_text(max_bytes)
        if size == limit:  # just over the limit: rounding would print "50 MB exceeds the 50 MB limit"
            size = f"{st.st_size} bytes"
        raise ImageError(name, f"file too large: {size} exceeds the {limit} limit")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(name, "file not found (removed while being read)") from None
    except OSError as e:
        raise ImageError(name, _stat_reason(Path(path), e)) from None
    try:
        # The path may have been replaced by a FIFO or device since os.stat: check what was opened.
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(name, _not_regular_reason(mode))
        chunks: list[bytes] = []
        left = max_bytes + 1  # bounded: the file may have grown since stat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise ImageError(name, f"unreadable ({e.strerror or e})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise ImageError(name, "empty file")
    if len(data) > max_bytes:
        raise ImageError(name, f"file too large: exceeds the {_size_text(max_bytes)} limit")
    return data


def content_id(data: bytes) -> str:
    """The stable image id: the sha256 hex digest of the file's bytes (same photo, same id, whatever its name)."""
    return hashlib.sha256(data).hexdigest()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def _indexed_format(data: bytes) -> str | None:
    """The indexed format whose signature ``data`` starts with (even if nothing after it is usable), else None."""
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE) or (len(data) >= 4 and _PNG_SIGNATURE.startswith(data)):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_HEADER_SIZES:
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    return None


def _broken_header_reason(fmt: str, data: bytes) -> str:
    """The reason for a file that starts like ``fmt`` but that Pillow's ``fmt`` opener refused."""
    if fmt == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        if width == 0 or height == 0:
            return f"truncated or corrupt image data (PNG header declares {width}x{height} px)"
    detail = ""
    factory = Image.OPEN.get(fmt, (None, None))[0]
    if factory is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(io.BytesIO(data), "").close()
        except (EOFError, struct.error):
            detail = "cut short"
        except Exception as e:  # only used to word the message
            detail = _detail(e)
    if len(data) < 64 or "buffer" in detail or "cut short" in detail or "not a" in detail or not detail:
        return f"truncated or corrupt image data ({fmt} file cut short after {len(data)} bytes)"
    return f"truncated or corrupt image data ({fmt} header: {detail})"


# Signatures of files that turn up under image names, checked before asking Pillow: (prefix, offset, reason).
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "unsupported format PDF"),
    (b"PK\x03\x04", 0, "not an image (ZIP archive)"),
    (b"PK\x05\x06", 0, "not an image (ZIP archive)"),
    (b"\x1f\x8b", 0, "not an image (gzip-compressed data)"),
    (b"BZh", 0, "not an image (bzip2-compressed data)"),
    (b"\xfd7zXZ\x00", 0, "not an image (xz-compressed data)"),
    (b"\x28\xb5\x2f\xfd", 0, "not an image (zstd-compressed data)"),
    (b"7z\xbc\xaf\x27\x1c", 0, "not an image (7-Zip archive)"),
    (b"Rar!\x1a\x07", 0, "not an image (RAR archive)"),
    (b"MZ", 0, "not an image (Windows executable)"),
    (b"\x7fELF", 0, "not an image (ELF executable)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "unsupported format JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "unsupported format JPEG 2000"),
    (b"\xff\x0a", 0, "unsupported format JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "unsupported format JPEG XL"),
    (b"8BPS", 0, "unsupported format PSD"),
    (b"WAVE", 8, "not an image (WAV audio)"),
    (b"AVI ", 8, "not an image (AVI video)"),
    (b"ID3", 0, "not an image (MP3 audio)"),
    (b"OggS", 0, "not an image (Ogg media)"),
    (b"\x1a\x45\xdf\xa3", 0, "not an image (Matroska/WebM video)"),
    (b"SQLite format 3\x00", 0, "not an image (SQLite database)"),
)
_HEIC_BRANDS = {"heic", "heix", "hevc", "hevx", "heim", "heis", "mif1", "msf1"}
_AVIF_BRANDS = {"avif", "avis"}
_VIDEO_BRANDS = {"isom", "iso2", "iso4", "iso5", "iso6", "mp41", "mp42", "avc1", "dash", "m4v", "m4a", "f4v", "mmp4",
                 "qt", "3gp4", "3gp5", "3gp6", "3g2a", "mjp2", "msnv"}  # fmt: skip


def _iso_media_reason(data: bytes) -> str:
    brand = data[8:12].decode("ascii", "replace").strip()
    if brand in _HEIC_BRANDS:
        return "unsupported format HEIC"
    if brand in _AVIF_BRANDS:
        return "unsupported format AVIF"
    if brand == "qt":
        return "not an image (QuickTime video)"
    if brand in _VIDEO_BRANDS:
        return "not an image (MP4 video)" if brand != "m4a" else "not an image (MP4 audio)"
    return f"not an image (ISO media file, brand {brand!r})"


def _text_reason(data: bytes) -> str | None:
    """Name the kind of text a file holds, or None when it is not text."""
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (Windows Notepad)
        text = head[: len(head) // 2 * 2].decode("utf-16", "replace")
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            # A multi-byte character cut by the 4096-byte window is still text.
            text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 and e.start > 0 else ""
    text = text.lstrip("\ufeff")
    if not text or sum(c.isprintable() or c.isspace() for c in text) < 0.95 * len(text):
        return None
    lower = text.lstrip().lower()
    if lower.startswith("version https://git-lfs.github.com/spec/"):
        return "not an image (Git LFS pointer: the photo itself was never downloaded)"
    if lower.startswith("data:image/") and ";base64," in lower[:64]:
        return "not an image (base64 data URI text: the image is encoded inside it)"
    if lower.startswith(("{", "[")):
        try:
            json.loads(data.decode("utf-8"))
            return "not an image (JSON text file)"
        except (ValueError, UnicodeDecodeError):
            pass
    if lower.startswith("<?xml") or (lower.startswith("<") and "</" in lower):
        return "not an image (XML text file)"
    return "not an image (text file)"


def _not_an_image_reason(data: bytes) -> str:
    """Name what a file Pillow could not open actually is, so the error says more than "unrecognised"."""
    fmt = _indexed_format(data)
    if fmt:
        return _broken_header_reason(fmt, data)
    if not data.strip(b"\x00"):
        return "not an image (all zero bytes: the data was never written)"
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "unsupported format SVG"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        return "not an image (HTML page)"
    if data[4:8] == b"ftyp":
        return _iso_media_reason(data)
    for prefix, offset, reason in _SIGNATURES:
        if data[offset : offset + len(prefix)] == prefix:
            return reason
    # Any format Pillow knows but we do not index (EPS, ICO, ...): name it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                if other.format:
                    return f"unsupported format {other.format}"
    except Exception:  # only used to word the message
        pass
    return _text_reason(data) or "not an image (unrecognised format)"


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
    return decode_image_for(data, path, max_pixels=max_pixels, min_side=min_side)[0]


def decode_image_for(
    data: bytes,
    path: str,
    *,
    side: int = 0,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` for a consumer that shrinks the image to a shorter side of ``side`` px anyway (a
    model's resize; 0: full size), and the photo's own upright ``(width, height)``.

    A JPEG at least four times that size on both sides is decoded by libjpeg's DCT scaling at 1/2, 1/4 or 1/8
    (Pillow's ``draft``), never below ``2 * side``: a 12 Mpx phone photo decodes several times faster, and the
    model's own resize then still shrinks at least 2x (EfficientNet-Lite0 embeddings agree to cosine >= 0.999
    with a full decode: tests/test_images.py)."""
    if not data:
        raise ImageError(path, "empty file")
    # Pillow warns from ~89 Mpx (our own limit below is the one that decides) and about damaged
    # EXIF and the like (the file is judged by whether it decodes): noise for an indexing run.
    # catch_warnings restores the filters on exit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        return _decode(data, path, max_pixels=max_pixels, min_side=min_side, side=side)


def _decode(data: bytes, path: str, *, max_pixels: int, min_side: int,
            side: int) -> tuple[Image.Image, tuple[int, int]]:
    try:
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
        if side > 0 and img.format == "JPEG" and min(width, height) >= 4 * side:
            # Both sides stay >= 2 * side: the model's resize still shrinks at least 2x, antialiased as from the
            # full image (at >= side only, embeddings moved to cosine 0.9990).
            img.draft(None, (2 * side, 2 * side))
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
        # A quarter turn (EXIF orientations 5-8) swaps the sides of the photo as well as of the decoded image.
        turned = upright.size != img.size
        return _to_rgb(upright, path), ((height, width) if turned else (width, height))


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
