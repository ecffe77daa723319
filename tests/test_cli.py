"""The command line as a whole: subcommands found through entry points, conventions shared by all of them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.cli import ENTRY_POINT_GROUP, Command, build_parser, commands, main

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {"index", "info", "verify", "migrate", "train", "query", "map", "export", "dashboard", "data", "serve",
            "quality"}


def test_every_subcommand_comes_from_an_entry_point() -> None:
    found = commands()
    assert set(found) == EXPECTED
    assert all(isinstance(c, Command) and c.name == n for n, c in found.items())
    # Each package registers its own: the entry point's module lives with the code it drives.
    from importlib.metadata import entry_points

    where = {ep.name: ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert where["train"].startswith("analysis.") and where["dashboard"].startswith("dashboard.")
    assert where["data"].startswith("data.") and where["index"].startswith("indexer.")


def test_help_lists_every_command_and_builds_without_heavy_imports() -> None:
    # `mammals train --help` reads the models' config dataclasses without importing torch (indexer/lazy.py);
    # torch, the store, FAISS, UMAP and Streamlit wait until a command runs.
    heavy = ("torch", "faiss", "deltalake", "umap", "streamlit", "pooch")
    code = ("import sys; from indexer.cli import build_parser; build_parser(); "
            f"print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"building the parser imported {out.stdout.strip()}"
    text = build_parser().format_help()
    for name in EXPECTED:
        assert f"    {name}" in text


@pytest.mark.parametrize("model", ["mapper", "vae"])
def test_train_help_documents_every_config_field(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    from indexer.models.config_docs import field_docs
    from indexer.models.mapper import MapperConfig
    from indexer.models.vae import VAEConfig

    cls = {"mapper": MapperConfig, "vae": VAEConfig}[model]
    with pytest.raises(SystemExit) as exit_:
        main(["train", model, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert f"--{f.name.replace('_', '-')}" in text
        # The first words of the docstring, as argparse prints them (% is doubled for argparse and printed once).
        assert " ".join(docs[f.name].split()[:4]) in text, f.name


def test_user_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "no-store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mammals info: error: ")
