"""The dashboard's pages under Streamlit's ``AppTest`` (no browser), against the real pets stores.

How AppTest is driven
---------------------
``dashboard/app.py`` builds its pages with ``st.navigation`` from callables (each page module's ``render``).
``AppTest.switch_page`` only resolves *file* pages, so a callable page cannot be switched to from a test.
So:

* ``AppTest.from_file("dashboard/app.py")`` runs the real entry script, which lands on the default page
  (Overview): this checks the navigation and the page registry;
* every page is then run on its own through ``AppTest.from_function(_page_script, args=(name,))``, a two-line
  script calling ``dashboard.app.render_page(name)`` (the same ``set_page_config`` + ``render()`` the
  navigation runs).

The store reaches the app through ``$MAMMALS_STORE`` (``mammals dashboard`` passes ``--store`` instead).
All tests share one process, so the first UMAP's numba compilation (~45 s) and Streamlit's caches
(``st.cache_data``/``st.cache_resource`` are process-wide) are paid once: the map page runs first.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import PETS, REPO, sample_photos

APP = REPO / "dashboard" / "app.py"
# Generous: the first map compiles numba, and the CPU may be shared with other test runs.
TIMEOUT_S = 900


def _page_script(name: str) -> None:
    from dashboard.app import render_page

    render_page(name)


def page(name: str, store: Path, monkeypatch: pytest.MonkeyPatch, **state: Any) -> AppTest:
    """One page as an AppTest, run once; ``state`` pre-sets widget values by key."""
    monkeypatch.setenv("MAMMALS_STORE", str(store))
    at = AppTest.from_function(_page_script, args=(name,), default_timeout=TIMEOUT_S)
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def plotly_specs(at: AppTest) -> list[str]:
    return [el.proto.spec for el in at.get("plotly_chart")]


def images(at: AppTest) -> list[Any]:
    return list(at.image)


def table_with(at: AppTest, *columns: str) -> Any:
    """The first dataframe shown with all these columns (display dataframes carry no key to find them by)."""
    for df in at.dataframe:
        if set(columns) <= set(df.value.columns):
            return df.value
    raise AssertionError(f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")


def captions(at: AppTest) -> list[str]:
    return [c for el in images(at) for c in el.captions]


# ---------------------------------------------------------------------------------------------- full store
def scatter_args(at: AppTest) -> dict[str, Any]:
    """The arguments the map page sent to its scatter component (figure, per-trace points, sprite)."""
    (el,) = [e for e in at.get("component_instance")]
    args: dict[str, Any] = json.loads(el.proto.json_args)
    return args


def test_map_page_draws_a_webgl_scatter_with_hover_cards(pets_store_full: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # First on purpose: pays the numba compilation for the rest of the module.
    at = page("map", pets_store_full, monkeypatch)
    no_exception(at)
    args = scatter_args(at)
    assert {t["type"] for t in args["figure"]["data"]} == {"scattergl"}
    assert at.selectbox(key="map-space").options == ["encoder", "mapper_attr", "mapper_id", "vae_logvar",
                                                    "vae_mu"]
    # Every point has a hover card and its own cell in the sprite sheet of thumbnails.
    ids = [i for t in args["points"] for i in t["ids"]]
    cells = [c for t in args["points"] for c in t["cell"]]
    assert len(ids) == 1140 and sorted(cells) == list(range(1140))
    assert args["sprite"]["url"].startswith("data:image/jpeg;base64,")
    assert all("cluster" in c for t in args["points"] for c in t["card"])
    # Colour by breed: one WebGL trace per breed, each its own colour, cats and dogs in their own hue ranges.
    at.selectbox(key="map-colour").set_value("breed").run()
    no_exception(at)
    traces = scatter_args(at)["figure"]["data"]
    assert len(traces) >= 45
    colours = [t["marker"]["color"] for t in traces]
    assert len(set(colours)) == len(colours)
    at.selectbox(key="map-colour").set_value("cluster").run()
    no_exception(at)
    assert scatter_args(at)["figure"]["data"][0]["type"] == "scattergl"


def test_map_click_and_selection_survive_recolouring(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the scatter reports (as the browser test drives it) shows the clicked photo's neighbours and the
    selection; both stay when the colouring changes."""
    from indexer.store import Store

    ids = Store.open(pets_store_full).image_ids()
    at = page("map", pets_store_full, monkeypatch,
              **{"map-chart-encoder": {"clicked": ids[0], "selected": ids[:5], "events": 1}})
    no_exception(at)
    for colour in ("breed", "cluster"):
        assert [s.value for s in at.subheader] == ["Selection: 5 image(s)"]
        assert any(m.value.startswith("**8 nearest photos**") for m in at.markdown)
        selected = [c for t in scatter_args(at)["figure"]["data"] for c in (t.get("selectedpoints") or [])]
        assert len(selected) == 5  # and drawn as selected
        at.selectbox(key="map-colour").set_value(colour).run()
        no_exception(at)


