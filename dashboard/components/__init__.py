"""Custom Streamlit components of the dashboard (plain HTML and JavaScript in this folder; no build step).

``scatter_map``: the map's plotly scatter with a hover card (thumbnail, breed, species, cluster) and clicks and
box/lasso selections reported back.  Its frontend is ``scatter/index.html``; plotly.js is the copy that the
installed ``plotly`` package ships, copied once into a cache folder (``~/.cache/mammals``) beside ``index.html``
(Streamlit serves a component's files from one folder and refuses symlinks that leave it), so the browser
fetches nothing from any network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from PIL import Image

HERE = Path(__file__).resolve().parent
SPRITE_CELL = 64  # px per thumbnail in the sprite sheet; the hover card shows it at 112 px


class TracePoints(TypedDict):
    """What the hover card and the events need about each point of one trace, in point order."""

    ids: list[str]
    card: list[str]  # HTML lines of the hover card (escaped by the caller)
    cell: list[int]  # the point's cell in the sprite sheet, -1 for none


def _frontend_dir() -> Path:
    """``scatter/index.html`` and plotly.js together in one folder (made once per version of either)."""
    import plotly

    html = (HERE / "scatter" / "index.html").read_bytes()
    js = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    tag = hashlib.sha256(html + plotly.__version__.encode()).hexdigest()[:12]
    # The user's own cache, not the shared temp folder, where another user could plant a folder of that name.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mammals"
    target = cache / f"scatter-{tag}"
    if not (target / "plotly.min.js").is_file() or not (target / "index.html").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".scatter-", dir=cache))
        shutil.copyfile(js, tmp / "plotly.min.js")
        (tmp / "index.html").write_bytes(html)
        try:
            tmp.rename(target)  # atomic: another process may have made it meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_COMPONENT: Any = None


def _component() -> Any:
    global _COMPONENT
    if _COMPONENT is None:
        from streamlit.components import v1 as components

        _COMPONENT = components.declare_component("mammals_scatter", path=str(_frontend_dir()))
    return _COMPONENT


def sprite_sheet(images: Sequence[Image.Image | None], cell: int = SPRITE_CELL) -> dict[str, Any]:
    """One JPEG holding every image (``cell`` x ``cell`` squares, e.g. ``analysis.photos.square_thumbnail``; None
    leaves a grey cell), row by row, as a data URL: the browser receives the thumbnails of a whole map at once,
    so hovering a point needs no request."""
    cols = max(1, int(len(images) ** 0.5 + 0.999))
    rows = max(1, (len(images) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), (238, 238, 238))
    for i, img in enumerate(images):
        if img is not None:
            sheet.paste(img if img.size == (cell, cell) else img.resize((cell, cell)),
                        ((i % cols) * cell, (i // cols) * cell))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=80)
    return {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), "cell": cell,
            "cols": cols}


def scatter_map(figure: dict[str, Any], points: list[TracePoints], *, sprite: dict[str, Any] | None,
                state: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """Draw ``figure`` (a plotly figure as a dict) with hover cards; returns ``{"clicked": id | None,
    "selected": [ids], "events": n}`` after the user clicks or selects, else the last such value (or None)."""
    value: dict[str, Any] | None = _component()(figure=figure, points=points, sprite=sprite, state=state, key=key,
                                                default=None)
    return value
