"""The dashboard in a real browser: `mammals dashboard STORE` serving headless Chromium (Playwright, system
Chromium at /usr/bin/chromium; `playwright install` is never run).  Skipped only when that binary is missing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dashboard.app import PAGES
from dashboard.screenshots import (
    CHROMIUM,
    browser,
    error_texts,
    hover_lonely_point,
    open_page,
    scatter_frame,
    serve,
    wait_until_idle,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
]


def goto_page(page: Any, title: str) -> None:
    """Follow the sidebar link of a page and wait for it to finish drawing."""
    page.locator('[data-testid="stSidebar"] a').filter(has_text=title).first.click()
    page.wait_for_timeout(500)  # let the rerun start before waiting for the idle state
    wait_until_idle(page)


def _lasso_left_half(page: Any) -> None:
    """Drag a lasso around the left half of the map's plot area (its default drag mode is lasso)."""
    box = scatter_frame(page).locator(".nsewdrag").first.bounding_box()  # page coordinates
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    corners = [(0.05, 0.05), (0.5, 0.05), (0.5, 0.95), (0.05, 0.95), (0.05, 0.06)]
    page.mouse.move(x0 + w * corners[0][0], y0 + h * corners[0][1])
    page.mouse.down()
    for fx, fy in corners[1:]:
        page.mouse.move(x0 + w * fx, y0 + h * fy, steps=10)
    page.mouse.up()




def test_map_hover_shows_the_photo_and_click_shows_its_neighbours(pets_store_full: Path, tmp_path: Path) -> None:
    """Hovering a point shows the card of that photo (its own cell of the thumbnail sheet); clicking it brings
    its nearest photos and breed vote beside the map; a lasso selection lists the photos and offers a download.
    Nothing but the app is reachable from the browser, and the console stays free of errors."""
    log, console = tmp_path / "server.log", list[str]()
    with serve(pets_store_full, log=log) as url, browser() as b:
        page = open_page(b, url, console=console)
        try:
            goto_page(page, "Map")
            assert error_texts(page) == []
            frame = scatter_frame(page)
            frame.locator("canvas").first.wait_for(state="attached", timeout=120_000)
            point = hover_lonely_point(page)
            card = frame.locator("#card")
            card.wait_for(state="visible", timeout=10_000)
            assert card.get_attribute("data-id") == point["id"]
            style = frame.evaluate("() => getComputedStyle(document.querySelector('#card .thumb')).cssText || "
                                   "document.querySelector('#card .thumb').style.cssText")
            assert "data:image/jpeg" in style
            side = 112
            expected = f"{-(point['cell'] % point['cols']) * side}px {-(point['cell'] // point['cols']) * side}px"
            assert frame.evaluate("() => document.querySelector('#card .thumb').style.backgroundPosition"
                                  ).replace("-0px", "0px") == expected.replace("-0px", "0px")
            page.screenshot(path=str(tmp_path / "hover.png"))

            page.mouse.click(point["page_x"], point["page_y"])
            page.get_by_text(re.compile(r"^\d+ nearest photos")).first.wait_for(timeout=300_000)
            wait_until_idle(page)
            assert error_texts(page) == []
            assert page.locator('[data-testid="stImage"], [data-testid="stImageContainer"] img').count() >= 9

            _lasso_left_half(page)
            page.get_by_text("Selection:").first.wait_for(timeout=300_000)
            wait_until_idle(page)
            assert error_texts(page) == []
            assert page.locator('[data-testid="stDownloadButton"]').filter(has_text="selection").count() == 1
            page.screenshot(path=str(tmp_path / "map.png"))

            # The clicked photo goes to the Query page, picked there.
            page.get_by_role("button", name="Query this photo").click()
            page.locator("h1").filter(has_text="Query").first.wait_for(timeout=120_000)
            wait_until_idle(page)
            assert error_texts(page) == []
            assert page.get_by_text(re.compile(r"^Nearest \d+ in")).count() == 1
        finally:
            page.screenshot(path=str(tmp_path / "last.png"))
            page.close()
    assert console == [], console
    assert (tmp_path / "map.png").stat().st_size > 10_000, log.read_text(errors="replace")[-2000:]


def test_every_page_loads_offline_without_console_errors(pets_store_full: Path, tmp_path: Path) -> None:
    """Each page reached as a user does (the app's root, then its link in the sidebar) with every request to
    anything but the app refused; then each page's own URL, which must find its page."""
    console: list[str] = []
    with serve(pets_store_full, log=tmp_path / "server.log") as url, browser() as b:
        page = open_page(b, url, console=console)
        try:
            for spec in PAGES:
                goto_page(page, spec.title)
                assert error_texts(page) == [], spec.module
                assert console == [], (spec.module, console)
        finally:
            page.close()
        for spec in PAGES:  # deep links (Streamlit's own probing of base paths may log 404s here: not asserted)
            page = open_page(b, f"{url}/{spec.url_path}")
            try:
                assert error_texts(page) == [], spec.module
                heading = {"overview": "Mammals Space", "sparsity": "Activation sparsity"}.get(spec.module, spec.title)
                assert page.locator("h1").first.inner_text().strip() == heading, spec.module
            finally:
                page.close()


def test_narrow_window_collapses_the_sidebar(pets_store_full: Path, tmp_path: Path) -> None:
    with serve(pets_store_full, log=tmp_path / "server.log") as url, browser() as b:
        page = open_page(b, f"{url}/clusters", viewport={"width": 800, "height": 900})
        try:
            assert page.locator('[data-testid="stSidebar"][aria-expanded="true"]').count() == 0
            page.screenshot(path=str(tmp_path / "narrow.png"))
        finally:
            page.close()
