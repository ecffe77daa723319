"""A small client of `mammals serve` (standard library only), for scripts and notebooks on any machine.

    from analysis.client import Client
    c = Client("http://127.0.0.1:8000")
    hits = c.query_image("my_cat.jpg", k=5)["results"][0]["neighbours"]

Every method returns the server's JSON (the shape of `mammals query --json`) or raises :class:`ServiceError` with
the HTTP status and the server's one-line reason.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ServiceError(Exception):
    """The server refused a request: ``status`` (HTTP) and ``detail`` (its one-line reason)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    """Calls one `mammals serve` server at ``url``; ``token`` when it was started with one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: bytes | None = None,
                 content_type: str | None = None) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        req = urllib.request.Request(self.url + path + query, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = str(json.loads(raw).get("detail", raw[:200]))
            except (ValueError, AttributeError):
                detail = raw[:200].decode("utf-8", "replace")
            raise ServiceError(e.code, detail) from None

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._request(method, path, **kwargs))
        return out

    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def info(self) -> dict[str, Any]:
        """The served store: version, encoder, spaces, counts."""
        return self._json("GET", "/info")

    def query_image(self, photo: str | Path | bytes, *, k: int = 10, space: str = "encoder",
                    filename: str | None = None) -> dict[str, Any]:
        """Nearest indexed photos of a photo file (or its bytes)."""
        if isinstance(photo, bytes):
            data, name = photo, filename or "upload.jpg"
        else:
            data, name = Path(photo).read_bytes(), filename or Path(photo).name
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        safe_name = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{safe_name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return self._json("POST", "/query/image", params={"k": k, "space": space}, body=body,
                          content_type=f"multipart/form-data; boundary={boundary}")

    def query_text(self, texts: Sequence[str], *, k: int = 10, space: str = "encoder") -> dict[str, Any]:
        """Nearest indexed photos of text prompts (open_clip stores)."""
        body = json.dumps({"texts": list(texts), "k": k, "space": space}).encode()
        return self._json("POST", "/query/text", body=body, content_type="application/json")

    def query_vector(self, vectors: Sequence[Sequence[float]], *, k: int = 10,
                     space: str = "encoder") -> dict[str, Any]:
        """Nearest indexed photos of vectors in a space."""
        body = json.dumps({"vectors": [[float(x) for x in v] for v in vectors], "k": k, "space": space}).encode()
        return self._json("POST", "/query/vector", body=body, content_type="application/json")

    def neighbours(self, image_id: str, *, k: int = 10, space: str = "encoder",
                   include_self: bool = False) -> dict[str, Any]:
        """Nearest photos of an indexed photo (id or a unique prefix of 6+ characters)."""
        return self._json("GET", f"/neighbours/{urllib.parse.quote(image_id, safe='')}",
                          params={"k": k, "space": space, "include_self": str(include_self).lower()})

    def image(self, image_id: str) -> dict[str, Any]:
        """An indexed photo's metadata."""
        return self._json("GET", f"/images/{urllib.parse.quote(image_id, safe='')}")

    def thumbnail(self, image_id: str, side: int = 256) -> bytes:
        """A JPEG thumbnail of an indexed photo."""
        return self._request("GET", f"/thumbnails/{urllib.parse.quote(image_id, safe='')}", params={"side": side})
