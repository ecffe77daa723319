"""The appearance evidence for z_attr (analysis.appearance): other-breed neighbours, colour codes, the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from analysis.appearance import appearance_codes, appearance_report, cross_breed_neighbours, save_neighbour_grid


def _photo(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_cross_breed_neighbours_skip_own_breed_and_unlabelled_rows() -> None:
    vectors = np.array([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.95, 0.3], [0.0, 1.0]])
    breeds = ["a", "a", "b", None, "c"]
    nbrs = cross_breed_neighbours(vectors, breeds, [0, 2], k=2)
    # Row 1 (same breed) and row 3 (unknown breed) are nearer to row 0 but never its neighbours.
    assert nbrs[0].tolist() == [2, 4]
    assert nbrs[1].tolist() == [1, 0]


def test_appearance_codes_and_report_prefer_a_space_that_groups_colours(tmp_path: Path) -> None:
    colours = [(250, 10, 10), (240, 20, 20), (10, 10, 250), (20, 20, 240)] * 3
    breeds = [f"breed{i}" for i in range(len(colours))]
    paths = [_photo(tmp_path / f"{i}.png", c) for i, c in enumerate(colours)]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    codes = appearance_codes([*paths, tmp_path / "broken.jpg"])
    assert codes.shape == (13, 8 * 8 * 3) and np.isnan(codes[-1]).all()  # unreadable: NaN, left out of distances
    assert np.allclose(codes[0].reshape(8, 8, 3)[0, 0], np.array(colours[0]) / 255, atol=1e-6)
    codes = codes[:-1]
    red = np.array([c[0] > 100 for c in colours], dtype=float)
    by_colour = np.stack([red, 1 - red], axis=1) + 0.01 * np.arange(len(colours))[:, None]
    by_chance = np.random.default_rng(0).normal(size=(len(colours), 2))
    report = appearance_report(codes, {"colour": by_colour, "chance": by_chance}, breeds, list(range(4)), k=2)
    assert report["appearance_distance_colour"] < 0.05
    assert report["appearance_distance_colour"] < report["appearance_distance_random"]
    out = tmp_path / "grid.png"
    save_neighbour_grid(paths, breeds, [0, 1], cross_breed_neighbours(by_colour, breeds, [0, 1], 2), out, side=32)
    with Image.open(out) as grid:
        assert grid.size == (3 * 36 + 4, 2 * (32 + 14 + 4) + 4)
