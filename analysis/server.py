"""`mammals serve`: an HTTP query service over one store (FastAPI; OpenAPI docs at ``/docs``).

The store, its search indexes, its encoder and its trained models are loaded once; queries run through the
functions `mammals query` runs (:mod:`analysis.neighbours`) and answer in its JSON shape
(:data:`analysis.neighbours.QUERY_JSON_SCHEMA`). A new store version (an index run committed) is noticed on the
next request: the new state is built aside and swapped in under a lock, while requests already running finish on
the one they started with.

Bad input is a 4xx with a one-line ``detail``, never a 500: uploads over the size limit (413), files that are not
images or are decompression bombs (400, the indexer's own decoder and reasons), unknown ids (404), ``k`` out of
range and malformed bodies (422). With a token, every endpoint but ``/healthz`` needs ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from indexer import defaults
from indexer.encoders import Encoder, EncoderError, resolve_device
from indexer.images import ImageError, decode_image
from indexer.latents import TrainedModels, load_trained_models
from indexer.store import Store, StoreError, schema

MAX_UPLOAD_BYTES = int(defaults.SERVE_MAX_UPLOAD_MB * 2**20)
MAX_K = 1000
THUMB_SIDE = 256
TOKEN_ENV = defaults.SERVE_TOKEN_ENV


@dataclass
class _State:
    """One store version and everything loaded for it."""

    key: tuple[int, int]  # (inode, mtime_ns) of the manifest: a commit replaces the file (temp file + rename)
    store: Store
    encoder: Encoder
    models: TrainedModels | None
    device: torch.device
    sorted_ids: list[str]  # every image id, sorted: for id prefixes (analysis.neighbours.resolve_id)


def image_row(state: _State, image_id: str) -> dict[str, Any]:
    """An image's row from the frame searches already use: one frame of the images table per version, not a
    second one indexed by id (a million rows are ~0.5 GB each)."""
    lookup = state.store.image_lookup()
    row = lookup.frame.iloc[int(lookup.positions([schema.faiss_id_of(image_id)])[0])]
    return {str(c): v for c, v in row.items()}


def _manifest_key(path: Path) -> tuple[int, int]:
    st = (path / schema.MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns


class StoreService:
    """The loaded store; :meth:`current` returns the state of its newest published version."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        self.path = path
        self.device = resolve_device(device)
        self._lock = threading.Lock()
        self._state = self._load(None)

    def _load(self, old: _State | None) -> _State:
        from analysis.neighbours import encoder_for_store

        key = _manifest_key(self.path)
        store = Store.open(self.path)
        # The encoder never changes within a store (it is checked against the store's record); models may.
        encoder = old.encoder if old is not None else encoder_for_store(store, str(self.device))
        models = load_trained_models(store, self.device) if store.manifest.get("models") else None
        for space in store.space_names():  # open every index now, not in the first request that needs it
            store.vector_index(space).vectors_of([])  # and its id lookup (neighbours of an indexed photo)
            store.sorted_space_ids(space)
        store.image_lookup()  # the one images frame a request reads (searches map their hits through it)
        return _State(key, store, encoder, models, self.device, sorted(store.image_ids()))

    def current(self) -> _State:
        state = self._state
        try:
            key = _manifest_key(self.path)
        except OSError:
            return state  # mid-rename or unreadable for a moment: keep serving the version we have
        if key == state.key:
            return state
        with self._lock:
            if self._state.key != key:
                self._state = self._load(self._state)
            return self._state


class TextQuery(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=256)
    k: int = Field(defaults.K, ge=1, le=MAX_K)
    space: str = schema.ENCODER_SPACE


