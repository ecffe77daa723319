"""`mammals dashboard STORE [--port N] [--host H]`: serve the Streamlit dashboard of one store.

Streamlit runs as a child process (``python -m streamlit run dashboard/app.py ...``) rather than in-process:
its server owns the event loop and its own signal handling, and a child keeps `mammals` a thin launcher.  The
launcher forwards SIGINT/SIGTERM/SIGHUP to the child and exits with the child's exit code.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from dashboard.settings import MAX_UPLOAD_MB
from indexer.cli import Command
from indexer.errors import UsageError

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"  # local only: the app serves the store's photos, so exposing it is an explicit choice
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def streamlit_command(store: Path, *, port: int, host: str) -> list[str]:
    """The child's argv: headless, no usage statistics, the store after ``--``.

    Also: no file watching (nothing to reload in a served app, and a polling watcher costs CPU), the server's
    upload limit at the Query page's 20 MB (so the server refuses bigger bodies, not only the widget), and
    the viewer toolbar (no "Deploy" button on a local research tool).
    """
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port),
        "--server.address", host,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.maxUploadSize", str(MAX_UPLOAD_MB),
        "--client.toolbarMode", "viewer",
        "--browser.gatherUsageStats", "false",
        "--", "--store", str(store),
    ]


def run_dashboard(store: Path, *, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> int:
    """Start the dashboard and wait for it; returns streamlit's exit code (128 + signal when it was killed)."""
    from indexer.store import Store

    store = store.expanduser().resolve()
    Store.open(store)  # fail here, with one line, rather than inside the browser
    child = subprocess.Popen(streamlit_command(store, port=port, host=host))

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # only if a handler was not installed in time; keep waiting for the child
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def _conf(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE", help="the store to explore")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for every interface)")


def _run(a: argparse.Namespace) -> int:
    if not 0 < a.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {a.port}")
    return run_dashboard(a.store, port=a.port, host=a.host)


DASHBOARD = Command("dashboard", "explore a store in the browser (Streamlit)", _conf, _run)
