"""`mammals data list|show|download`: the dataset registry on the command line (placeholder; being rewritten)."""

from __future__ import annotations

import argparse

from indexer.cli import Command


def _conf(p: argparse.ArgumentParser) -> None:
    from data.registry import build_parser as _unused  # noqa: F401


def _run(a: argparse.Namespace) -> int:
    return 0


DATA = Command("data", "list and download the public cat and dog datasets", _conf, _run)
