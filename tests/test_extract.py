"""indexer.extract: DataLoader decode workers die with their parent, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from indexer.extract import iter_batches
from tests.conftest import PETS, REPO, sample_photos
from tests.helpers_badfiles import make_bad_corpus

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")

# Runs iter_batches over real photos with two workers and a slow consumer; once the workers are up it prints
# "WORKERS <pid>:<starttime> ...": its children, found in /proc (ppid == this process).
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from indexer.extract import iter_batches

    def children():
        me, found = os.getpid(), []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == me:  # fields: state, ppid, ..., starttime is the 20th after ")"
                    found.append(f"{d}:{fields[19]}")
        return found

    def tensor(img):
        return torch.zeros(3, 4, 4)

    for i, batch in enumerate(iter_batches(sys.argv[1:], {"t": tensor}, batch_size=2, workers=2)):
        if i == 1:
            print("WORKERS", *children(), flush=True)
        time.sleep(1.0)  # a slow consumer: the workers sit on full queues or wait for work
    """
)


def _alive(pid: int, starttime: str) -> bool:
    """The same process (pid not reused) still exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == starttime and fields[0] not in ("Z", "X")


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or "" if none comes in time (the child is then killed)."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


@linux_only
def test_workers_die_when_the_parent_is_sigkilled() -> None:
    photos = [str(p) for p in sample_photos(40, step=17)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *photos], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = _read_line(proc, timeout=120)
        assert line.startswith("WORKERS"), f"no worker list from the child: {line!r}"
        workers = [tuple(w.split(":")) for w in line.split()[1:]]
        assert len(workers) == 2, line
        assert all(_alive(int(pid), start) for pid, start in workers)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 3.0  # torch's own watchdog would take >= 5 s, and not always
    while any(_alive(int(pid), start) for pid, start in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid, start in workers if _alive(int(pid), start)]
    for pid in left:  # do not leave them behind if the test fails
        os.kill(int(pid), signal.SIGKILL)
    assert not left, f"workers {left} outlived their SIGKILLed parent"


@linux_only
def test_die_with_parent_sets_the_signal_and_catches_an_already_dead_parent() -> None:
    # The parent is alive: the parent-death signal is set to SIGKILL and the process carries on.
    code = textwrap.dedent(
        """
        import ctypes, os
        from indexer.extract import die_with_parent
        die_with_parent(os.getppid())
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        print("alive", sig.value)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["alive", str(int(signal.SIGKILL))], done.stderr
    # The parent died before the signal was set (getppid() is no longer it): the worker kills itself at once.
    code = "from indexer.extract import die_with_parent; die_with_parent(-1); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "alive" not in done.stdout
    # No parent check requested (forkserver workers): only the signal is set.
    code = "from indexer.extract import die_with_parent; die_with_parent(None); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive"


def test_iter_batches_with_workers_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    bad = make_bad_corpus(tmp_path / "bad")
    photos = [str(p) for p in sample_photos(3)] if PETS.is_dir() else []
    chosen = ["pipe.jpg", "truncated.jpg", "loop_a.jpg", "empty.jpg"]
    paths = [*photos, *(str(tmp_path / "bad" / n) for n in chosen)]

    def tensor(img: object) -> torch.Tensor:
        return torch.zeros(3, 4, 4)

    results = [r for b in iter_batches(paths, {"t": tensor}, batch_size=3, workers=2) for r in b.results]
    assert [r.index for r in results] == list(range(len(paths)))
    assert [r.status for r in results] == ["ok"] * len(photos) + ["error"] * len(chosen)
    for r, name in zip(results[len(photos) :], chosen, strict=True):
        assert bad[name].lower() in r.reason.lower(), (name, r.reason)
