"""Query: the nearest indexed photos and a breed vote for an uploaded photo or an indexed one, in any space."""

from __future__ import annotations

import math

import streamlit as st

from dashboard import state, widgets
from dashboard.settings import MAX_UPLOAD_MB, UPLOAD_TYPES
from indexer.images import ImageError
from indexer.query import Neighbour
from indexer.store import StoreError


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
            found = state.neighbours_of_upload(key, data, file.name, space, k)
    except ImageError as e:
        st.error(f"Could not read {widgets.plain(file.name)}: {e.reason}.")
        return None
    except StoreError as e:
        st.error(str(e))
        return None
    # The decoded, downsized photo is shown, never the uploaded bytes themselves.
    st.image(state.upload_preview(data, file.name), caption=file.name, width=160)
    return found


def render() -> None:
    """Choose the query (upload or indexed photo) and the space; show neighbours and the breed vote."""
    key = state.current_key()
    store = state.store_for(key)
    st.title("Query")
    spaces = store.space_names()
    c1, c2, c3 = st.columns([2, 2, 1])
    source = c1.radio("Query photo", ["Indexed photo", "Upload"], horizontal=True, key="query-source")
    space = c2.selectbox("Space", spaces, index=spaces.index("encoder") if "encoder" in spaces else 0,
                         key="query-space")
    k = int(c3.number_input("Neighbours (k)", 1, 100, 12, key="query-k"))

    picker, results = st.columns([1, 2], gap="large")
    with picker:
        if source == "Upload":
            found = _uploaded_neighbours(key, space, k)
        else:
            image_id = widgets.image_picker(key, "Indexed photo", widget_key="query-image")
            row = widgets.store_images(store, [image_id]).iloc[0]
            st.image(state.thumbnail(key, image_id, 240), caption=f"{row['relpath']} · {widgets.label_of(row)}",
                     width=160)
            found = state.neighbours_of_indexed(key, image_id, space, k)
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
