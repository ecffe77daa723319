"""The dashboard in a real browser: `mammals dashboard STORE` serving headless Chromium (Playwright, system
Chromium at /usr/bin/chromium; `playwright install` is never run).  Skipped only when that binary is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dashboard.screenshots import CHROMIUM, PLOTS, browser, error_texts, open_page, serve, wait_until_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
]


def _lasso_left_half(page: Any) -> None:
    """Drag a lasso around the left half of the map's plot area (plotly's default drag mode there is lasso)."""
    box = page.locator(f"{PLOTS} .nsewdrag").first.bounding_box()
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    corners = [(0.05, 0.05), (0.5, 0.05), (0.5, 0.95), (0.05, 0.95), (0.05, 0.06)]
    page.mouse.move(x0 + w * corners[0][0], y0 + h * corners[0][1])
    page.mouse.down()
    for fx, fy in corners[1:]:
        page.mouse.move(x0 + w * fx, y0 + h * fy, steps=10)
    page.mouse.up()


def test_map_page_renders_in_chromium(pets_store_full: Path, tmp_path: Path) -> None:
    """The map draws (WebGL), shows no error, and a lasso selection brings up its photos and a download."""
    log = tmp_path / "server.log"
    with serve(pets_store_full, log=log) as url, browser() as b:
        page = open_page(b, f"{url}/map")
        try:
            plot = page.locator(PLOTS).first
            plot.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            # Scattergl draws into WebGL canvases inside the plot.
            plot.locator("canvas").first.wait_for(state="attached", timeout=120_000)
            assert page.locator(PLOTS).count() == 1
            assert error_texts(page) == []
            assert page.get_by_text("Drag a box or a lasso").count() == 1
            _lasso_left_half(page)
            # The selection reruns the page: thumbnails of the selected photos and a CSV download appear.
            page.get_by_text("Selection:").first.wait_for(timeout=300_000)
            wait_until_idle(page)
            assert error_texts(page) == []
            assert page.locator('[data-testid="stDownloadButton"]').filter(has_text="selection").count() == 1
            assert page.locator('[data-testid="stImage"], [data-testid="stImageContainer"] img').count() > 0
        finally:
            page.screenshot(path=str(tmp_path / "map.png"))
            page.close()
    assert (tmp_path / "map.png").stat().st_size > 10_000, log.read_text(errors="replace")[-2000:]
