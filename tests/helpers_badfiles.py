"""A corpus of unusable files, one of each way a scraped cat/dog folder goes wrong, for the image and indexing tests.

Every file carries an image extension so the scanner takes it as a candidate and the indexer
has to report it (a file with another extension is never read).

- ``make_bad_corpus(dir)`` -> ``{file name: keyword its ImageError reason must contain}``; every
  entry is a file (or link, folder, FIFO, socket, device) directly in ``dir``. The one bad file
  name that is not valid UTF-8 is only added with ``non_utf8_name=True``: its name is a
  surrogate-escaped ``str`` that Arrow/Parquet cannot store, so callers must be ready for it.
- ``make_non_utf8_file(dir)`` writes that one file alone: a real photo named ``b"bad\\xff.jpg"``.
- ``add_duplicates(dir)`` writes two byte-identical copies of a real photo under different names:
  not errors (the indexer indexes one and counts the other as a duplicate).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import os
import random
import socket
import stat
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

from indexer.defaults import MAX_FILE_BYTES

_PETS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pets"

NON_UTF8_NAME = b"bad\xff.jpg"  # Latin-1 "badÿ.jpg" copied from an old archive
NON_UTF8_KEYWORD = "not valid UTF-8"


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


def jpeg_segments(data: bytes) -> dict[int, int]:
    """Offsets of the header markers of a baseline JPEG: ``{marker byte: offset of its 0xFF}``, up to the first SOS."""
    found: dict[int, int] = {}
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        found.setdefault(marker, i)
        if marker == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return found


def jpeg_with_size(photo: bytes, width: int, height: int) -> bytes:
    """The photo with its SOF header claiming ``width`` x ``height`` (pixel data unchanged)."""
    seg = jpeg_segments(photo)
    sof = next(seg[m] for m in (0xC0, 0xC1, 0xC2) if m in seg)
    return photo[: sof + 5] + struct.pack(">HH", height, width) + photo[sof + 9 :]


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _iso_box(brand: bytes, compatible: bytes) -> bytes:
    """An ISO base-media ``ftyp`` box (HEIC, AVIF, MP4, MOV all start with one) plus an empty ``mdat``."""
    body = brand + b"\x00\x00\x00\x00" + compatible
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + struct.pack(">I", 16) + b"mdat" + b"\x00" * 8


def make_non_utf8_file(dir: Path) -> str:
    """A real photo named ``b"bad\\xff.jpg"`` in ``dir``; returns the name as Python lists it (``"bad\\udcff.jpg"``)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    # Through the bytes API: the name cannot be spelled as a valid str.
    fd = os.open(os.path.join(os.fsencode(dir), NON_UTF8_NAME), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, real_photo_bytes())
    finally:
        os.close(fd)
    return os.fsdecode(NON_UTF8_NAME)


