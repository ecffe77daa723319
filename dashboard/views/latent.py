"""Latent explorer: VAE interpolation between two photos, the mapper's path between them, identity/attribute swap."""

from __future__ import annotations

import streamlit as st

from dashboard import state, widgets
from indexer.store import Store, StoreError


def _default_b(store: Store, relpaths: list[str], by_rel: dict[str, str], id_a: str) -> int:
    """Index (in the picker's order) of the first photo of another breed than a's: a more telling default pair."""
    breed = store.images.set_index("id")["breed"]
    a_breed = breed.get(id_a)
    for i, rel in enumerate(relpaths[:widgets.MAX_PICKER_OPTIONS]):
        if breed.get(by_rel[rel]) != a_breed:
            return i
    return min(1, len(relpaths) - 1)


def _train_hint(path: str, model: str) -> str:
    return (f"No trained {model} in this store. Run `mammals train {model} --store {path}` "
            f"(then `mammals index --store {path}` for its spaces) to use this section.")


def _vae_section(key: state.StoreKey, id_a: str, id_b: str) -> None:
    st.subheader("VAE interpolation")
    c1, c2 = st.columns(2)
    mode = c1.radio("Path", ["linear", "slerp"], horizontal=True, key="latent-vae-mode",
                    help="slerp follows the great circle, which keeps the latent norm typical of real photos")
    steps = int(c2.slider("Steps", 3, 16, 8, key="latent-vae-steps"))
    with st.spinner("Decoding…"):
        strip = state.vae_strip(key, id_a, id_b, steps, mode)
    st.image(strip, caption=[f"t={i / (len(strip) - 1):.2f}" for i in range(len(strip))], width=96)


def _mapper_sections(key: state.StoreKey, id_a: str, id_b: str) -> None:
    st.subheader("Mapper path")
    st.caption("Points along the mapper's path from a to b (identity on the sphere, attributes on a line), each "
               "shown as its nearest indexed photo.")
    steps = int(st.slider("Steps", 3, 16, 8, key="latent-mapper-steps"))
    with st.spinner("Walking the mapper's latent path…"):
        path = state.mapper_path(key, id_a, id_b, steps, 3)
    firsts = [p[0] for p in path if p]
    widgets.gallery(key, [n.id for n in firsts],
                    [f"{i}: {n.breed or n.species or '?'} ({n.similarity:.2f})" for i, n in enumerate(firsts)],
                    width=110)

    st.subheader("Identity / attribute swap")
    st.caption("Breed identity of a with the pose and appearance of b, decoded to the encoder space.")
    with st.spinner("Swapping…"):
        swap = state.mapper_swap(key, id_a, id_b, 10)
    st.markdown(f"The mapper's breed classifier reads the swap as **{swap.classifier_breed}**.")
    left, right = st.columns([3, 2])
    with left:
        widgets.neighbour_gallery(key, swap.neighbours, width=110)
    with right:
        widgets.breed_vote_chart(swap.breed_votes, key="latent-swap-votes")


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
            _mapper_sections(key, id_a, id_b)
        else:
            st.info(_train_hint(key.path, "mapper"))
    except StoreError as e:  # e.g. weights missing or changed on disk: the message says how to fix it
        st.error(str(e))
