"""One error shape for every failed request: ``{"error": {"type", "message", "field"}}``.

`type` is a stable machine-readable category (the table `ERRORS`), `message` a sentence for people that names the
value and the rule, `field` the request field at fault (dotted path, or a header name) or null. Routes raise
`ApiError`; FastAPI's own errors (validation, unknown route, wrong method) and Redis outages are converted here, so
no response ever has another shape. `responses()` documents the same in each route's OpenAPI entry. The one
exception is a compatibility layer's own paths, where `add_error_shape` renders the same errors in the shape its
clients parse (OpenAI's `{"error": {"message", "type", "param", "code"}}` on `/v1/images/generations` ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.request_id import HEADER as REQUEST_ID_HEADER
from core import logs

# Locations FastAPI puts before the field path; the field path alone is what a client recognises.
_SOURCES = ("body", "query", "path", "header", "cookie")


# The closed set of `type` values (an enum in the OpenAPI spec); `ERRORS` says which status answers each.
ErrorType = Literal[
    "bad_request", "unauthorized", "forbidden", "not_found", "method_not_allowed", "conflict", "idempotency_conflict",
    "payload_too_large", "invalid_request", "rate_limited", "too_many_queued", "internal_error", "queue_full",
    "unavailable",
]
ERROR_TYPES: tuple[ErrorType, ...] = get_args(ErrorType)


class ErrorInfo(BaseModel):
    type: ErrorType = Field(description="Stable category for code to branch on (e.g. `rate_limited`); the README's "
                                        "error table says when each one is answered.")
    message: str = Field(description="What is wrong and the rule, for people.")
    field: str | None = Field(default=None, description="The request field at fault (dotted path or header), if any.")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """Raise from a route or dependency to answer with `status_code` and the error shape."""

    def __init__(self, status_code: int, type: ErrorType, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(type=type, message=message, field=field)
        self.headers = dict(headers or {})


# status -> (default type, OpenAPI description, {type: example message}). The README's error table mirrors this.
ERRORS: dict[int, tuple[ErrorType, str, dict[ErrorType, str]]] = {
    400: ("bad_request", "The request cannot be read.", {"bad_request": "image key '../x' is not a storage key"}),
    401: ("unauthorized", "No API key, or an unknown one: send `Authorization: Bearer <key>`.",
          {"unauthorized": "missing API key: send 'Authorization: Bearer <key>'"}),
    403: ("forbidden", "The API key may not do this.",
          {"forbidden": "priority 'high' is not allowed for API key 'alice' (its highest is 'normal')"}),
    404: ("not_found", "No such job (or it expired, or another API key owns it).", {"not_found": "no job 'f00'"}),
    405: ("method_not_allowed", "Wrong HTTP method for this path.", {"method_not_allowed": "Method Not Allowed"}),
    409: ("conflict", "The request conflicts with the job's state or an earlier request.", {
        "conflict": "job 0e1f already succeeded; nothing to cancel",
        "idempotency_conflict": "Idempotency-Key 'order-42' was used with a different request body",
    }),
    413: ("payload_too_large", "The request body exceeds SDQ_MAX_BODY_BYTES.",
          {"payload_too_large": "request body exceeds 33554432 bytes (SDQ_MAX_BODY_BYTES)"}),
    422: ("invalid_request", "A field breaks a rule; nothing was queued.",
          {"invalid_request": "width must be a multiple of 8, got 513"}),
    429: ("rate_limited", "Too many requests for this API key; retry after `Retry-After` seconds.", {
        "rate_limited": "API key 'alice' may submit 60 jobs per minute (SDQ_RATE_LIMIT_PER_MIN); retry in 2 s",
        "too_many_queued": "API key 'alice' already has 100 jobs waiting (SDQ_MAX_QUEUED_PER_KEY)",
    }),
    500: ("internal_error", "A bug: the API log has the traceback.", {"internal_error": "internal error"}),
    503: ("unavailable", "The service cannot take this now; retry after `Retry-After` seconds.", {
        "queue_full": "queue full: 10000 jobs waiting (SDQ_MAX_QUEUED_JOBS); retry later",
        "unavailable": "Redis unreachable: Connection refused",
    }),
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
}


def responses(*codes: int, described: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error `codes`: the shared schema, examples and headers; `described`
    overrides a code's description for one route."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        _, description, examples = ERRORS[code]
        entry: dict[str, Any] = {
            "model": ErrorResponse,
            "description": (described or {}).get(code, description),
            "content": {"application/json": {"examples": {
                name: {"value": {"error": {"type": name, "message": message, "field": _example_field(name)}}}
                for name, message in examples.items()
            }}},
        }
        if code in _HEADERS:
            entry["headers"] = _HEADERS[code]
        out[code] = entry
    return out


def unify_error_docs(spec: dict[str, Any]) -> dict[str, Any]:
    """Make every documented error answer `application/json` with `ErrorResponse`, as the handlers send it.

    FastAPI documents its own 422 shape on routes with parameters, and gives error answers of a non-JSON route
    (the event stream) that route's media type. Idempotent: the spec is fixed in place once and cached.
    """
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in operation.get("responses", {}).items():
                json_content = response.get("content", {}).get("application/json", {})
                schema = json_content.get("schema", {}).get("$ref", "")
                if not code.startswith(("4", "5")) or schema not in ("", *_FASTAPI_ERROR_REFS, ref["$ref"]):
                    continue  # e.g. /readyz's 503 is its own Readiness body
                response["content"] = {"application/json": {**json_content, "schema": ref}}
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec


_FASTAPI_ERROR_REFS = ("#/components/schemas/HTTPValidationError",)


def _default_type(status_code: int) -> ErrorType:
    if status_code in ERRORS:
        return ERRORS[status_code][0]
    return "internal_error" if status_code >= 500 else "bad_request"


def _example_field(error_type: str) -> str | None:
    return {"invalid_request": "width", "forbidden": "priority", "idempotency_conflict": "Idempotency-Key"}.get(
        error_type
    )


def error_response(status_code: int, info: ErrorInfo, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"error": info.model_dump()}, headers=dict(headers or {}))


def count_error(app: Any, status_code: int, info: ErrorInfo) -> None:
    """Count the error in the app's metrics (`sdq_http_errors_total{status, type}`)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.count_error(status_code, info.type)