def add_duplicates(dir: Path) -> tuple[str, str]:
    """Two byte-identical copies of a real photo under two names: not errors (one is indexed, one is a duplicate)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    photos = sorted(_PETS.glob("dog/*/*.jpg"))
    data = photos[len(photos) // 2].read_bytes() if photos else real_photo_bytes()
    names = ("dup_original.jpg", "dup_copy (1).jpg")
    for name in names:
        (dir / name).write_bytes(data)
    return names


def make_bad_corpus(dir: Path, *, non_utf8_name: bool = False) -> dict[str, str]:
    """Write the bad files into ``dir``; returns file name -> a keyword its ImageError reason must contain.

    Kinds that the running user cannot produce are left out (an unreadable file when running as
    root, a device node without CAP_MKNOD), so the keys are the files actually written.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    photo = real_photo_bytes()
    rng = random.Random(42)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, keyword: str) -> None:
        (dir / name).write_bytes(data)
        expected[name] = keyword

    # ---- empty, cut short or damaged photos
    put("empty.jpg", b"", "empty file")
    put("zeros.jpg", b"\x00" * 8192, "zero bytes")  # preallocated, never written (failed download, disk error)
    put("truncated.jpg", photo[: len(photo) // 2], "truncated or corrupt")
    put("jpeg_soi_only.jpg", photo[:2], "truncated or corrupt")
    seg = jpeg_segments(photo)
    put("jpeg_headers_only.jpg", photo[: seg[0xDA]], "truncated or corrupt")  # every header, no scan data
    put("jpeg_cut_1pct.jpg", photo[: max(len(photo) // 100, 3)], "truncated or corrupt")
    put("jpeg_cut_99pct.jpg", photo[: len(photo) * 99 // 100], "truncated or corrupt")
    scan_start = seg[0xDA] + 2 + int.from_bytes(photo[seg[0xDA] + 2 : seg[0xDA] + 4], "big")
    mid = (scan_start + len(photo)) // 2
    put("jpeg_corrupt_scan.jpg", photo[:mid] + rng.randbytes(256) + photo[mid + 256 :], "corrupt")
    put("jpeg_no_eoi_padding.jpg", photo[: len(photo) // 3] + b"\x00" * (len(photo) * 2 // 3), "truncated or corrupt")

    with Image.open(io.BytesIO(photo)) as im:
        rgb = im.convert("RGB")
    png = _encode(rgb, "PNG")
    put("truncated.png", png[: len(png) * 6 // 10], "truncated or corrupt")
    ihdr_crc = 8 + 8 + 13  # signature, IHDR length + tag, IHDR payload: the CRC's offset
    put("png_bad_crc.png", png[:ihdr_crc] + bytes(b ^ 0xFF for b in png[ihdr_crc : ihdr_crc + 4]) + png[ihdr_crc + 4 :],
        "corrupt")  # fmt: skip
    idat = png.index(b"IDAT") + 4 + 40
    put("png_garbled_idat.png", png[:idat] + rng.randbytes(64) + png[idat + 64 :], "corrupt")
    put("png_signature_only.png", png[:8], "truncated or corrupt")
    put("png_zero_width.png", png_header_only(0, 480), "corrupt")

    gif = _encode(rgb.convert("P"), "GIF")
    put("truncated.gif", gif[: len(gif) // 2], "truncated or corrupt")
    frames = [Image.new("P", (16, 16), c) for c in (1, 2, 3)]
    anim = bytearray(_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0))
    anim[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen 65535x65535: a bomb header
    put("gif_bomb.gif", bytes(anim), "image too large")

    webp = _encode(rgb, "WEBP", quality=80)
    put("truncated.webp", webp[: len(webp) // 2], "truncated or corrupt")
    wav = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8)
    put("riff_not_webp.webp", wav + b"data" + struct.pack("<I", 0), "WAV audio")

    bmp = bytearray(_encode(Image.new("RGB", (64, 64), (120, 80, 40)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 4000, 3000)  # the header claims 12 Mpx, the file holds 4 Kpx
    put("bmp_lying_size.bmp", bytes(bmp), "truncated or corrupt")
    put("tiff_bogus_ifd.tif", b"II*\x00" + struct.pack("<I", 0x7FFFFF00) + rng.randbytes(120), "truncated or corrupt")

    # ---- sizes: bombs and slivers
    put("bomb.png", png_header_only(100_000, 100_000), "image too large")
    put("jpeg_sof_bomb.jpg", jpeg_with_size(photo, 65000, 65000), "image too large")  # Pillow's own limit
    put("jpeg_over_limit.jpg", jpeg_with_size(photo, 9000, 9000), "image too large")  # only ours
    put("tiny.png", _encode(Image.new("RGB", (2, 2), (200, 30, 30)), "PNG"), "image too small")
    put("one_pixel.gif", _encode(Image.new("P", (1, 1)), "GIF"), "image too small")  # a tracking pixel
    put("thin_strip.png", _encode(Image.new("RGB", (10_000, 1), (90, 90, 90)), "PNG"), "image too small")

    # ---- image formats we do not index
    put("logo.png", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<circle cx="32" cy="32" r="30" fill="orange"/></svg>\n', "SVG")  # fmt: skip
    put("iphone.jpg", _iso_box(b"heic", b"mif1heic"), "HEIC")
    put("avif_photo.png", _iso_box(b"avif", b"avifmif1miaf"), "AVIF")
    put("favicon.png", _encode(Image.new("RGB", (32, 32), (0, 90, 200)), "ICO"), "unsupported format ICO")
    put("jpeg2000.jpg", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x14ftypjp2 " + b"\x00" * 64, "JPEG 2000")
    put("jpegxl.jpg", b"\xff\x0a" + rng.randbytes(200), "JPEG XL")
    put("layered.png", b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\x00" * 64, "PSD")

    # ---- not images at all
    put("random_bytes.jpg", rng.randbytes(4096), "unrecognised format")
    put("notes.jpg", b"Shopping list\n- cat food\n- dog treats\n" * 20, "text file")
    put("page.png", b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>gone</body></html>\n", "HTML")
    put("access_denied.jpg", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
        b"<Message>Access Denied</Message></Error>", "XML")  # fmt: skip
    put("api_error.jpg", b'{"error": {"code": 429, "message": "rate limit exceeded"}}\n', "JSON")
    put("labels.jpg", b"path,species,breed\ncat/1.jpg,cat,persian\ndog/2.jpg,dog,pug\n" * 5, "text file")
    put("script.jpg", b"#!/usr/bin/env python3\nimport requests\n\nfor url in urls:\n    fetch(url)\n" * 3, "text file")
    put("utf16_notes.jpg", "Katzenfutter kaufen, Hundeleine reparieren.\r\n".encode("utf-16") * 4, "text file")
    put("data_uri.jpg", b"data:image/jpeg;base64," + base64.b64encode(photo[:600]), "base64")
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4d7a2146" * 8 + b"\nsize 48213\n"
    put("lfs_pointer.jpg", lfs, "Git LFS")  # a dataset cloned without `git lfs pull`
    put("scan.jpg", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n", "PDF")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("cat.jpg", photo)
    put("archive.png", zbuf.getvalue(), "ZIP")
    put("compressed.jpg", gzip.compress(photo, mtime=0), "gzip")
    put("compressed_bz2.jpg", bz2.compress(photo), "bzip2")
    put("archive_7z.jpg", b"7z\xbc\xaf\x27\x1c\x00\x04" + rng.randbytes(120), "7-Zip")
    put("archive_rar.jpg", b"Rar!\x1a\x07\x01\x00" + rng.randbytes(120), "RAR")
    put("video.jpg", _iso_box(b"isom", b"isomiso2avc1mp41"), "video")
    put("clip.jpg", _iso_box(b"qt  ", b"qt  "), "video")
    exe = b"MZ\x90\x00\x03" + b"\x00" * 55 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 64
    put("setup.jpg", exe, "executable")
    put("binary.jpg", b"\x7fELF\x02\x01\x01" + b"\x00" * 120, "executable")

    # ---- not regular files, or not readable
    (dir / "broken_link.jpg").symlink_to(dir / "no-such-target.jpg")
    expected["broken_link.jpg"] = "broken symlink"
    (dir / "dangling_dir_link.jpg").symlink_to(dir / "no-such-folder" / "", target_is_directory=True)
    expected["dangling_dir_link.jpg"] = "broken symlink"
    (dir / "loop_a.jpg").symlink_to(dir / "loop_b.jpg")
    (dir / "loop_b.jpg").symlink_to(dir / "loop_a.jpg")
    expected["loop_a.jpg"] = expected["loop_b.jpg"] = "symlink loop"
    (dir / "folder.jpg").mkdir()
    expected["folder.jpg"] = "is a directory"
    os.mkfifo(dir / "pipe.jpg")  # opening it for reading would block until a writer comes: forever
    expected["pipe.jpg"] = "not a regular file"
    (dir / "devnull.jpg").symlink_to("/dev/null")  # reads as empty forever (/dev/zero: endless zeros)
    expected["devnull.jpg"] = "not a regular file"
    try:
        os.mknod(dir / "device.jpg", 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        expected["device.jpg"] = "not a regular file"
    except (PermissionError, OSError):
        pass  # no CAP_MKNOD here: the /dev/null link covers devices
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(dir / "socket.jpg"))  # the socket file stays after close
        expected["socket.jpg"] = "not a regular file"
    except OSError:
        pass  # path too long for AF_UNIX (deep temp dirs)
    finally:
        sock.close()
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        put("no_permission.jpg", photo, "permission denied")
        os.chmod(dir / "no_permission.jpg", 0)

    # Sparse: one byte over the limit costs no disk.
    with open(dir / "huge.jpg", "wb") as f:
        f.write(photo[:64])
        f.truncate(MAX_FILE_BYTES + 1)
    expected["huge.jpg"] = "file too large"

    if non_utf8_name:
        expected[make_non_utf8_file(dir)] = NON_UTF8_KEYWORD
    return expected
