"""Exports for papers: LaTeX that compiles-looking and round-trips its numbers, CSV/Parquet round trips, PNG/SVG
figures, and the `mammals export` command on a small on-disk store."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.export import (
    depth_curve_figure,
    heatmap_figure,
    image_table,
    latex_escape,
    save_figure,
    save_latex,
    to_csv,
    to_latex,
    to_parquet,
    widen_vectors,
)
from analysis.sparsity_stats import breed_heatmap, depth_curves, group_tests
from indexer.cli import main as cli
from indexer.store import Store
from tests.test_sparsity_stats import make_store, planted_groups

# ------------------------------------------------------------------------------------------------- LaTeX


def results_table() -> pd.DataFrame:
    return pd.DataFrame({
        "breed": ["german_shorthaired", "50% & #1 {x}", "a~b^c\\d $5", "beagle"],
        "n": np.array([40, 38, 2, 17], dtype=np.int64),
        "mean": [0.123456, -0.0000004, 12.5, np.nan],
        "statistic": [15.25, 0.5, 3.14159, 2.0001],
        "p_adjusted": [1.234e-7, 0.0456, 0.5, np.nan],
        "significant": [True, True, False, False],
    })


def _split_row(line: str) -> list[str]:
    body = line.strip()
    assert body.endswith("\\\\")
    return [c.strip() for c in re.split(r"(?<!\\)&", body[:-2])]


def _parse_number(cell: str) -> float:
    if cell == "--":
        return math.nan
    m = re.fullmatch(r"\$(-?\d+(?:\.\d+)?)\\times10\^\{(-?\d+)\}\$", cell)
    if m:
        return float(f"{m.group(1)}e{m.group(2)}")
    return float(cell)


def _tabular_rows(tex: str) -> tuple[list[str], list[list[str]]]:
    lines = tex.splitlines()
    top, mid, bottom = lines.index("\\toprule"), lines.index("\\midrule"), lines.index("\\bottomrule")
    assert top < mid < bottom
    assert mid == top + 2  # exactly one header row
    return _split_row(lines[top + 1]), [_split_row(line) for line in lines[mid + 1:bottom]]


def test_latex_is_balanced_booktabs_with_escaped_text() -> None:
    df = results_table()
    tex = to_latex(df, caption="Kruskal_Wallis per layer (5% FDR)", label="tab:sparsity-tests")
    # Environments open and close in nesting order.
    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", tex):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env
    assert not stack
    assert re.findall(r"\\begin\{(\w+)\}", tex) == ["table", "tabular"]
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert tex.count(rule) == 1
    assert "\\caption{Kruskal\\_Wallis per layer (5\\% FDR)}" in tex
    assert "\\label{tab:sparsity-tests}" in tex
    header, rows = _tabular_rows(tex)
    assert header == ["breed", "n", "mean", "statistic", "p\\_adjusted", "significant"]
    assert [r[0] for r in rows] == [
        "german\\_shorthaired",
        "50\\% \\& \\#1 \\{x\\}",
        "a\\textasciitilde{}b\\textasciicircum{}c\\textbackslash{}d \\$5",
        "beagle",
    ]
    assert len(rows) == len(df) and all(len(r) == df.shape[1] for r in rows)
    # No special character is left bare in the body, outside our own $...\times10^{...}$ numbers.
    body = "\n".join(" ".join(r) for r in rows)
    body = re.sub(r"\$-?\d+(\.\d+)?\\times10\^\{-?\d+\}\$", "", body)
    body = body.replace("\\textasciitilde{}", "").replace("\\textasciicircum{}", "").replace("\\textbackslash{}", "")
    assert not re.search(r"(?<!\\)[_%&#${}~^]", body)
    # Column spec: text left, numbers right, bools as yes/no.
    assert "\\begin{tabular}{lrrrrl}" in tex
    assert [r[5] for r in rows] == ["yes", "yes", "no", "no"]


@pytest.mark.parametrize("digits", [1, 3, 4])
def test_latex_numbers_round_trip_to_the_stated_digits(digits: int) -> None:
    df = results_table()
    header, rows = _tabular_rows(to_latex(df, caption="c", label="t", digits=digits))
    for j, col in enumerate(header):
        name = col.replace("\\_", "_")
        if name in ("breed", "significant"):
            continue
        for i, row in enumerate(rows):
            want = df[name].iloc[i]
            got = _parse_number(row[j])
            if pd.isna(want):
                assert row[j] == "--"
            elif name == "n":
                assert row[j] == str(int(want))  # ints as ints, no decimals
            elif name == "p_adjusted" and want < 1e-3:
                assert row[j].startswith("$")  # scientific, digits significant figures
                assert got == float(f"{want:.{digits - 1}e}")
            else:
                assert got == round(float(want), digits)
                assert len(row[j].split(".")[1]) == digits if digits else "." not in row[j]
    # -0.0000004 rounds to zero without a minus sign.
    assert rows[1][2] == "0." + "0" * digits


def test_latex_options_columns_index_and_bad_label(tmp_path: Path) -> None:
    df = results_table().set_index("breed")
    tex = to_latex(df, caption="x", label="tab:x", columns=["n"], index=True)
    header, rows = _tabular_rows(tex)
    assert header == ["breed", "n"] and rows[0] == ["german\\_shorthaired", "40"]
    with pytest.raises(ValueError, match="label"):
        to_latex(df, caption="x", label="tab:{bad}")
    save_latex(df, tmp_path / "t.tex", caption="x", label="tab:x", index=True)
    assert (tmp_path / "t.tex").read_text("utf-8") == to_latex(df, caption="x", label="tab:x", index=True)
    assert latex_escape("\\_") == "\\textbackslash{}\\_"  # one pass: no double escaping


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed here")
def test_latex_compiles_with_pdflatex(tmp_path: Path) -> None:  # pragma: no cover - needs a TeX installation
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
           + to_latex(results_table(), caption="c_1", label="tab:c") + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]


# ------------------------------------------------------------------------------------------------- CSV / Parquet


def test_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vec = [rng.normal(size=4).astype(np.float32) for _ in range(3)]
    df = pd.DataFrame({
        "id": ["a", "b", "c"],
        "breed": ["german_shorthaired", None, "pug, \"black\""],
        "n": np.array([1, 2, 3], dtype=np.int64),
        "value": [0.1, 1 / 3, np.nan],
        "significant": [True, False, True],
        "encoder": pd.Series(vec, dtype=object),
    })
    to_parquet(df, tmp_path / "t.parquet")
    back = pd.read_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back.drop(columns="encoder"), df.drop(columns="encoder"))
    for a, b in zip(back["encoder"], df["encoder"], strict=True):
        np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), b)

    to_csv(df, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back.drop(columns="encoder"), df.drop(columns="encoder"))
    for a, b in zip(back["encoder"], df["encoder"], strict=True):
        np.testing.assert_array_equal(np.array(json.loads(a), dtype=np.float32), b)
    assert not list(tmp_path.glob(".*.tmp"))


def test_vectors_are_a_fixed_size_list_in_parquet_and_columns_in_a_wide_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vec = [np.arange(4, dtype=np.float32) + i / 3 for i in range(3)]
    df = pd.DataFrame({"id": ["a", "b", "c"], "encoder": pd.Series(vec, dtype=object)})
    to_parquet(df, tmp_path / "t.parquet")
    kind = pq.read_schema(tmp_path / "t.parquet").field("encoder").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 4 and kind.value_type == pa.float32()
    back = pq.read_table(tmp_path / "t.parquet").column("encoder").combine_chunks()
    np.testing.assert_array_equal(back.values.to_numpy().reshape(3, 4), np.stack(vec))

    to_csv(df, tmp_path / "wide.csv", wide=True)
    wide = pd.read_csv(tmp_path / "wide.csv")
    assert list(wide.columns) == ["id", "e0", "e1", "e2", "e3"]
    np.testing.assert_array_equal(wide[["e0", "e1", "e2", "e3"]].to_numpy(np.float32), np.stack(vec))
    two = df.assign(vae_mu=pd.Series([v[:2] for v in vec], dtype=object))
    assert list(widen_vectors(two).columns) == ["id", *[f"encoder_e{i}" for i in range(4)], "vae_mu_e0", "vae_mu_e1"]
    # Ragged cells cannot be a fixed-size list: they stay a plain list column.
    to_parquet(pd.DataFrame({"v": pd.Series([np.zeros(2), np.zeros(3)], dtype=object)}), tmp_path / "r.parquet")
    assert pa.types.is_list(pq.read_schema(tmp_path / "r.parquet").field("v").type)


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "t.parquet"
    to_parquet(pd.DataFrame({"a": [1]}), target)
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - Arrow's error type for an unconvertible column varies
        to_parquet(pd.DataFrame({"a": [object()]}), target)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_image_table_joins_vectors_map_and_clusters_by_id(tmp_path: Path) -> None:
    sparsity, labels = planted_groups(0, per_group=4, layers=3, shifted=())
    store = Store.open(make_store(tmp_path / "s", sparsity, labels))
    ids = store.images["id"].tolist()
    # Map and cluster frames in another order, one image missing from the clusters.
    map_frame = pd.DataFrame({"id": ids[::-1], "x": np.arange(12.0)[::-1], "y": np.arange(12.0)[::-1] * 2})
    clusters = pd.DataFrame({"id": ids[1:][::-1], "cluster": np.arange(11)[::-1], "probability": 0.5})
    t = image_table(store, ["encoder"], map_frame=map_frame, clusters=clusters)
    assert t["id"].tolist() == ids and len(t) == 12
    np.testing.assert_array_equal(np.stack(t["encoder"].to_list()), store.space("encoder").vectors)
    assert t["x"].tolist() == list(np.arange(12.0)) and t["y"].tolist() == list(np.arange(12.0) * 2)
    assert np.isnan(t["cluster"].iloc[0]) and t["cluster"].iloc[1:].tolist() == list(range(11))
    with pytest.raises(ValueError, match="overwrite"):
        image_table(store, map_frame=map_frame.rename(columns={"x": "breed"}))
    to_parquet(t, tmp_path / "images.parquet")
    back = pd.read_parquet(tmp_path / "images.parquet")
    np.testing.assert_array_equal(np.stack(back["encoder"].to_list()), store.space("encoder").vectors)


# ------------------------------------------------------------------------------------------------- figures


def test_figures_are_written_as_valid_png_and_svg(tmp_path: Path) -> None:
    sparsity, labels = planted_groups(1, per_group=10, layers=8, shifted=(5, 6, 7))
    curves = depth_curves(sparsity, "encoder", "hoyer", "breed", labels=labels)
    fig = depth_curve_figure(curves, title="Hoyer sparsity over depth")
    ax = fig.axes[0]
    assert len(ax.lines) == 4 and len(ax.collections) == 4  # a mean line and a CI band per group (and "all")
    for suffix in ("png", "svg"):
        save_figure(fig, tmp_path / f"curves.{suffix}")
    with Image.open(tmp_path / "curves.png") as im:
        im.verify()
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300
    root = ET.parse(tmp_path / "curves.svg").getroot()
    assert root.tag.endswith("svg")
    heat = heatmap_figure(breed_heatmap(sparsity, "encoder", "hoyer", labels=labels))
    save_figure(heat, tmp_path / "heat.svg")
    assert ET.parse(tmp_path / "heat.svg").getroot().tag.endswith("svg")
    assert heat.axes[0].images[0].get_array().shape == (8, 3)
    rel = heatmap_figure(breed_heatmap(sparsity, "encoder", "hoyer", labels=labels), relative=True)
    shown = rel.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown.mean(axis=1), 0.0, atol=1e-12)  # each layer centred on its mean
    save_figure(rel, tmp_path / "rel.png")
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        save_figure(fig, tmp_path / "curves.pdf")
    # Same figure, same bytes: no dates or version stamps in the files.
    save_figure(fig, tmp_path / "again.svg")
    assert (tmp_path / "again.svg").read_bytes() == (tmp_path / "curves.svg").read_bytes()


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    sparsity, labels = planted_groups(2, per_group=15, layers=10, shifted=(6, 7, 8, 9))
    labels = labels.assign(breed=labels["breed"].str.replace("breed_a", "german_shorthaired"))
    return make_store(tmp_path / "store", sparsity, labels)


def test_cli_export_writes_images_tests_and_figures(small_store: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli(["export", str(small_store), "--what", "images", "--format", "csv", "--out",
                str(out / "images.csv")]) == 0
    images = pd.read_csv(out / "images.csv")
    assert len(images) == 45 and {"id", "breed", "path"} <= set(images.columns)

    assert cli(["export", str(small_store), "--what", "sparsity-tests", "--format", "latex", "--out",
                str(out / "tests.tex"), "--label", "breed"]) == 0
    tex = (out / "tests.tex").read_text("utf-8")
    assert tex.startswith("\\begin{table}") and "p\\_adjusted" in tex and "\\bottomrule" in tex
    _, rows = _tabular_rows(tex)
    assert len(rows) == 10  # one row per layer
    expected = group_tests(Store.open(small_store), "encoder", "hoyer", "breed")
    assert [r[-2] for r in rows] == ["yes" if s else "no" for s in expected["significant"]]

    # Figure, format from the suffix.
    assert cli(["export", str(small_store), "--what", "sparsity-curves", "--out", str(out / "curves.png"),
                "--metric", "hoyer"]) == 0
    with Image.open(out / "curves.png") as im:
        im.verify()
    assert cli(["export", str(small_store), "--what", "sparsity-heatmap", "--format", "parquet", "--out",
                str(out / "heat.parquet")]) == 0
    heat = pd.read_parquet(out / "heat.parquet")
    assert heat.shape == (10, 4) and "german_shorthaired" in heat.columns
    assert cli(["export", str(small_store), "--what", "images", "--space", "encoder", "--out",
                str(out / "vectors.parquet")]) == 0
    assert np.stack(pd.read_parquet(out / "vectors.parquet")["encoder"].to_list()).shape == (45, 8)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--what", "images", "--format", "png"], "images --format png"),
    (["--what", "sparsity-tests", "--model", "vae"], "models: encoder"),
    (["--what", "sparsity-tests", "--label", "colour"], "no label column 'colour'"),
    (["--what", "images", "--out-suffix", ".xyz"], "cannot tell the format"),
])
def test_cli_export_user_errors_are_one_line_exit_2(small_store: Path, tmp_path: Path, args: list[str],
                                                    message: str, capsys: pytest.CaptureFixture[str]) -> None:
    suffix = ".csv"
    if "--out-suffix" in args:
        suffix = args[args.index("--out-suffix") + 1]
        args = args[: args.index("--out-suffix")]
    rc = cli(["export", str(small_store), *args, "--out", str(tmp_path / f"x{suffix}")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("mammals export: error:") and len(err.splitlines()) == 1
    assert message.split()[-1] in err
    assert not (tmp_path / f"x{suffix}").exists()


def test_cli_choices_match_the_exports_it_can_write() -> None:
    import argparse

    from analysis.export import EXPORTS
    from indexer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    what = next(a for a in sub.choices["export"]._actions if a.dest == "what")
    assert tuple(what.choices or ()) == tuple(EXPORTS)