# Renders an error in a compatibility layer's own shape: (status, info, headers) -> the answer.
ErrorShape = Callable[[int, ErrorInfo, Mapping[str, str]], JSONResponse]


def add_error_shape(app: Any, path_prefixes: tuple[str, ...], shape: ErrorShape) -> None:
    """Answer every error on paths starting with one of `path_prefixes` with `shape` instead of the native shape
    (a compatibility layer whose clients parse their own API's errors)."""
    app.state.error_shapes = (*getattr(app.state, "error_shapes", ()), (path_prefixes, shape))


def _answer(request: Request, status_code: int, info: ErrorInfo,
            headers: Mapping[str, str] | None = None) -> JSONResponse:
    count_error(request.app, status_code, info)
    for prefixes, shape in getattr(request.app.state, "error_shapes", ()):
        if request.url.path.startswith(prefixes):
            return shape(status_code, info, headers or {})
    return error_response(status_code, info, headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _answer(request, exc.status_code, exc.info, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's and FastAPI's HTTPException (unknown route, wrong method, and routes that raise one)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI answers 400 when a JSON body is not UTF-8 but 422 when it is not JSON: both are 422 here.
        info = ErrorInfo(type="invalid_request", message=f"body: not UTF-8 text ({exc.__cause__.reason})", field="body")
        return _answer(request, 422, info)
    info = ErrorInfo(type=_default_type(exc.status_code), message=str(exc.detail))
    return _answer(request, exc.status_code, info, exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each field and rule (and never failing to render: a NaN input must not become a 500)."""
    assert isinstance(exc, RequestValidationError)
    problems = [describe(err) for err in exc.errors()]
    message = "; ".join(msg for _, msg in problems) or "invalid request"
    return _answer(request, 422, ErrorInfo(type="invalid_request", message=message, field=problems[0][0]))


async def redis_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RedisError)
    info = ErrorInfo(type="unavailable", message=f"Redis unreachable: {exc}")
    return _answer(request, 503, info, {"Retry-After": "5"})


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback after this handler answers; the client gets the shape, not the trace. This answer
    # is sent by Starlette's outermost error middleware, around `api.request_id`, so it adds the request id itself.
    answer = _answer(request, 500, ErrorInfo(type="internal_error", message="internal error; the API log has details"))
    request_id = logs.request_id.get()
    if request_id is not None:
        answer.headers[REQUEST_ID_HEADER] = request_id
    return answer


def describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """(field, message) for one pydantic error, with messages such as "steps: Input should be greater than or
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
        msg += f", got {summarize(err['input'])}"
    return field, msg


def summarize(value: object) -> str:
    """A short description of a refused input for an error message (it may be 20,000 chars, or NaN)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a {len(value):,}-character string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)  # numbers, booleans, None: short, and repr(nan) == 'nan' is valid text
