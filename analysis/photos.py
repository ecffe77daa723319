"""Photos for display: thumbnails of indexed images and previews of uploads, read by the indexer's safe loader.

Both return the image, or the reason it could not be read (a string), so that a viewer can show a placeholder
instead of an error; nothing here writes a file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from indexer.images import ImageError, decode_image, load_image


def thumbnail(path: str | Path, side: int) -> Image.Image | str:
    """The photo at ``path`` (an indexed image's stored path) shrunk to fit ``side`` × ``side``."""
    try:
        _, img = load_image(Path(path))
    except ImageError as e:
        return e.reason
    img.thumbnail((side, side))
    return img


def square_thumbnail(path: str | Path, side: int) -> Image.Image | str:
    """The centre square of the photo at ``path``, ``side`` x ``side`` (galleries of even tiles)."""
    try:
        _, img = load_image(Path(path))
    except ImageError as e:
        return e.reason
    short = min(img.size)
    left, top = (img.width - short) // 2, (img.height - short) // 2
    return img.crop((left, top, left + short, top + short)).resize((side, side), Image.Resampling.LANCZOS)


def preview(data: bytes, name: str, side: int) -> Image.Image | str:
    """An uploaded photo, decoded (never shown as the uploaded bytes themselves) and shrunk to fit ``side``."""
    try:
        img = decode_image(data, name)
    except ImageError as e:
        return e.reason
    img.thumbnail((side, side))
    return img
