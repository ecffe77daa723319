"""Saving and loading a trained model's folder: ``<name>.safetensors`` (weights) + ``<name>.json`` (metadata).

One place for what the mapper and the VAE share: the write order (weights first, then the JSON that names their
sha256, both atomic), and on load the checks, in the order that gives the most useful message first: files
present, JSON readable and of this format and version, tensors present with the shapes the metadata needs, and
last the sha256, which catches same-shaped weights from another run.  Only safetensors are read (no pickles).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from indexer.store.atomic import atomic_write, atomic_write_json
from indexer.store.hashing import file_sha256


@dataclass(frozen=True)
class CheckpointFormat:
    """The file names and format tag of one model kind; ``error`` is the exception its loader raises."""

    format: str  # e.g. "mammals-space-mapper"
    version: int
    weights_file: str
    meta_file: str
    error: type[Exception]
    what: str  # "mapper", "VAE": used in "not a saved <what> directory?"


def save_checkpoint(fmt: CheckpointFormat, directory: Path, state: Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write the weights, then the JSON (``format``, ``format_version``, ``weights``, ``sha256``, ``torch`` and
    ``meta``), each atomically: a reader that finds the JSON finds the weights it describes.

    Returns ``{"sha256": <weights sha256>, "weights": path, "meta": path}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / fmt.weights_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": fmt.format}))
    digest = file_sha256(weights)
    record = {"format": fmt.format, "format_version": fmt.version, "weights": fmt.weights_file, "sha256": digest,
              "torch": torch.__version__, **meta}
    atomic_write_json(directory / fmt.meta_file, record)
    return {"sha256": digest, "weights": str(weights), "meta": str(directory / fmt.meta_file)}


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: the JSON and the raw tensors, not yet checked against a model."""

    fmt: CheckpointFormat
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    weights: Path
    meta_path: Path

    def load_into(self, expected: Mapping[str, torch.Tensor], needs: str) -> None:
        """Check the tensors against ``expected`` (a fresh model's state dict: names and shapes) and the sha256.

        ``needs`` says what dictates the shapes, for the message: "the config", "mapper.json (input_dim 1280, …)".
        Raises ``fmt.error`` naming the first tensor that is missing, unexpected or of another shape.
        """
        err = self.fmt.error
        missing = sorted(set(expected) - set(self.state))
        unexpected = sorted(set(self.state) - set(expected))
        if missing or unexpected:
            raise err(f"{self.weights}: tensors do not match {needs}: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
        for name, tensor in expected.items():
            if tuple(self.state[name].shape) != tuple(tensor.shape):
                raise err(f"{self.weights}: {name} has shape {tuple(self.state[name].shape)}, {needs} needs "
                          f"{tuple(tensor.shape)}")
        # Shapes first, then the hash: a shape error says what is wrong; the hash catches same-shaped swaps.
        if self.meta.get("sha256") and file_sha256(self.weights) != self.meta["sha256"]:
            raise err(f"{self.weights}: sha256 differs from the one in {self.fmt.meta_file} "
                      "(weights from another run?)")


def read_checkpoint(fmt: CheckpointFormat, directory: Path) -> Checkpoint:
    """Read a folder written by :func:`save_checkpoint`; raises ``fmt.error`` with one line on any problem."""
    directory = Path(directory)
    meta_path, weights = directory / fmt.meta_file, directory / fmt.weights_file
    for p in (meta_path, weights):
        if not p.is_file():
            raise fmt.error(f"{p}: missing (not a saved {fmt.what} directory?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise fmt.error(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt.format:
        raise fmt.error(f"{meta_path}: not a {fmt.format} file")
    if meta.get("format_version") != fmt.version:
        raise fmt.error(f"{meta_path}: format version {meta.get('format_version')}, this code reads {fmt.version}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise fmt.error(f"{weights}: not a readable safetensors file ({e})") from None
    return Checkpoint(fmt, meta, state, weights, meta_path)