class VectorQuery(BaseModel):
    vectors: list[list[float]] = Field(min_length=1, max_length=256)
    k: int = Field(defaults.K, ge=1, le=MAX_K)
    space: str = schema.ENCODER_SPACE


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _finite(value: Any) -> Any:
    """JSON-safe scalars: NaN and missing values become null, numpy scalars plain Python."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
        if isinstance(value, pd.Timestamp):
            return value.isoformat()
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return value


def create_app(store_path: Path, *, token: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               device: str = "cpu") -> FastAPI:
    """The service's FastAPI app over the store at ``store_path`` (loaded now: a bad store fails at start)."""
    import faiss

    from analysis.neighbours import (
        QUERY_JSON_SCHEMA,
        QueryResult,
        breed_votes,
        check_space,
        query_ids,
        query_image,
        query_texts,
        resolve_id,
        search_vectors,
    )

    # A server searches one query at a time, which faiss's OpenMP threads do not speed up; left on, they spin
    # beside torch's and the request threads (measured on 2 cores: image queries 26 -> 45 req/s, 16 clients).
    faiss.omp_set_num_threads(1)
    # Photos are decoded and embedded on one thread, one at a time (torch uses every core for each forward), off
    # the event loop, so that id and vector queries are answered while a photo is being embedded.
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="mammals-model")

    def embed_and_search(state: _State, data: bytes, name: str, k: int, space: str) -> QueryResult:
        try:
            img = decode_image(data, name)
        except ImageError as e:
            raise HTTPException(400, f"{name}: {e.reason}") from None
        return query_image(state.store, name, img, k=k, space=space, encoder=state.encoder, models=state.models,
                           device=state.device)

    service = StoreService(store_path, device)
    app = FastAPI(title="Mammals Space", version="1",
                  description="Similarity search over a Mammals Space store: the HTTP face of `mammals query`.")

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # Every route but /healthz needs the token (when there is one).
    api = APIRouter(dependencies=[Depends(authorised)])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc)}, status_code=422)

    async def _refused(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc).splitlines()[0]}, status_code=400)

    app.add_exception_handler(StoreError, _refused)  # a request the store cannot answer (no such space...)
    app.add_exception_handler(EncoderError, _refused)

    def envelope(state: _State, space: str, k: int, results: list[QueryResult]) -> JSONResponse:
        # A response, not a dict: FastAPI would walk a returned dict again (jsonable_encoder) before encoding it,
        # which cost a third of an id query's server time.
        return JSONResponse({"schema": QUERY_JSON_SCHEMA, "store": str(store_path), "space": space,
                             "encoder": state.store.encoder["name"], "k": k,
                             "results": [r.as_dict() for r in results]})

    def resolve(state: _State, image_id: str) -> str:
        full, problem = resolve_id(state.sorted_ids, image_id.strip().lower())
        if not full:
            raise HTTPException(404, problem)
        return full

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (no token needed)."""
        return {"status": "ok"}

    @api.get("/info")
    def info() -> dict[str, Any]:
        """The store being served: version, encoder, spaces and counts."""
        state = service.current()
        m = state.store.manifest
        return {"store": str(store_path), "version": state.store.version, "encoder": m["encoder"],
                "images": len(state.store.images),
                "spaces": {n: {"dim": s.get("dim"), "count": s.get("count"), "kind": s.get("kind")}
                           for n, s in m.get("spaces", {}).items()},
                "models": sorted(m.get("models", {})), "updated_at": m.get("updated_at"),
                "text_queries": state.encoder.encode_text is not None}

    @api.post("/query/image")
    async def query_image_upload(
        file: Annotated[UploadFile, File(description="a photo (JPEG, PNG, WebP...)")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = defaults.K,
        space: str = schema.ENCODER_SPACE,
    ) -> JSONResponse:
        """Nearest indexed photos and breed votes for an uploaded photo."""
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        name = file.filename or "upload"
        state = service.current()
        check_space(state.store, space)  # a StoreError: 400 through the handler above
        result = await asyncio.get_running_loop().run_in_executor(model_thread, embed_and_search, state, data, name,
                                                                 k, space)
        return envelope(state, space, k, [result])

    @api.post("/query/text")
    def query_text(body: TextQuery) -> JSONResponse:
        """Nearest indexed photos of text prompts (stores built with an open_clip encoder)."""
        state = service.current()
        try:
            results = query_texts(state.store, body.texts, k=body.k, space=body.space, encoder=state.encoder,
                                  device=str(state.device))
        except StoreError as e:
            raise HTTPException(400, str(e).splitlines()[0]) from None
        return envelope(state, body.space, body.k, results)

    @api.post("/query/vector")
    def query_vector(body: VectorQuery) -> JSONResponse:
        """Nearest indexed photos of vectors already in a space (cosine; they need not be normalised)."""
        state = service.current()
        check_space(state.store, body.space)
        dim = int(state.store.manifest["spaces"][body.space]["dim"])
        if any(len(v) != dim for v in body.vectors):  # before numpy, which refuses ragged lists with a ValueError
            raise HTTPException(422, f"vectors: space {body.space!r} has {dim} dimensions")
        with np.errstate(over="ignore"):  # a float beyond float32's range becomes inf, refused just below
            vectors = np.asarray(body.vectors, dtype=np.float32)
        if not np.isfinite(vectors).all() or not np.abs(vectors).max(axis=1).all():
            raise HTTPException(422, "vectors: every vector must be finite and non-zero")
        # Cosine ignores scale: bring every row to max |x| = 1 so that its norm cannot overflow float32.
        vectors = vectors / np.abs(vectors).max(axis=1, keepdims=True)
        found = search_vectors(state.store, vectors, k=body.k, space=body.space)
        results = [QueryResult(f"vector {i}", nbrs, breed_votes(nbrs), kind="vector") for i, nbrs in enumerate(found)]
        return envelope(state, body.space, body.k, results)

    @api.get("/neighbours/{image_id}")
    def neighbours(image_id: str, k: Annotated[int, Query(ge=1, le=MAX_K)] = defaults.K,
                   space: str = schema.ENCODER_SPACE, include_self: bool = False) -> JSONResponse:
        """Nearest photos of an indexed photo, by id or a unique prefix of 6+ characters."""
        state = service.current()
        check_space(state.store, space)  # a StoreError: 400 through the handler above
        (result,) = query_ids(state.store, [image_id], k=k, space=space, exclude_self=not include_self)
        if result.error:
            raise HTTPException(404, result.error)
        return envelope(state, space, k, [result])

    @api.get("/images/{image_id}")
    def image(image_id: str) -> dict[str, Any]:
        """An indexed photo's metadata row (labels, size, source path, when indexed)."""
        state = service.current()
        full = resolve(state, image_id)
        row = image_row(state, full)
        return {"id": full, **{str(c): _finite(v) for c, v in row.items() if c != "id"}}

    @api.get("/thumbnails/{image_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(image_id: str,
                  side: Annotated[int, Query(ge=16, le=1024)] = THUMB_SIDE) -> Response:
        """A JPEG thumbnail of an indexed photo. Only photos the store holds, found by id: nothing a client sends
        becomes a path."""
        from analysis.photos import thumbnail as make_thumbnail

        state = service.current()
        full = resolve(state, image_id)
        path = str(image_row(state, full)["path"])
        img = make_thumbnail(path, side)
        if isinstance(img, str):
            raise HTTPException(404, f"indexed photo {full[:12]} cannot be read now: {img}")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")

    app.include_router(api)
    return app


def app_from_env() -> FastAPI:
    """The app of a uvicorn worker process (``--workers N``): its settings come from the environment."""
    return create_app(Path(os.environ["MAMMALS_SERVE_STORE"]), token=os.environ.get(TOKEN_ENV) or None,
                      max_upload_bytes=int(os.environ.get("MAMMALS_SERVE_MAX_UPLOAD", MAX_UPLOAD_BYTES)),
                      device=os.environ.get("MAMMALS_SERVE_DEVICE", "cpu"))
