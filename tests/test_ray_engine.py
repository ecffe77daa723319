"""`mammals index --engine ray`: the same store as the local engine, through Ray Data on a local 2-CPU Ray.

Ray retries a killed model actor's batches; a killed driver resumes from its last commit. One Ray instance per
module (starting one costs seconds)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main as cli
from indexer.pipeline import run_index
from indexer.store import Store, schema
from tests.conftest import PETS, REPO

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

MODEL_ACTOR = r"MapBatches\(ModelStage\)"  # in the process title of the model stage's actors (a regex)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _folder(tmp: Path, n: int) -> Path:
    """A species/breed folder of n real pets photos (links, not copies)."""
    files = sorted(PETS.rglob("*.jpg"))[::7][:n]
    for f in files:
        dest = tmp / f.relative_to(PETS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(f)
    return tmp


def _vectors(store: Store) -> dict[str, np.ndarray]:
    sp = store.space(schema.ENCODER_SPACE)
    return dict(zip(sp.ids, sp.vectors, strict=True))


def test_ray_engine_gives_the_local_store(local_ray: None, pets_store: Path, tmp_path: Path) -> None:
    report = run_index([PETS], tmp_path / "ray", engine="ray", progress=False)
    assert report.added == 1140 and not report.errors
    local, distributed = Store.open(pets_store), Store.open(tmp_path / "ray")
    a, b = _vectors(local), _vectors(distributed)
    assert set(a) == set(b) and len(b) == 1140
    cosines = np.array([float(a[i] @ b[i]) for i in a])
    assert cosines.min() >= 0.9999, cosines.min()
    assert len(distributed.sparsity()) == len(local.sparsity()) > 0
    assert distributed.manifest["parameters"]["engine"] == "ray"
    paths = local.images.set_index("id")["path"], distributed.images.set_index("id")["path"]
    assert paths[0].sort_index().equals(paths[1].sort_index())  # duplicates keep the same (first) path
    assert cli(["verify", str(tmp_path / "ray"), "-q"]) == 0


def _kill_model_actor() -> int:
    """SIGKILL the model stage's actor process(es); how many were killed."""
    out = subprocess.run(["pgrep", "-f", MODEL_ACTOR], capture_output=True, text=True).stdout.split()
    for pid in out:
        os.kill(int(pid), signal.SIGKILL)
    return len(out)


def test_a_killed_model_actor_is_retried_without_duplicates(local_ray: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.engines.ray_data as ray_data

    photos = _folder(tmp_path / "photos", 160)
    expected = run_index([photos], tmp_path / "local", progress=False, sparsity="off")
    killed: list[int] = []
    real = ray_data._shard_output

    def kill_after_first(*args: object, **kwargs: object) -> object:
        if not killed:  # once the first batch is back, the actor is mid-run with batches in flight
            killed.append(_kill_model_actor())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ray_data, "_shard_output", kill_after_first)
    report = run_index([photos], tmp_path / "ray", engine="ray", progress=False, sparsity="off", batch_size=8)
    assert killed == [1]
    assert report.added == expected.added == 160 and report.duplicates == 0 and not report.errors
    store = Store.open(tmp_path / "ray")
    ids = store.images["id"].tolist()
    assert len(ids) == len(set(ids)) == 160
    assert set(ids) == set(Store.open(tmp_path / "local").images["id"])
    assert cli(["verify", str(tmp_path / "ray"), "-q"]) == 0


_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from indexer.pipeline import run_index
    run_index([Path(sys.argv[1])], Path(sys.argv[2]), engine="ray", progress=False, sparsity="off", batch_size=8,
              commit_every_seconds=0.0)
    """
)


def test_a_killed_driver_resumes_from_its_last_commit(local_ray: None, tmp_path: Path) -> None:
    photos = _folder(tmp_path / "photos", 160)
    store_path = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(photos), str(store_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (store_path / schema.MANIFEST).exists():
                committed = len(Store.open(store_path).images)
                if committed >= 16:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-run (the cluster is the test's own and lives on)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 16 <= committed < 160
    report = run_index([photos], store_path, engine="ray", progress=False, sparsity="off", batch_size=8)
    store = Store.open(store_path)
    ids = store.images["id"].tolist()
    assert len(ids) == len(set(ids)) == 160
    assert report.already_indexed >= committed and report.added == 160 - report.already_indexed - report.duplicates
    assert cli(["verify", str(store_path), "-q"]) == 0
    shutil.rmtree(photos)


def test_cli_takes_file_urls_and_refuses_other_schemes(local_ray: None, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    photos = _folder(tmp_path / "photos dir", 24)  # a space, to be escaped in the URL
    store = tmp_path / "store"
    code = cli(["index", photos.as_uri(), "--store", store.as_uri(), "--engine", "ray", "--no-sparsity", "--json",
                "-q"])
    assert code == 0
    assert '"added": 24' in capsys.readouterr().out
    assert len(Store.open(store).images) == 24
    with pytest.raises(SystemExit) as exit_info:
        cli(["index", "s3://bucket/photos", "--store", str(store), "-q"])
    assert exit_info.value.code == 2
    assert "s3:// URLs are not read directly; mount the storage" in capsys.readouterr().err
    assert cli(["index", str(photos), "--store", str(store), "--concurrency", "2", "-q"]) == 2
    assert "need --engine ray" in capsys.readouterr().err


def test_pixels_cross_the_object_store_as_uint8_and_give_the_same_tensors() -> None:
    import torch
    from PIL import Image

    from indexer.encoders import load_encoder
    from indexer.engines.ray_data import split_transform
    from indexer.models.vae import vae_transform

    for transform in (load_encoder("efficientnet-lite0").preprocess, vae_transform(64)):
        ship, finish = split_transform(transform)
        for path in sorted(PETS.rglob("*.jpg"))[:3]:
            with Image.open(path) as img:
                img.load()
                shipped = ship(img)
                assert shipped.dtype == torch.uint8
                assert torch.equal(finish(shipped.unsqueeze(0))[0], transform(img))  # bit for bit

    def not_a_compose(img: object) -> torch.Tensor:
        return torch.zeros(3, 2, 2)

    ship, finish = split_transform(not_a_compose)
    assert ship is not_a_compose and torch.equal(finish(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
