"""Torch settings for the length of a block, then the caller's again: eval mode, thread count, determinism.

The mapper and the VAE train and infer under these; each is a process-wide or per-model setting that a library
call must not leave changed behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import torch
from torch import nn

_T = TypeVar("_T")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block, then the model's previous mode again."""
    was_training = model.training
    if not any(m.training for m in model.modules()):
        # Already in eval mode throughout (the indexer's models, batch after batch): setting and restoring the
        # mode walks every submodule twice, for nothing.
        with torch.no_grad():
            yield
        return
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _setting(get: Callable[[], _T], set_: Callable[[_T], object], value: _T) -> Iterator[None]:
    """``set_(value)`` for the block, then ``set_`` back to what ``get`` said before."""
    was = get()
    set_(value)
    try:
        yield
    finally:
        set_(was)


def num_threads(n: int) -> AbstractContextManager[None]:
    """``torch.set_num_threads(n)`` for the block (a process-wide setting: given back afterwards)."""
    return _setting(torch.get_num_threads, torch.set_num_threads, n)


def deterministic() -> AbstractContextManager[None]:
    """Deterministic kernels for the block, restoring the caller's setting afterwards."""
    return _setting(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, True)
