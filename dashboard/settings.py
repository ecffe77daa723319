"""Limits of the dashboard, in one light module (the `mammals dashboard` launcher reads them without importing
the app's heavy dependencies)."""

from __future__ import annotations

# Uploads on the Query page: the widget, the server (--server.maxUploadSize) and the page's own check agree.
MAX_UPLOAD_MB = 20
UPLOAD_TYPES: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif")
