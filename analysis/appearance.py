"""Does a space's neighbourhood carry appearance (colour, framing, pose) across breeds?

The mapper's ``z_attr`` is meant to hold what is not breed. Its evidence is here: for held-out photos, the nearest
photos *of other breeds* in a space, and how alike they look. "Alike" is measured on a tiny colour thumbnail
(:func:`appearance_codes`: the centre square shrunk to 8 x 8 RGB), which keeps colour and the coarse layout of
the frame (where the animal is, how large, light or dark background) and nothing finer; its distance to a random
photo of another breed is the trivial baseline.  :func:`save_neighbour_grid` draws the same neighbours as a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from indexer.images import ImageError, load_image
from indexer.store import unit_rows
from indexer.store.atomic import atomic_write

CODE_SIDE = 8  # thumbnail side of an appearance code: colour and layout, no texture


def _centre_square(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.resize((side, side), Image.Resampling.BOX, box=(left, top, left + s, top + s))


def appearance_codes(paths: Sequence[str | Path], side: int = CODE_SIDE) -> np.ndarray:
    """``(N, side * side * 3)`` float32 in [0, 1]: each photo's centre square averaged down to ``side`` x ``side``.

    A photo that cannot be read gets NaNs (and is left out of every distance)."""
    out = np.full((len(paths), side * side * 3), np.nan, dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            _, img = load_image(Path(p))
        except ImageError:
            continue
        out[i] = np.asarray(_centre_square(img, side), dtype=np.float32).reshape(-1) / 255.0
    return out


def _breed_arrays(breeds: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Labels as an object array ("" where unknown) and the mask of rows that have one."""
    labels = np.array([b if b is not None else "" for b in breeds], dtype=object)
    return labels, np.array([b is not None for b in breeds])


def cross_breed_neighbours(vectors: np.ndarray, breeds: Sequence[str | None], rows: Sequence[int],
                           k: int) -> np.ndarray:
    """``(len(rows), k)``: for each query row, the k nearest rows (cosine) that have a breed other than its own.

    Queries need a breed; rows without one are never neighbours (their breed is unknown, not other)."""
    unit = unit_rows(np.asarray(vectors, dtype=np.float32))
    labels, known = _breed_arrays(breeds)
    out = np.empty((len(rows), k), dtype=np.int64)
    for n, r in enumerate(rows):
        sims = unit @ unit[r]
        sims[~known | (labels == labels[r])] = -np.inf
        out[n] = np.argsort(-sims, kind="stable")[:k]
    return out


def _random_other_breed(breeds: Sequence[str | None], rows: Sequence[int], k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels, known = _breed_arrays(breeds)
    return np.stack([rng.choice(np.flatnonzero(known & (labels != labels[r])), size=k, replace=False) for r in rows])


def _mean_distance(codes: np.ndarray, rows: Sequence[int], neighbours: np.ndarray) -> float:
    d = np.linalg.norm(codes[neighbours] - codes[np.asarray(rows)][:, None, :], axis=2) / np.sqrt(codes.shape[1])
    return float(np.nanmean(d))


def appearance_report(codes: np.ndarray, spaces: Mapping[str, np.ndarray], breeds: Sequence[str | None],
                      rows: Sequence[int], *, k: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean RMS distance between the appearance code of each query row and those of its k nearest other-breed
    photos, per space (``appearance_distance_<space>``), and to k random other-breed photos
    (``appearance_distance_random``, the baseline). Lower means neighbours look more alike."""
    rows = [r for r in rows if breeds[r] is not None]
    out = {f"appearance_distance_{name}": _mean_distance(codes, rows, cross_breed_neighbours(v, breeds, rows, k))
           for name, v in spaces.items()}
    out["appearance_distance_random"] = _mean_distance(codes, rows, _random_other_breed(breeds, rows, k, seed))
    return out


def save_neighbour_grid(paths: Sequence[str | Path], breeds: Sequence[str | None], rows: Sequence[int],
                        neighbours: np.ndarray, out: Path, *, side: int = 96) -> None:
    """PNG: one line per query, the query photo (framed) then its neighbours, each captioned with its breed."""
    caption = 14
    pad = 4
    n_cols = 1 + neighbours.shape[1]
    sheet = Image.new("RGB", (n_cols * (side + pad) + pad, len(rows) * (side + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for line, (q, nbrs) in enumerate(zip(rows, neighbours, strict=True)):
        y = pad + line * (side + caption + pad)
        for col, r in enumerate([q, *nbrs.tolist()]):
            x = pad + col * (side + pad)
            try:
                _, img = load_image(Path(paths[r]))
                sheet.paste(_centre_square(img, side), (x, y))
            except ImageError:
                draw.rectangle((x, y, x + side - 1, y + side - 1), outline="grey")
            if col == 0:
                draw.rectangle((x - 2, y - 2, x + side + 1, y + side + 1), outline="black", width=2)
            draw.text((x, y + side + 1), str(breeds[r] or "?")[: side // 6], fill="black")
    atomic_write(Path(out), lambda tmp: sheet.save(tmp, format="PNG"))