def test_map_palette_is_distinct_and_grouped_by_species() -> None:
    from dashboard.views.map import GREY, palette

    cats, dogs = [f"cat{i}" for i in range(12)], [f"dog{i}" for i in range(33)]
    species = {**{c: "cat" for c in cats}, **{d: "dog" for d in dogs}}
    colours = palette([*cats, *dogs, "unknown"], species)
    assert colours["unknown"] == GREY and len(set(colours.values())) == 46

    def hue(c: str) -> float:
        import colorsys

        return colorsys.rgb_to_hls(*(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)))[0]

    assert all(hue(colours[c]) < 0.2 or hue(colours[c]) > 0.85 for c in cats)
    assert all(0.2 < hue(colours[d]) < 0.8 for d in dogs)


def test_map_events_are_read_defensively() -> None:
    from dashboard.views.map import event_state

    assert event_state(None) == (None, [])
    assert event_state({"clicked": "a", "selected": ["b", "b", 3, "c"], "events": 2}) == ("a", ["b", "c"])
    assert event_state({"clicked": 5}) == (None, [])


def test_app_entry_script_lands_on_the_overview(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMMALS_STORE", str(pets_store_full))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    no_exception(at)
    assert at.title[0].value == "Mammals Space"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "1,140"
    assert metrics["Cat"] and metrics["Dog"]
    assert '"bar"' in plotly_specs(at)[0]
    assert {e.label.split(" ·")[0] for e in at.expander} >= {"mapper", "vae"}  # the trained models' reports


def test_clusters_page_has_galleries_and_agreement(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("clusters", pets_store_full, monkeypatch)
    no_exception(at)
    table_with(at, "label", "nmi", "ari")
    summary = table_with(at, "cluster", "size", "purity", "majority", "top_breeds")
    assert summary["size"].is_monotonic_decreasing  # the table comes first, largest cluster first
    assert summary["top_breeds"].str.contains("%").all()
    assert len(images(at)) >= 2  # the three largest clusters' galleries by default
    assert sum(m.value.startswith("**Cluster") for m in at.markdown) == 3
    metrics = {m.label: m.value for m in at.metric}
    assert 0 <= float(metrics["ARI with breed"]) <= 1 and 0 <= float(metrics["NMI with breed"]) <= 1


@pytest.mark.parametrize("space", ["encoder", "mapper_id"])
def test_query_with_an_indexed_photo_finds_its_breed_first(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch,
                                                           space: str) -> None:
    from analysis.neighbours import query_ids
    from indexer.store import Store

    store = Store.open(pets_store_full)
    labelled = store.images.dropna(subset=["breed"]).sort_values("relpath")
    sample = labelled.iloc[:: len(labelled) // 10].iloc[:10]  # ten photos spread over the breeds
    expected = query_ids(store, sample["id"].tolist(), k=12, space=space, exclude_self=True)
    at = page("query", pets_store_full, monkeypatch)
    no_exception(at)
    at.selectbox(key="query-space").set_value(space)
    same_breed_first = 0
    for (_, row), lib in zip(sample.iterrows(), expected, strict=True):
        at.selectbox(key="query-image").set_value(row["relpath"]).run()
        no_exception(at)
        table = table_with(at, "rank", "similarity", "breed", "id")
        # By default the photo itself is left out: the page shows what the library's query_ids returns.
        assert table["id"].tolist() == [n.id for n in lib.neighbours] and row["id"] not in set(table["id"])
        assert len(table) == 12 and table["similarity"].is_monotonic_decreasing
        same_breed_first += table.iloc[0]["breed"] == row["breed"]
    # Store-wide, the nearest other photo has the same breed for 78% of photos (encoder space).
    assert same_breed_first >= 7
    assert any(c.startswith(f"1. {table.iloc[0]['breed']}") for c in captions(at))
    votes = [s for s in plotly_specs(at) if "Breed vote" in s]
    assert votes and '"bar"' in votes[0]

    # With the photo itself kept, it ranks first.
    at.checkbox(key="query-exclude-self").uncheck().run()
    no_exception(at)
    first = table_with(at, "rank", "similarity", "breed", "id").iloc[0]
    assert first["id"] == sample.iloc[-1]["id"] and first["similarity"] > 0.999


def test_query_with_uploads(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("query", pets_store_full, monkeypatch)
    at.radio(key="query-source").set_value("Upload").run()
    no_exception(at)
    uploader = at.file_uploader[0]
    assert set(uploader.allowed_type) >= {".jpg", ".png", ".webp", ".gif"}

    # A real photo: neighbours and a vote.
    photo = sample_photos(1)[0]
    uploader.set_value((photo.name, photo.read_bytes(), "image/jpeg"))
    at.run()
    no_exception(at)
    assert table_with(at, "rank", "similarity", "breed", "id").shape[0] == 12

    # Not an image: a clear message, no traceback.
    at.file_uploader[0].set_value(("notes.png", b"hello, I am text\n" * 20, "image/png"))
    at.run()
    assert not at.exception
    assert any("Could not read notes.png" in e.value and "not an image" in e.value for e in at.error)

    # Over 20 MB: refused before decoding.
    at.file_uploader[0].set_value(("huge.jpg", b"\xff" * (20 * 2**20 + 1), "image/jpeg"))
    at.run()
    assert not at.exception
    assert any("up to 20 MB" in e.value for e in at.error)


def test_sparsity_page_shows_curves_tests_and_heatmap(pets_store_full: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("sparsity", pets_store_full, monkeypatch)
    no_exception(at)
    assert set(at.selectbox(key="sparsity-model").options) == {"encoder", "mapper", "vae"}
    tests = table_with(at, "layer_index", "p_adjusted", "significant", "effect_size", "marked")
    assert (tests["marked"] == "★").sum() == tests["significant"].sum()
    specs = plotly_specs(at)
    assert any('"fill":"toself"' in s for s in specs)  # confidence bands
    assert any('"heatmap"' in s for s in specs)
    assert any("Hoyer sparseness" in c.value for c in at.caption)  # what the metric means, in one line
    assert any("largest effect is at layer" in m.value for m in at.markdown)  # the finding, in words
    assert all(p == "< 0.001" or len(p) == 5 for p in tests["p_adjusted"])  # "0.023", never "2.3e-13"
    at.radio(key="sparsity-view").set_value("slope").run()
    no_exception(at)
    at.selectbox(key="sparsity-model").set_value("vae").run()
    at.selectbox(key="sparsity-label").set_value("breed").run()
    no_exception(at)


def test_sparsity_views_relative_slope_and_p_values() -> None:
    import pandas as pd

    from dashboard.views.sparsity import format_p, view_curves

    curves = pd.DataFrame({"group": ["all"] * 3 + ["a"] * 3, "layer_index": [0, 1, 2] * 2,
                           "mean": [1.0, 2.0, 4.0, 1.5, 2.0, 5.0], "ci_low": [0.9, 1.9, 3.9, 1.4, 1.9, 4.9],
                           "ci_high": [1.1, 2.1, 4.1, 1.6, 2.1, 5.1]})
    rel = view_curves(curves, "relative")
    assert rel[rel["group"] == "a"]["mean"].tolist() == [0.5, 0.0, 1.0]
    assert rel[rel["group"] == "all"]["mean"].tolist() == [0.0, 0.0, 0.0]
    assert rel[rel["group"] == "a"]["ci_low"].round(6).tolist() == [0.4, -0.1, 0.9]
    slope = view_curves(curves, "slope")
    assert slope[slope["group"] == "all"]["mean"].tolist()[1:] == [1.0, 2.0]
    accel = view_curves(curves, "acceleration")
    assert accel[accel["group"] == "a"]["mean"].tolist()[2:] == [3.5]
    assert [format_p(p) for p in (2.3e-13, 0.0234, float("nan"))] == ["< 0.001", "0.023", "n/a"]


def test_sparsity_page_correlates_a_numeric_label_joined_from_a_csv(pets_store_copy: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import pandas as pd

    from indexer.pipeline import run_index

    # A "rating" that rises with the images' last-layer Hoyer sparsity (a planted relation), joined from a CSV.
    from indexer.store import Store

    sp = Store.open(pets_store_copy).sparsity()
    last = sp[(sp["model"] == "encoder") & (sp["metric"] == "hoyer")]
    last = last[last["layer_index"] == last["layer_index"].max()].set_index("id")["value"]
    images = Store.open(pets_store_copy).images.set_index("id")
    rating = pd.qcut(last.rank(method="first"), 5, labels=False) + 1
    csv = tmp_path / "ratings.csv"
    pd.DataFrame({"path": images.loc[rating.index, "path"], "rating": rating.astype(float)}).to_csv(csv, index=False)
    assert run_index([PETS], pets_store_copy, labels_csv=csv, progress=False).labels_updated == len(images)

    at = page("sparsity", pets_store_copy, monkeypatch)
    no_exception(at)
    assert "rating" not in at.selectbox(key="sparsity-label").options  # numeric: not a grouping
    assert at.selectbox(key="sparsity-numeric-label").value == "rating"
    corr = table_with(at, "layer_index", "rho", "p_adjusted", "significant", "marked")
    assert (corr["marked"] == "★").sum() == corr["significant"].sum()
    top = corr.sort_values("layer_index").iloc[-1]
    assert top["rho"] > 0.9 and top["significant"]
    assert any("Spearman correlation of hoyer with rating" in s for s in plotly_specs(at))
    assert np.isfinite(corr["rho"]).all()


def test_latent_page_shows_the_interpolation_strip_and_swap(pets_store_full: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("latent", pets_store_full, monkeypatch)
    no_exception(at)
    # Photo a, its reconstruction (t=0), the path, b's reconstruction (t=1), photo b (tests/test_latent_explorer.py).
    strip = [el for el in images(at) if el.captions and el.captions[0] == "a: photo (VAE input)"]
    assert len(strip) == 1 and len(strip[0].value) == 8 + 2
    assert sum("reads the swap as" in m.value for m in at.markdown) == 2  # both ways
    at.radio(key="latent-vae-mode").set_value("slerp").run()
    no_exception(at)


def test_export_page_offers_downloads(pets_store_full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("export", pets_store_full, monkeypatch)
    no_exception(at)
    labels = {b.label for b in at.download_button}
    assert {"images.csv", "images.parquet", "cluster-summary-encoder.tex"} <= labels
    assert any(label.endswith(".png") for label in labels) and any(label.endswith(".svg") for label in labels)
    assert any(label.startswith("group-tests-") and label.endswith(".tex") for label in labels)


def test_export_figures_render(pets_store_full: Path) -> None:
    """The deferred figure downloads (run only on click in the browser) produce real PNG and SVG files."""
    from dashboard.state import StoreKey, store_version
    from dashboard.views.export import figure_bytes

    key = StoreKey(str(pets_store_full.resolve()), store_version(pets_store_full.resolve()))
    assert figure_bytes(key, "curves", "encoder", "hoyer", "species", "png").startswith(b"\x89PNG")
    assert b"<svg" in figure_bytes(key, "heatmap", "encoder", "hoyer", "breed", "svg")[:2000]


def test_export_table_bytes_are_the_export_files() -> None:
    """The deferred table downloads: CSV and Parquet via analysis.export (vector cells kept), LaTeX booktabs."""
    import numpy as np
    import pandas as pd

    from dashboard.views.export import latex_bytes, table_bytes

    df = pd.DataFrame({"breed": ["a_b", "c"], "p_value": [1e-5, 0.5],
                       "vec": [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)]})
    assert table_bytes(df, "csv").decode().splitlines()[1].endswith('"[1.0, 2.0]"')
    back = pd.read_parquet(io.BytesIO(table_bytes(df, "parquet")))
    assert list(back["vec"][1]) == [3.0, 4.0]
    tex = latex_bytes(df[["breed", "p_value"]], "Caption", "tab:x").decode()
    assert "\\toprule" in tex and "a\\_b" in tex and "\\label{tab:x}" in tex


# ---------------------------------------------------------------------------------------------- plain store
def test_latent_page_without_models_says_what_to_train(pets_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("latent", pets_store, monkeypatch)
    assert not at.exception
    assert any("mammals train vae" in i.value and "mammals train mapper" in i.value for i in at.info)


def test_quality_page_shows_each_finding_with_thumbnails_and_csv(pets_store: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("quality", pets_store, monkeypatch)
    no_exception(at)
    assert [m.label for m in at.metric] == ["Near-duplicate pairs", "Likely label errors", "Outliers flagged"]
    assert [t.label for t in at.tabs] == ["Duplicates", "Label errors", "Outliers"]
    assert images(at)  # the flagged outliers' thumbnails at least (pets has 2% of 1,140 = 23 of them)
    assert any("out-of-fold accuracy" in c.value for c in at.caption)
    assert at.selectbox(key="quality-label").value == "breed"


@pytest.mark.parametrize("name", ["overview", "query", "sparsity", "clusters", "export"])
def test_pages_run_on_a_store_without_models(pets_store: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    at = page(name, pets_store, monkeypatch)
    no_exception(at)
    if name == "overview":
        assert any("mammals train mapper" in i.value for i in at.info)
    if name == "query":
        assert at.selectbox(key="query-space").options == ["encoder"]
        assert at.radio(key="query-source").options == ["Indexed photo", "Upload"]  # no text tower


def test_query_gallery_picker_lists_thumbnails_by_breed(pets_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page("query", pets_store, monkeypatch)
    no_exception(at)
    gallery = table_with(at, "photo", "breed", "file")
    assert len(gallery) == 60 and gallery["photo"].str.startswith("data:image/jpeg;base64,").all()
    at.selectbox(key="query-gallery-breed").set_value("sphynx").run()
    no_exception(at)
    gallery = table_with(at, "photo", "breed", "file")
    assert set(gallery["breed"]) == {"sphynx"} and len(gallery) == 40


def test_query_by_text_prompt_on_an_open_clip_store(clip_store: tuple[Path, str, list[Path]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store_path, _, _ = clip_store
    at = page("query", store_path, monkeypatch)
    no_exception(at)
    assert "Text prompt" in at.radio(key="query-source").options
    at.radio(key="query-source").set_value("Text prompt").run()
    no_exception(at)
    assert at.selectbox(key="query-space").options == ["encoder"]
    at.text_input(key="query-text").set_value("a photo of a pug").run()
    no_exception(at)
    table = table_with(at, "rank", "similarity", "breed", "id")
    assert len(table) == 12 and table["similarity"].is_monotonic_decreasing
    votes = [s for s in plotly_specs(at) if "Breed vote" in s]
    assert votes and '"bar"' in votes[0]


# ---------------------------------------------------------------------------------------------- no store, CLI
def test_app_without_a_store_says_how_to_start_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAMMALS_STORE", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert "mammals dashboard STORE" in at.error[0].value


def test_store_path_comes_from_argv_then_env(tmp_path: Path) -> None:
    from dashboard.state import store_path_from

    assert store_path_from(["--store", str(tmp_path)], {}) == tmp_path
    assert store_path_from(["-q", "--strict-markers"], {"MAMMALS_STORE": "/s"}) == Path("/s")
    assert store_path_from(["--st", "x"], {}) is None  # no abbreviations: a test runner's flags are not ours


def test_cli_registers_dashboard_and_binds_localhost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dashboard.cli import streamlit_command
    from indexer.cli import build_parser, main

    a = build_parser().parse_args(["dashboard", str(tmp_path)])
    # The defaults the command line gives, passed on as `mammals dashboard` does: the server binds localhost.
    cmd = streamlit_command(tmp_path, port=a.port, host=a.host)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboard/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-3:] == ["--", "--store", str(tmp_path)]
    # A folder that is no store: one line, exit 2, no server started.
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_thumbnails_only_serve_store_images(pets_store: Path) -> None:
    """A thumbnail is asked for by id; anything that is not an indexed image's id gives the placeholder."""
    from PIL import Image

    from dashboard.state import StoreKey, store_version, thumbnail
    from indexer.store import Store

    key = StoreKey(str(pets_store.resolve()), store_version(pets_store.resolve()))
    image_id = str(Store.open(pets_store).images["id"].iloc[0])
    real = Image.open(io.BytesIO(thumbnail(key, image_id)))
    assert max(real.size) == 160
    for bogus in ("/etc/passwd", str(next(PETS.rglob("*.jpg"))), "../../x", "0" * 64):
        img = Image.open(io.BytesIO(thumbnail(key, bogus)))
        assert img.size == (160, 160)
        assert all(abs(c - 225) <= 3 for c in img.convert("RGB").getpixel((2, 2)))  # the grey placeholder
