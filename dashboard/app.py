"""The dashboard's entry script: ``streamlit run dashboard/app.py -- --store STORE`` (``mammals dashboard STORE``).

One ``st.Page`` per module of ``dashboard.views``; each page's ``render()`` does the rest.  The store comes from
``--store`` after streamlit's ``--`` or from ``$MAMMALS_STORE`` (see ``dashboard.state.current_key``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import streamlit as st
from PIL import Image, ImageDraw


class PageSpec(NamedTuple):
    """A page: its module under ``dashboard.views``, its title, icon and URL path."""

    module: str
    title: str
    icon: str
    url_path: str


PAGES: tuple[PageSpec, ...] = (
    PageSpec("overview", "Overview", ":material/dashboard:", "overview"),
    PageSpec("map", "Map", ":material/scatter_plot:", "map"),
    PageSpec("clusters", "Clusters", ":material/bubble_chart:", "clusters"),
    PageSpec("query", "Query", ":material/image_search:", "query"),
    PageSpec("sparsity", "Sparsity", ":material/stacked_line_chart:", "sparsity"),
    PageSpec("latent", "Latent explorer", ":material/linear_scale:", "latent"),
    PageSpec("quality", "Data quality", ":material/rule:", "quality"),
    PageSpec("export", "Export", ":material/download:", "export"),
)


def page_renderer(name: str) -> Callable[[], None]:
    """The ``render`` function of ``dashboard.views.<name>``."""
    render: Callable[[], None] = importlib.import_module(f"dashboard.views.{name}").render
    return render


@functools.cache
def page_icon() -> Image.Image:
    """The app's icon, a paw, drawn here: a ``:material/...:`` page icon makes the browser fetch an SVG from
    Google's font CDN for the favicon, which fails (and logs an error) wherever the dashboard runs offline."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    colour = (255, 75, 75, 255)
    draw.ellipse((16, 30, 48, 58), fill=colour)  # the pad
    for x, y in ((6, 20), (19, 7), (35, 7), (48, 20)):  # the toes
        draw.ellipse((x, y, x + 11, y + 14), fill=colour)
    return img


def configure() -> None:
    st.set_page_config(page_title="Mammals Space", page_icon=page_icon(), layout="wide")


def render_page(name: str) -> None:
    """Draw one page on its own (what ``AppTest`` drives: ``st.navigation``'s callable pages cannot be switched
    to from a test, see tests/test_dashboard.py)."""
    configure()
    page_renderer(name)()


# Where main() leaves this run's st.Page objects, so that a page can send the user to another one.  Session state,
# not a module global: Streamlit runs this file as __main__, a different module from the dashboard.app a page
# imports.
PAGES_STATE = "_mammals_pages"


def switch_to(module: str) -> None:
    """Go to the page of ``dashboard.views.<module>`` (nothing when the page runs alone, as under AppTest)."""
    target = st.session_state.get(PAGES_STATE, {}).get(module)
    if target is not None:
        st.switch_page(target)


def main() -> None:
    """Every page at its own URL (``/overview``, ``/map``, ...), the root forwarding to the first.

    Streamlit serves its default page at the root only (a link to ``/overview`` would say "page not found"),
    so the default is an invisible landing page that switches to Overview, and the sidebar lists the real pages
    with ``st.page_link`` (``st.navigation``'s own menu would list the landing page too)."""
    configure()
    pages = [st.Page(page_renderer(p.module), title=p.title, icon=p.icon, url_path=p.url_path) for p in PAGES]
    st.session_state[PAGES_STATE] = {spec.module: page for spec, page in zip(PAGES, pages, strict=True)}

    def landing() -> None:
        st.switch_page(pages[0])

    current = st.navigation([st.Page(landing, title="Mammals Space", url_path="start", default=True), *pages],
                            position="hidden")
    with st.sidebar:
        for page in pages:
            st.page_link(page)
    current.run()


if __name__ == "__main__":  # streamlit runs this file as __main__; importing it (tests) draws nothing
    main()
