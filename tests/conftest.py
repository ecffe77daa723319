"""Shared fixtures: the real shared photos, and one store of them built once per test session.

Indexing 1,140 photos takes about a minute on a 2-core CPU, so every test that needs the pets store reads the
same one; tests that change a store work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PETS = SHARED_DATA / "pets"
WOOF = SHARED_DATA / "imagewoof-scale"
CATS = SHARED_DATA / "cats-unlabelled"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not PETS.is_dir():
        skip = pytest.mark.skip(reason=f"{PETS} is missing (the shared photos sit beside the checkout)")
        for item in items:
            if {"pets_store", "clip_store"} & set(getattr(item, "fixturenames", ())):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def pets_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of all shared pets photos with the default encoder (read-only for tests: copy to change it)."""
    from indexer.pipeline import run_index

    store = tmp_path_factory.mktemp("stores") / "pets"
    report = run_index([PETS], store, progress=False)
    assert report.added == 1140, report.as_dict()
    return store


@pytest.fixture(scope="session")
def pets_store_full(pets_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pets store with a mapper and a VAE trained with their defaults and every space indexed (read-only)."""
    from indexer.pipeline import run_index
    from indexer.training import train_store_mapper, train_store_vae

    store = tmp_path_factory.mktemp("stores") / "pets-full"
    shutil.copytree(pets_store, store)
    train_store_mapper(store, progress=False)
    train_store_vae(store, progress=False)
    report = run_index([PETS], store, progress=False)
    assert report.added == 0 and set(report.recomputed) == {"mapper_id", "mapper_attr", "vae_mu", "vae_logvar"}
    return store


@pytest.fixture(scope="session")
def clip_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[Path]]:
    """``(store, encoder name, photos)``: 24 shared photos indexed with a tiny real open_clip model (random weights,
    saved by the test; open_clip weights cannot be downloaded here).  Read-only."""
    from indexer.cli import main as cli
    from tests.helpers_openclip import make_tiny_open_clip_checkpoint

    root = tmp_path_factory.mktemp("clip")
    name = make_tiny_open_clip_checkpoint(root / "ckpt")
    photos = sample_photos(24, step=47)
    src = root / "src"
    for p in photos:  # the pets layout (species/breed/file) so that breeds are labelled
        dst = src / p.relative_to(PETS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    assert cli(["index", str(src), "--store", str(root / "store"), "--encoder", name, "-q", "--workers", "0"]) == 0
    return root / "store", name, [src / p.relative_to(PETS) for p in photos]


@pytest.fixture
def pets_store_copy(pets_store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pets-copy"
    shutil.copytree(pets_store, dst)
    return dst


def sample_photos(n: int, root: Path = PETS, *, step: int = 37) -> list[Path]:
    """n real photos spread over breeds (every step-th file in sorted order)."""
    files = sorted(root.rglob("*.jpg"))
    return files[::step][:n]
