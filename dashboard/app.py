"""The dashboard's entry script: ``streamlit run dashboard/app.py -- --store STORE`` (``mammals dashboard STORE``).

One ``st.Page`` per module of ``dashboard.views``; each page's ``render()`` does the rest.  The store comes from
``--store`` after streamlit's ``--`` or from ``$MAMMALS_STORE`` (see ``dashboard.state.current_key``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import streamlit as st


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
    PageSpec("export", "Export", ":material/download:", "export"),
)


def page_renderer(name: str) -> Callable[[], None]:
    """The ``render`` function of ``dashboard.views.<name>``."""
    render: Callable[[], None] = importlib.import_module(f"dashboard.views.{name}").render
    return render


def configure() -> None:
    st.set_page_config(page_title="Mammals Space", page_icon=":material/pets:", layout="wide")


def render_page(name: str) -> None:
    """Draw one page on its own (what ``AppTest`` drives: ``st.navigation``'s callable pages cannot be switched
    to from a test, see tests/test_dashboard.py)."""
    configure()
    page_renderer(name)()


def main() -> None:
    configure()
    pages = [st.Page(page_renderer(p.module), title=p.title, icon=p.icon, url_path=p.url_path,
                     default=i == 0) for i, p in enumerate(PAGES)]
    st.navigation(pages).run()


if __name__ == "__main__":  # streamlit runs this file as __main__; importing it (tests) draws nothing
    main()
