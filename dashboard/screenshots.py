"""Screenshots of every dashboard page, taken in headless Chromium: ``python -m dashboard.screenshots STORE``.

Starts ``mammals dashboard STORE`` on a free local port, opens each page (``/overview``, ``/map``, …) with
Playwright's Python API driving the system Chromium (``/usr/bin/chromium``; Playwright's own browser download is
never used), waits until Streamlit has finished the page's script and its plots have drawn, and saves
``docs/screenshots/<page>.png``.  ``tests/test_dashboard_browser.py`` drives the app through the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dashboard.app import PAGES, PageSpec

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# The first page that computes a UMAP in a fresh server compiles numba (~45 s on an idle 2-core CPU, far more
# on a busy one); later pages hit the caches.
PAGE_TIMEOUT_S = 600.0

# Selectors of Streamlit's DOM (stable data-testids used by Streamlit's own end-to-end tests).
APP_IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
ERROR_BOXES = '[data-testid="stException"], [data-testid="stAlertContentError"]'
PLOTS = '[data-testid="stPlotlyChart"]'
SCATTER = 'iframe[title*="mammals_scatter"]'  # dashboard.components.scatter_map


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks; tiny race before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mammals_command() -> list[str]:
    """`mammals` of this interpreter's environment (the console script, else the same entry point via -c)."""
    script = Path(sys.executable).with_name("mammals")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from indexer.cli import main; sys.exit(main())"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve(store: Path, *, port: int | None = None, log: Path | None = None,
          startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run `mammals dashboard STORE --port P` (bound to 127.0.0.1) until the block ends; yields its URL.

    The server's output goes to ``log`` (when given) so a failing test can show it.  On exit the server gets
    SIGTERM (which `mammals dashboard` forwards to streamlit), then SIGKILL if it has not stopped in 20 s.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([*mammals_command(), "dashboard", str(store), "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"`mammals dashboard` exited with code {proc.returncode} before serving"
                                   + (f" (log: {log})" if log else ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dashboard did not answer on {url} within {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log and not isinstance(out, int):
            out.close()


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """A headless system Chromium driven by Playwright (``playwright install`` is never needed)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise FileNotFoundError(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser_: Any, url: str, *, timeout_s: float = PAGE_TIMEOUT_S, viewport: dict[str, int] | None = None,
              console: list[str] | None = None) -> Any:
    """Load one page of the app and wait until its script has run and every plotly chart has drawn.

    Every request to anything but the app itself is refused (the dashboard must work offline), and browser
    console errors, page errors and refused requests are appended to ``console`` when given."""
    page = browser_.new_page(viewport=viewport or VIEWPORT)
    origin = "/".join(url.split("/")[:3])

    def route(r: Any) -> None:
        target = r.request.url
        if target.startswith((origin, "data:", "blob:")):
            r.continue_()
        else:
            if console is not None:
                console.append(f"refused request to {target}")
            r.abort()

    page.route("**/*", route)
    if console is not None:
        page.on("console", lambda m: console.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(f"page error: {e}"))
        page.on("response", lambda r: console.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    wait_until_idle(page, timeout_s=timeout_s)
    return page


def wait_until_idle(page: Any, *, timeout_s: float = PAGE_TIMEOUT_S) -> None:
    """Wait for the script run to finish (Streamlit marks the app element), then for plotly to draw."""
    page.wait_for_selector(APP_IDLE, timeout=timeout_s * 1000)
    charts = page.locator(PLOTS).count()
    for i in range(charts):
        # A plotly chart has drawn once its main SVG exists; WebGL traces also have a canvas.
        page.locator(PLOTS).nth(i).locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
    if page.locator(SCATTER).count():  # the map's own scatter component draws inside its iframe
        page.frame_locator(SCATTER).first.locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
    # Thumbnails and fonts load after the script finishes; let the page settle before measuring or capturing.
    with contextlib.suppress(Exception):
        page.wait_for_load_state("networkidle", timeout=15_000)
    # Every image of this run loaded (or failed, which the console shows), including lazy ones out of view: a
    # thumbnail still loading when the next run replaces it asks for a media file Streamlit has already dropped,
    # a 404 in the console that says nothing about the page (seen once in CI, after leaving the Map page).
    page.evaluate(_LOAD_ALL_IMAGES)
    page.wait_for_function(_IMAGES_DONE, timeout=60_000)
    page.wait_for_timeout(1_000)


_LOAD_ALL_IMAGES = "() => document.querySelectorAll('img[loading=\"lazy\"]').forEach(i => { i.loading = 'eager'; })"
_IMAGES_DONE = "() => Array.from(document.images).every(i => i.complete)"


def scatter_frame(page: Any) -> Any:
    """The map's scatter component (plotly.js in its own iframe) as a Playwright frame."""
    return page.locator(SCATTER).first.element_handle().content_frame()


# The point farthest (in pixels) from every other point of the map, so that hovering it can only mean it.
_LONELY_POINT = """() => {
  const gd = document.getElementById("plot"), fl = gd._fullLayout, px = [];
  gd._fullData.forEach((t, c) => t.x.forEach((x, i) => px.push(
      [c, i, fl.xaxis.l2p(x) + fl._size.l, fl.yaxis.l2p(t.y[i]) + fl._size.t])));
  let best = null, bestD = -1;
  for (const p of px) {
    let d = Infinity;
    for (const q of px) { if (q !== p) { d = Math.min(d, Math.hypot(p[2] - q[2], p[3] - q[3])); } }
    if (d > bestD) { bestD = d; best = p; }
  }
  return {curve: best[0], index: best[1], x: best[2], y: best[3], id: args.points[best[0]].ids[best[1]],
          cell: args.points[best[0]].cell[best[1]], cols: args.sprite.cols};
}"""


def hover_lonely_point(page: Any) -> dict[str, Any]:
    """Move the mouse onto the map point farthest from the others; returns that point (its id, sprite cell,
    trace and index, and ``page_x``/``page_y``, where it lies on the page)."""
    point: dict[str, Any] = scatter_frame(page).evaluate(_LONELY_POINT)
    box = page.locator(SCATTER).first.bounding_box()
    point["page_x"], point["page_y"] = box["x"] + point["x"], box["y"] + point["y"]
    page.mouse.move(point["page_x"], point["page_y"])
    return point


def error_texts(page: Any) -> list[str]:
    """Text of every Streamlit exception or error box on the page, and of a "Page not found" dialog."""
    texts = [str(t) for t in page.locator(ERROR_BOXES).all_inner_texts()]
    if page.get_by_text("Page not found").count():
        texts.append("Page not found (a URL that no st.Page has)")
    return texts


def page_url(base: str, spec: PageSpec) -> str:
    """A page's URL (every page has its own; the root forwards to the first, see dashboard.app.main)."""
    return f"{base}/{spec.url_path}"


def capture_all(store: Path, out_dir: Path = OUT_DIR, *, pages: list[str] | None = None,
                log: Path | None = None) -> dict[str, Path]:
    """Screenshot each page (default: all) into ``out_dir/<page>.png``; raises if a page shows an error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in PAGES if pages is None or p.module in pages]
    shots: dict[str, Path] = {}
    with serve(store, log=log) as url, browser() as b:
        for spec in wanted:
            t0 = time.monotonic()
            page = open_page(b, page_url(url, spec))
            errors = error_texts(page)
            if spec.module == "map":  # show the hover card, the map's way of showing its photos
                hover_lonely_point(page)
                scatter_frame(page).locator("#card").wait_for(state="visible", timeout=10_000)
            path = out_dir / f"{spec.module}.png"
            page.screenshot(path=str(path), full_page=False)
            page.close()
            print(f"{spec.module:<10} {time.monotonic() - t0:6.1f} s  {path}", file=sys.stderr)
            if errors:
                raise RuntimeError(f"page {spec.module!r} shows an error: {errors[0][:500]}")
            shots[spec.module] = path
    return shots


def main(argv: list[str] | None = None) -> int:
    from indexer.cli import add_common_options, run_main

    p = argparse.ArgumentParser(prog="python -m dashboard.screenshots", description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder for the PNGs (default {OUT_DIR})")
    p.add_argument("--page", action="append", choices=[s.module for s in PAGES], help="only these pages")
    p.add_argument("--log", type=Path, help="write the server's output here")

    def run(a: argparse.Namespace) -> int:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        capture_all(a.store, a.out, pages=a.page, log=a.log)
        return 0

    return run_main(p.prog, p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
