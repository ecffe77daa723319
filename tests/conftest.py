"""Shared fixtures: the real shared photos, one store of them and the default models, each built once per run.

Indexing 1,140 photos takes about a minute on a 2-core CPU and training the default mapper and VAE a few more,
so every test that needs them reads the same ones; tests that change a store work on a copy.

The shared photos are required: without ``../shared/data`` the run fails at collection (a CI that silently
skipped every quality test would be green and worthless).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from analysis.training import FittedVAE
    from indexer.models.mapper import MapperResult
    from indexer.models.vae import VAEResult

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PETS = SHARED_DATA / "pets"
WOOF = SHARED_DATA / "imagewoof-scale"
CATS = SHARED_DATA / "cats-unlabelled"


def pytest_configure(config: pytest.Config) -> None:
    missing = [p for p in (PETS, WOOF, CATS) if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"the shared photos are missing: {', '.join(map(str, missing))} (they sit beside "
                                "the checkout in ../shared/data; see ../shared/data/README.md)")


@pytest.fixture(scope="session")
def pets_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of all shared pets photos with the default encoder (read-only for tests: copy to change it)."""
    from indexer.pipeline import run_index

    store = tmp_path_factory.mktemp("stores") / "pets"
    report = run_index([PETS], store, progress=False)
    assert report.added == 1140, report.as_dict()
    return store


@pytest.fixture(scope="session")
def default_mapper(pets_store: Path) -> MapperResult:
    """The mapper trained with ``MapperConfig()`` on the pets store (as `mammals train mapper` does), once a run."""
    from analysis.training import fit_store_mapper

    return fit_store_mapper(pets_store, progress=False)


@pytest.fixture(scope="session")
def default_vae_fit(pets_store: Path) -> FittedVAE:
    """The VAE trained with ``VAEConfig()`` on the pets store's photos (as `mammals train vae` does), once a run."""
    from analysis.training import fit_store_vae

    return fit_store_vae(pets_store, progress=False)


@pytest.fixture(scope="session")
def default_vae(default_vae_fit: FittedVAE) -> VAEResult:
    return default_vae_fit.result


@pytest.fixture(scope="session")
def pets_store_full(pets_store: Path, default_mapper: MapperResult, default_vae_fit: FittedVAE,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pets store with the default mapper and VAE installed and every space indexed (read-only)."""
    from analysis.training import install_mapper, install_vae
    from indexer.pipeline import run_index

    store = tmp_path_factory.mktemp("stores") / "pets-full"
    shutil.copytree(pets_store, store)
    install_mapper(store, default_mapper)
    install_vae(store, default_vae_fit)
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
