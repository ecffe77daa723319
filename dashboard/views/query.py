"""Query: the nearest indexed photos and a breed vote for an indexed photo or an uploaded one, in any space, or for
a text prompt (open_clip stores)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import streamlit as st

from dashboard import state, widgets
from dashboard.settings import MAX_UPLOAD_MB, UPLOAD_TYPES
from indexer.store import StoreError, schema

if TYPE_CHECKING:
    from analysis.neighbours import Neighbour


def upload_problem(size: int) -> str | None:
    """Why an upload of ``size`` bytes is refused, or None.  Checked here as well as by the widget's own limit,
    because a client other than the browser can send anything."""
    if size > MAX_UPLOAD_MB * 2**20:
        # Rounded up, so a file just over the limit never reads as "20.0 MB; up to 20 MB accepted".
        shown = math.ceil(size / 2**20 * 10) / 10
        return f"The file is too large ({shown:.1f} MB); photos up to {MAX_UPLOAD_MB} MB are accepted."
    if size == 0:
        return "The file is empty."
    return None


def _uploaded_neighbours(key: state.StoreKey, space: str, k: int) -> list[Neighbour] | None:
    file = st.file_uploader("Photo", type=list(UPLOAD_TYPES), key="query-upload", max_upload_size=MAX_UPLOAD_MB)
    if file is None:
        st.caption(f"JPEG, PNG, WebP or GIF, up to {MAX_UPLOAD_MB} MB.")
        return None
    problem = upload_problem(file.size)
    if problem:
        st.error(problem)
        return None
    data = file.getvalue()
    try:
        with st.spinner("Embedding the photo…"):
            result = state.neighbours_of_upload(key, data, file.name, space, k)
    except StoreError as e:
        st.error(str(e))
        return None
    if result.error:
        st.error(f"Could not read {widgets.plain(file.name)}: {result.error}.")
        return None
    # The decoded, downsized photo is shown, never the uploaded bytes themselves.
    st.image(state.upload_preview(data, file.name), caption=file.name, width=160)
    return result.neighbours


def _text_neighbours(key: state.StoreKey, k: int) -> list[Neighbour] | None:
    prompt = st.text_input("Prompt", key="query-text", placeholder="a photo of a sleeping tabby cat",
                           max_chars=300)
    if not prompt.strip():
        st.caption("Searches the encoder space with the open_clip text tower.")
        return None
    try:
        with st.spinner("Embedding the prompt…"):
            return state.neighbours_of_text(key, prompt.strip(), k)
    except StoreError as e:
        st.error(str(e))
        return None


def render() -> None:
    """Choose the query (indexed photo, upload or text prompt) and the space; show neighbours and the breed vote."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Query")
    spaces = store.space_names()
    sources = ["Indexed photo", "Upload"]
    if state.accepts_text(key):
        sources.append("Text prompt")
    c1, c2, c3 = st.columns([2, 2, 1])
    source = c1.radio("Query", sources, horizontal=True, key="query-source")
    if source == "Text prompt":  # only the encoder space shares the text tower's embedding space
        spaces = [schema.ENCODER_SPACE]
    space = c2.selectbox("Space", spaces, index=spaces.index("encoder") if "encoder" in spaces else 0,
                         key="query-space")
    k = int(c3.number_input("Neighbours (k)", 1, 100, 12, key="query-k"))

    picker, results = st.columns([1, 2], gap="large")
    with picker:
        if source == "Upload":
            found = _uploaded_neighbours(key, space, k)
        elif source == "Text prompt":
            found = _text_neighbours(key, k)
        else:
            with st.expander("Pick from a gallery"):
                widgets.gallery_picker(key, store, widget_key="query-gallery", target="query-image")
            image_id = widgets.image_picker(key, "Indexed photo", widget_key="query-image")
            # On by default: a vote that counts the photo itself always leans towards its own breed.
            leave_out = st.checkbox("Leave the photo itself out", value=True, key="query-exclude-self",
                                    help="Neighbours and breed vote from the other indexed photos only.")
            row = widgets.store_images(store, [image_id]).iloc[0]
            st.image(state.thumbnail(key, image_id, 240), caption=f"{row['relpath']} · {widgets.label_of(row)}",
                     width=160)
            found = state.neighbours_of_indexed(key, image_id, space, k, leave_out)
    if found is None:
        return
    if not found:
        results.info("The space holds no images.")
        return
    with picker:  # under the query photo: the vote and the photo it is about are read together
        widgets.breed_vote_chart(state.votes(found), key="query-votes", top=6)
    with results:
        st.subheader(f"Nearest {len(found)} in `{space}`")
        widgets.neighbour_gallery(key, found, width=110)
    st.dataframe(widgets.neighbour_table(found), hide_index=True)
