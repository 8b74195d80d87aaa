"""Error responses: 422s that name the field and the rule (and never fail to render: a NaN input must not become a
500), and 503 when Redis cannot be reached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

# Locations FastAPI puts before the field path; the field path alone is what a client recognises.
_SOURCES = ("body", "query", "path", "header", "cookie")


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": [describe(err) for err in exc.errors()]})


async def redis_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RedisError)
    return JSONResponse(status_code=503, content={"detail": f"Redis unreachable: {exc}"}, headers={"Retry-After": "5"})


def describe(err: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's error shape (loc, msg, type) with a message such as "steps: Input should be greater than or
    equal to 1, got 0". The input is summarised in the message, not echoed (it may be 20,000 chars, or NaN)."""
    loc: Sequence[Any] = err["loc"]
    path = [str(p) for p in (loc[1:] if loc and loc[0] in _SOURCES else loc)]
    field = ".".join(path) if path and err["type"] != "json_invalid" else "body"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not msg.startswith(field):
        msg = f"{field}: {msg}"
    if err["type"] == "json_invalid":
        msg += f" ({err.get('ctx', {}).get('error', 'not valid JSON')})"
    elif err["type"] not in ("missing", "value_error") and "input" in err:
        msg += f", got {_summary(err['input'])}"
    return {"loc": list(loc), "msg": msg, "type": err["type"]}


def _summary(value: object) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a {len(value):,}-character string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)  # numbers, booleans, None: short, and repr(nan) == 'nan' is valid text
