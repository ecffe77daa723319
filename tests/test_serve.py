"""`mammals serve` against a real uvicorn server on a free port, over a copy of the pets store."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from analysis.client import Client, ServiceError
from analysis.server import create_app
from indexer.cli import main as cli
from indexer.pipeline import run_index
from indexer.store import Store, schema
from tests.conftest import SHARED_DATA, sample_photos
from tests.helpers_badfiles import make_bad_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """A uvicorn server in a thread of this process (a real socket, real HTTP)."""

    def __init__(self, app: object) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(pets_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Client]]:
    store = tmp_path_factory.mktemp("serve") / "pets"
    shutil.copytree(pets_store, store)
    with _Server(create_app(store, max_upload_bytes=2 * 1024 * 1024)) as url:
        yield store, Client(url)


def _ids(result: dict[str, object]) -> list[str]:
    return [n["id"] for n in result["neighbours"]]  # type: ignore[index, attr-defined]


def test_health_info_and_docs(served: tuple[Path, Client]) -> None:
    client = served[1]
    assert client.healthz() == {"status": "ok"}
    info = client.info()
    assert info["images"] == 1140 and info["spaces"][schema.ENCODER_SPACE]["count"] == 1140
    assert info["text_queries"] is False
    spec = json.loads(client._request("GET", "/openapi.json"))
    assert {"/query/image", "/query/text", "/query/vector", "/neighbours/{image_id}", "/images/{image_id}",
            "/thumbnails/{image_id}", "/info", "/healthz"} <= set(spec["paths"])
    assert b"swagger" in client._request("GET", "/docs").lower()


def test_image_query_matches_the_cli(served: tuple[Path, Client], capsys: pytest.CaptureFixture[str]) -> None:
    store, client = served
    photo = sample_photos(1, step=101)[0]
    got = client.query_image(photo, k=5)
    assert cli(["query", str(photo), "--store", str(store), "-k", "5", "--json", "-q"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["schema"] == want["schema"] and got["k"] == 5 and got["encoder"] == want["encoder"]
    (g,), (w,) = got["results"], want["results"]
    assert _ids(g) == _ids(w)
    assert np.allclose([n["similarity"] for n in g["neighbours"]], [n["similarity"] for n in w["neighbours"]],
                       atol=1e-4)
    assert g["breed_votes"][0]["breed"] == w["breed_votes"][0]["breed"]


def test_ids_vectors_metadata_and_thumbnails(served: tuple[Path, Client]) -> None:
    store, client = served
    s = Store.open(store)
    labelled = s.images.dropna(subset=["breed"])
    image_id = str(labelled["id"].iloc[3])
    res = client.neighbours(image_id[:8], k=4)["results"][0]
    assert len(res["neighbours"]) == 4 and image_id not in _ids(res)
    assert _ids(client.neighbours(image_id, k=1, include_self=True)["results"][0]) == [image_id]

    sp = s.space(schema.ENCODER_SPACE)
    vec = sp.vectors[sp.ids.index(image_id)]
    out = client.query_vector([vec.tolist(), (-vec).tolist()], k=3)
    assert [r["kind"] for r in out["results"]] == ["vector", "vector"]
    assert _ids(out["results"][0])[0] == image_id
    huge = client.query_vector([(vec * 1e37).tolist()], k=1)  # scale is ignored, and cannot overflow
    assert _ids(huge["results"][0]) == [image_id]

    meta = client.image(image_id[:10])
    assert meta["id"] == image_id and meta["breed"] == labelled["breed"].iloc[3] and meta["width"] > 0
    jpeg = client.thumbnail(image_id, side=64)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.format == "JPEG" and max(img.size) == 64


@pytest.mark.parametrize(("call", "status", "reason"), [
    (lambda c: c.neighbours("0" * 64), 404, "no indexed image"),
    (lambda c: c.neighbours("abc"), 404, "too short"),
    (lambda c: c.image("f" * 64), 404, "no indexed image"),
    (lambda c: c.thumbnail("f" * 64), 404, "no indexed image"),
    (lambda c: c.neighbours("0" * 64, k=0), 422, "k:"),
    (lambda c: c.query_vector([[1.0, 2.0]]), 422, "dimensions"),
    (lambda c: c.query_vector([[0.0] * 1280]), 422, "non-zero"),
    (lambda c: c.query_text(["a pug"]), 400, "no text tower"),
    (lambda c: c.neighbours("0" * 64, space="nope"), 400, "no space 'nope'"),
])
def test_bad_requests_are_4xx_with_a_reason(served: tuple[Path, Client], call: object, status: int,
                                            reason: str) -> None:
    with pytest.raises(ServiceError) as e:
        call(served[1])  # type: ignore[operator]
    assert e.value.status == status and reason in e.value.detail, e.value


def test_bad_uploads_are_refused(served: tuple[Path, Client], tmp_path: Path) -> None:
    client = served[1]
    bad = make_bad_corpus(tmp_path)
    for name in ("bomb.png", "truncated.jpg", "zeros.jpg", "empty.jpg"):
        with pytest.raises(ServiceError) as e:
            client.query_image(tmp_path / name)
        assert e.value.status == 400 and bad[name].lower() in e.value.detail.lower(), (name, e.value)
    with pytest.raises(ServiceError) as e:
        client.query_image(b"\xff\xd8" + b"0" * (3 * 1024 * 1024), filename="huge.jpg")
    assert e.value.status == 413


def test_a_new_index_run_is_served_without_a_restart(served: tuple[Path, Client], tmp_path: Path) -> None:
    store, client = served
    before = client.info()
    extra = tmp_path / "cats"
    extra.mkdir()
    for p in sorted((SHARED_DATA / "cats-unlabelled").glob("*.jpg"))[:4]:
        (extra / p.name).symlink_to(p)
    report = run_index([extra], store, progress=False, species="cat")
    assert report.added >= 3
    after = client.info()
    assert after["images"] == before["images"] + report.added and after["version"] > before["version"]
    new_id = str(Store.open(store).images["id"].iloc[-1])
    assert _ids(client.neighbours(new_id, k=1, include_self=True)["results"][0]) == [new_id]


def test_token_is_required_when_set(pets_store: Path) -> None:
    with _Server(create_app(pets_store, token="s3cret")) as url:
        assert Client(url).healthz()["status"] == "ok"  # liveness needs no token
        with pytest.raises(ServiceError) as e:
            Client(url).info()
        assert e.value.status == 401
        with pytest.raises(ServiceError):
            Client(url, token="wrong").info()
        assert Client(url, token="s3cret").info()["images"] == 1140


def test_cli_refuses_a_public_address_without_a_token(pets_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["serve", str(pets_store), "--host", "0.0.0.0", "-q"]) == 2
    assert "give --token" in capsys.readouterr().err


def test_fuzzing_the_openapi_schema_finds_no_server_errors(served: tuple[Path, Client]) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url = served[1].url
    schema_ = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    for op in schema_.get_all_operations():
        operation = op.ok()

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        check()
    assert not failures, failures[:5]
