"""Latent explorer: VAE interpolation between two photos (next to the photos and their reconstructions), the
mapper's path between them with its breed classifier's reading, and identity/attribute swaps both ways.

Each model's section opens with what its own validation report says is weak, in words, so that a weak model's
pictures are not taken for findings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from dashboard import state, widgets
from indexer.store import Store, StoreError

if TYPE_CHECKING:
    from analysis.latent import PathStep

PATH_NEIGHBOURS = 10  # nearest photos per mapper path step: the first is shown, all of them vote
SWAP_NEIGHBOURS = 10


def _default_b(store: Store, relpaths: list[str], by_rel: dict[str, str], id_a: str) -> int:
    """Index (in the picker's order) of the first photo of another breed than a's: a more telling default pair."""
    breed = store.images.set_index("id")["breed"]
    a_breed = breed.get(id_a)
    for i, rel in enumerate(relpaths[:widgets.MAX_PICKER_OPTIONS]):
        if breed.get(by_rel[rel]) != a_breed:
            return i
    return min(1, len(relpaths) - 1)


def _label(store: Store, image_id: str) -> str:
    """A photo's breed, else its species, else "unlabelled"."""
    rows = store.images[store.images["id"] == image_id]
    label = widgets.label_of(rows.iloc[0]) if len(rows) else "?"
    return "unlabelled" if label == "?" else label


def _train_hint(path: str, model: str) -> str:
    return (f"No trained {model} in this store. Run `mammals train {model} --store {path}` "
            f"(then `mammals index --store {path}` for its spaces) to use this section.")


def _warn(key: state.StoreKey, model: str) -> None:
    for text in state.model_warnings(key, model):
        st.warning(text, icon="⚠️")


def _pct(q: float) -> str:
    return f"{q:.0%}" if q >= 0.005 else "<1%"


def strip_captions(steps: int) -> list[str]:
    """Captions of the VAE strip: photo a, its reconstruction (t=0), the path, b's reconstruction (t=1), photo b."""
    inner = [f"t={i / (steps - 1):.2f}" for i in range(1, steps - 1)]
    return ["a: photo (VAE input)", "a: reconstruction (t=0)", *inner, "b: reconstruction (t=1)",
            "b: photo (VAE input)"]


def _vae_section(key: state.StoreKey, id_a: str, id_b: str) -> None:
    st.subheader("VAE interpolation")
    _warn(key, "vae")
    c1, c2 = st.columns(2)
    mode = c1.radio("Path", ["linear", "slerp"], horizontal=True, key="latent-vae-mode",
                    help="slerp follows the great circle, which keeps the latent norm typical of real photos")
    steps = int(c2.slider("Steps", 3, 16, 8, key="latent-vae-steps"))
    with st.spinner("Decoding…"):
        strip = state.vae_strip(key, id_a, id_b, steps, mode)
        original_a, original_b = state.vae_originals(key, id_a, id_b)
    st.image([original_a, *strip, original_b], caption=strip_captions(len(strip)), width=96)
    st.caption("At the ends: photos a and b as the VAE takes them in (its input size, centre crop). Next to each, "
               "its reconstruction, decoded from the posterior mean, where the interpolation starts (t=0) and ends "
               "(t=1): the difference between a photo and its reconstruction is what the VAE loses before any "
               "interpolation.")


def _path_table(path: list[PathStep], stop_of: dict[int, str]) -> pd.DataFrame:
    rows = []
    for p in path:
        vote = p.breed_votes[0] if p.breed_votes else None
        rows.append({
            "step": p.step,
            "t": round(p.t, 2),
            "classifier (top breeds)": " · ".join(f"{b} {_pct(q)}" for b, q in p.top_breeds(3)),
            "neighbour vote": f"{vote.breed} {vote.share:.0%}" if vote else "(no labelled neighbours)",
            "nearest photo": stop_of.get(p.step, "—"),
        })
    return pd.DataFrame(rows)


def _mapper_path(key: state.StoreKey, store: Store, id_a: str, id_b: str) -> None:
    st.subheader("Mapper path")
    _warn(key, "mapper")  # the whole mapper's: its swaps below too
    st.caption("Points along the mapper's path from a to b (identity on the sphere, attributes on a line), decoded to "
               "the encoder space. Step 0 is a as the mapper reconstructs it, the last step b. Per step: the "
               "mapper's frozen breed classifier's reading and the breed vote of the "
               f"{PATH_NEIGHBOURS} nearest indexed photos. "
               f"Labels: a is {_label(store, id_a)}, b is {_label(store, id_b)}.")
    steps = int(st.slider("Steps", 3, 16, 8, key="latent-mapper-steps"))
    with st.spinner("Walking the mapper's latent path…"):
        path = state.mapper_path_steps(key, id_a, id_b, steps, PATH_NEIGHBOURS)
    stops = state.distinct_nearest(path)
    stop_of = {s: f"#{i} {n.neighbour.breed or n.neighbour.species or '?'}"
               for i, n in enumerate(stops, start=1) for s in n.steps}
    st.dataframe(_path_table(path, stop_of), hide_index=True)
    widgets.breed_probability_chart([p.probabilities for p in path], key="latent-path-probabilities")
    st.markdown("**Nearest photos along the path**, each once, with the steps it is nearest to:")
    widgets.gallery(key, [s.neighbour.id for s in stops],
                    [f"#{i} · {s.step_label}: {s.neighbour.breed or s.neighbour.species or '?'}"
                     for i, s in enumerate(stops, start=1)], width=110)


def _swap(key: state.StoreKey, store: Store, id_i: str, id_x: str, names: tuple[str, str], widget: str) -> None:
    """Identity of photo ``id_i`` (named ``names[0]``), attributes of ``id_x`` (``names[1]``)."""
    ni, nx = names
    st.markdown(f"**Identity of {ni} ({_label(store, id_i)}), attributes of {nx} ({_label(store, id_x)})**")
    with st.spinner("Swapping…"):
        swap = state.mapper_swap(key, id_i, id_x, SWAP_NEIGHBOURS)
    top = swap.top_breeds
    reading = f"The mapper's breed classifier reads the swap as **{swap.classifier_breed}**"
    if top:
        reading += f" ({_pct(top[0][1])}" + "".join(f"; {b} {_pct(q)}" for b, q in top[1:]) + ")"
    if swap.identity_breed is None:
        reading += f". {ni.capitalize()} has no breed label to compare it with."
    elif swap.classifier_breed == swap.identity_breed:
        reading += f": {ni}'s breed, as a swap that keeps {ni}'s identity should."
    else:
        reading += f", not {ni}'s breed ({swap.identity_breed}): this swap lost {ni}'s identity."
    st.markdown(reading)
    left, right = st.columns([3, 2])
    with left:
        widgets.neighbour_gallery(key, swap.neighbours, width=110)
    with right:
        widgets.breed_vote_chart(swap.breed_votes, key=widget)


def _mapper_sections(key: state.StoreKey, store: Store, id_a: str, id_b: str) -> None:
    _mapper_path(key, store, id_a, id_b)
    st.subheader("Identity / attribute swaps")
    st.caption("Breed identity of one photo with the pose and appearance of the other, decoded to the encoder space; "
               "the nearest indexed photos and their breed vote. The classifier is the one the mapper's swaps were "
               "trained to satisfy, so its reading is the mapper's own exam: the neighbours' vote is the independent "
               "check.")
    _swap(key, store, id_a, id_b, ("a", "b"), "latent-swap-votes-ab")
    _swap(key, store, id_b, id_a, ("b", "a"), "latent-swap-votes-ba")


def render() -> None:
    """Two photos, then whichever of the VAE and mapper sections this store's models allow."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Latent explorer")
    models = state.trained_models(store)
    if not models:
        st.info("This page needs trained models. Run `mammals train vae --store "
                f"{key.path}` and/or `mammals train mapper --store {key.path}`, then `mammals index --store "
                f"{key.path}`.")
        return

    relpaths, by_rel = state.relpath_index(key.path, key.version)
    pick_a, thumb_a, pick_b, thumb_b = st.columns([3, 1, 3, 1])
    with pick_a:
        id_a = widgets.image_picker(key, "Photo a", widget_key="latent-a")
    thumb_a.image(state.thumbnail(key, id_a), width=110)
    with pick_b:
        id_b = widgets.image_picker(key, "Photo b", widget_key="latent-b",
                                    default_index=_default_b(store, relpaths, by_rel, id_a))
    thumb_b.image(state.thumbnail(key, id_b), width=110)

    try:
        if "vae" in models:
            _vae_section(key, id_a, id_b)
        else:
            st.info(_train_hint(key.path, "vae"))
        if "mapper" in models:
            _mapper_sections(key, store, id_a, id_b)
        else:
            st.info(_train_hint(key.path, "mapper"))
    except StoreError as e:  # e.g. weights missing or changed on disk: the message says how to fix it
        st.error(str(e))
