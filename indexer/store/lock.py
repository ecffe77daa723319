"""One writer at a time: an OS file lock on ``STORE/.lock`` plus a note of who holds it.

The lock is ``flock``-based (the ``filelock`` package), so the kernel releases it when the holder dies, even by
SIGKILL: a crashed run never leaves a store locked.  Readers never take it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from indexer.store import schema


class StoreLockedError(RuntimeError):
    """Another process is writing the store (one line naming it)."""


class WriterLock:
    """The store's writer lock, held from ``acquire`` until ``release`` (or the process ends)."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self._lock = FileLock(str(self.store / schema.LOCK), mode=0o666)
        self.held = False

    def holder(self) -> dict[str, Any]:
        """Who wrote the lock note last (may be stale when nobody holds the lock)."""
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((self.store / schema.LOCK_INFO).read_text("utf-8"))
            if isinstance(info, dict):
                return info
        return {}

    def describe_holder(self) -> str:
        h = self.holder()
        if not h:
            return "another process"
        return f"PID {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}"

    def acquire(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Take the lock; without ``wait`` a held lock raises at once with who holds it."""
        self.store.mkdir(parents=True, exist_ok=True)
        try:
            if wait:
                self._lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=0.2)
            else:
                self._lock.acquire(timeout=0)
        except Timeout:
            raise StoreLockedError(
                f"{self.store}: store is being written by {self.describe_holder()} "
                f"(use --wait to wait for it)") from None
        self.held = True
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        # Written in place (not renamed): only the holder writes it, and readers treat it as advisory.
        with contextlib.suppress(OSError):
            (self.store / schema.LOCK_INFO).write_text(json.dumps(note) + "\n", "utf-8")

    def release(self) -> None:
        if self.held:
            self.held = False
            self._lock.release(force=True)

    def __enter__(self) -> WriterLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
