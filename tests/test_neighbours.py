"""Neighbours and breed votes for an indexed id, a new photo and a text prompt (the analysis library and the CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.evaluate import knn_predictions, labelled_votes
from analysis.neighbours import query_ids, query_images, query_texts
from indexer.cli import main as cli
from indexer.encoders import load_encoder
from indexer.pipeline import run_index
from indexer.store import Store, StoreError, schema, unit_rows
from tests.conftest import sample_photos


def _labelled_ids(store: Store, n: int) -> list[str]:
    images = store.images.dropna(subset=["breed"]).sort_values("relpath")
    return images["id"].iloc[:: max(1, len(images) // n)].iloc[:n].tolist()


def test_indexed_id_neighbours_leave_the_image_out_and_vote_its_breed(pets_store: Path) -> None:
    store = Store.open(pets_store)
    breed_of = store.images.set_index("id")["breed"]
    ids = _labelled_ids(store, 120)
    results = query_ids(store, ids, k=10, exclude_self=True)
    right = 0
    for image_id, res in zip(ids, results, strict=True):
        assert res.error is None and res.kind == "id" and res.query == image_id
        assert image_id not in [n.id for n in res.neighbours]
        assert [n.rank for n in res.neighbours] == list(range(1, 11))
        sims = [n.similarity for n in res.neighbours]
        assert sims == sorted(sims, reverse=True)
        right += res.breed_votes[0].breed == breed_of[image_id]
    # Leave-one-out breed accuracy of the whole store is 0.83 (test_index); the vote of the 10 others matches it.
    assert right / len(ids) >= 0.75

    # The same vote as the store-wide leave-one-out kNN for most images (they break ties the same way).
    sp = store.space(schema.ENCODER_SPACE)
    rows = [sp.ids.index(i) for i in ids]
    labels = breed_of.loc[sp.ids].astype(str).to_numpy()
    loo = knn_predictions(sp.vectors, labels, k=10)[rows]
    agree = np.mean([r.breed_votes[0].breed == p for r, p in zip(results, loo, strict=True)])
    assert agree >= 0.95

    with_self = query_ids(store, ids[:5], k=3)
    for image_id, res in zip(ids[:5], with_self, strict=True):
        assert res.neighbours[0].id == image_id and res.neighbours[0].similarity > 0.999


def test_indexed_id_prefixes_and_bad_ids_are_errors_in_their_results(pets_store: Path) -> None:
    store = Store.open(pets_store)
    image_id = _labelled_ids(store, 1)[0]
    full, short, tiny, unknown = query_ids(store, [image_id, image_id[:10].upper(), image_id[:3], "f" * 64], k=4)
    assert full.error is None and [n.id for n in short.neighbours] == [n.id for n in full.neighbours]
    assert tiny.error and "too short" in tiny.error and not tiny.neighbours
    assert unknown.error and "no indexed image" in unknown.error
    with pytest.raises(StoreError, match="no space 'vae_mu'"):
        query_ids(store, [image_id], space="vae_mu")


def test_exact_duplicate_under_another_id_stays_a_neighbour(tmp_path: Path) -> None:
    """Leaving the image out goes by id: a near-identical re-encode (its own id) is still found first."""
    from PIL import Image

    photo = sample_photos(1)[0]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(photo, src / "a.jpg")
    Image.open(photo).convert("RGB").save(src / "b.png")  # same pixels, other bytes → other id
    for p in sample_photos(6, step=171)[1:]:
        shutil.copy(p, src / p.name)
    run_index([src], tmp_path / "store", progress=False, workers=0)
    store = Store.open(tmp_path / "store")
    by_name = store.images.assign(name=store.images["relpath"].map(lambda r: Path(r).name)).set_index("name")["id"]
    res = query_ids(store, [by_name["a.jpg"]], k=3, exclude_self=True)[0]
    assert res.neighbours[0].id == by_name["b.png"] and res.neighbours[0].similarity > 0.99
    assert by_name["a.jpg"] not in [n.id for n in res.neighbours]


def test_new_image_file_votes_through_the_library(pets_store: Path) -> None:
    store = Store.open(pets_store)
    photo = sample_photos(1, step=53)[0]
    res = query_images(store, [photo], k=5)[0]
    assert res.kind == "image" and Path(res.neighbours[0].path) == photo.resolve()
    assert res.breed_votes[0].breed == photo.parent.name


def test_text_prompts_rank_images_by_cosine_to_the_text_tower(clip_store: tuple[Path, str, list[Path]]) -> None:
    store_path, name, _ = clip_store
    store = Store.open(store_path)
    encoder = load_encoder(name)
    prompts = ["a photo of a pug", "a fluffy persian cat"]
    results = query_texts(store, prompts, k=5, encoder=encoder)
    assert encoder.encode_text is not None
    text = unit_rows(encoder.encode_text(prompts).numpy())
    sp = store.space(schema.ENCODER_SPACE)
    for prompt, res, t in zip(prompts, results, text, strict=True):
        assert res.error is None and res.kind == "text" and res.query == prompt
        # The brute-force cosine ranking of every stored vector against the prompt's text embedding.
        sims = sp.vectors @ t
        expected = [sp.ids[i] for i in np.argsort(-sims, kind="stable")[:5]]
        assert [n.id for n in res.neighbours] == expected
        assert np.allclose([n.similarity for n in res.neighbours], np.sort(sims)[::-1][:5], atol=1e-5)
        assert res.breed_votes  # every clip_store photo is labelled
    assert results[0].neighbours != results[1].neighbours

    empty = query_texts(store, ["  "], k=5, encoder=encoder)[0]
    assert empty.error == "empty prompt" and not empty.neighbours


def test_text_prompts_are_refused_where_they_mean_nothing(pets_store: Path,
                                                          clip_store: tuple[Path, str, list[Path]]) -> None:
    with pytest.raises(StoreError, match="no text tower"):
        query_texts(Store.open(pets_store), ["a pug"])
    with pytest.raises(StoreError, match="encoder' space only"):
        query_texts(Store.open(clip_store[0]), ["a pug"], space="mapper_id")


def test_cli_query_by_id_and_text(pets_store: Path, clip_store: tuple[Path, str, list[Path]],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = Store.open(pets_store)
    image_id = _labelled_ids(store, 1)[0]
    assert cli(["query", "--store", str(pets_store), "--id", image_id[:12], "-k", "4", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    (res,) = out["results"]
    assert res["kind"] == "id" and res["query"] == image_id[:12] and len(res["neighbours"]) == 4
    assert image_id not in [n["id"] for n in res["neighbours"]]

    assert cli(["query", "--store", str(pets_store), "--id", image_id, "--include-self", "-k", "2", "-q"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"== id {image_id}") and "breed vote:" in text

    assert cli(["query", "--store", str(pets_store), "--id", "0" * 64, "-q"]) == 1  # ran, one query failed
    capsys.readouterr()
    assert cli(["query", "--store", str(pets_store), "--text", "a pug", "-q"]) == 2  # no text tower: usage error
    assert "no text tower" in capsys.readouterr().err
    assert cli(["query", "--store", str(pets_store), "-q"]) == 2
    assert "nothing to query" in capsys.readouterr().err

    clip_path = clip_store[0]
    assert cli(["query", "--store", str(clip_path), "--text", "a pug", "--text", "a cat", "-k", "3", "--json",
                "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in out["results"]] == ["text", "text"]
    assert all(len(r["neighbours"]) == 3 for r in out["results"])


def test_held_out_votes_skip_unlabelled_photos_and_the_original() -> None:
    # The query's own original (row 0) and an unlabelled twin (row 1) are nearer than the only labelled photo.
    gallery = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]], dtype=np.float32)
    votes = labelled_votes(gallery, ["cat", None, "dog"], ["a", "b", "c"], gallery[:1], ["a"], k=1)
    assert votes == ["dog"]
    assert labelled_votes(gallery, [None, None, None], ["a", "b", "c"], gallery[:1], ["a"]) == [None]


def test_held_out_species_vote_beats_the_majority_in_a_mostly_unlabelled_store(pets_store: Path) -> None:
    # The 11k shared photos hold 1k labelled ones: a vote among the k nearest photos of all kinds found no label
    # for most queries and scored species agreement 0.39, under the 0.52 majority rate.
    store = Store.open(pets_store)
    sp = store.space(schema.ENCODER_SPACE)
    species = store.images.set_index("id").loc[sp.ids, "species"].to_numpy(dtype=object)
    rng = np.random.default_rng(0)
    hidden = rng.random(len(species)) < 0.9
    gallery_labels = np.where(hidden, None, species)
    queries = np.flatnonzero(~hidden)[:100]
    votes = labelled_votes(sp.vectors, gallery_labels, sp.ids, sp.vectors[queries], [sp.ids[q] for q in queries])
    truth = species[queries]
    accuracy = float(np.mean([v == t for v, t in zip(votes, truth, strict=True)]))
    majority = max(np.mean(truth == "cat"), np.mean(truth == "dog"))
    assert accuracy >= 0.9 and accuracy > majority + 0.2, (accuracy, majority)
