"""Cross-origin access for browser pages on other origins (`SDQ_CORS_ORIGINS`), off when no origin is set.

API keys travel in the `Authorization` header, never in cookies, so credentials stay off: an origin list of `*`
then lets any page call the API with the key its user typed in, and no page rides on another's cookies.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from api.request_id import HEADER as REQUEST_ID

# What a page may send and read beyond the CORS-safelisted headers.
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Last-Event-ID", REQUEST_ID)
EXPOSED_HEADERS = ("Location", "Retry-After", REQUEST_ID, "Idempotent-Replayed", "Preference-Applied")
METHODS = ("GET", "HEAD", "POST")
MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer


def add_cors(app: FastAPI, origins: list[str]) -> None:
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=METHODS, allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS, allow_credentials=False, max_age=MAX_AGE_S,
        )
