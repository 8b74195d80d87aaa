"""Errors in the shape OpenAI's clients parse: `{"error": {"message", "type", "param", "code"}}`.

The same errors as the native API (same checks, statuses and `Retry-After`), rendered for OpenAI's clients:
`code` is the native error type (`invalid_request`, `rate_limited`, `queue_full`, ...), `param` the OpenAI field,
`type` OpenAI's category. A 422 becomes 400, which is what OpenAI answers for a bad parameter and what its clients
raise as `BadRequestError`. OpenAI's clients resend a request answered 408, 409, 429 or 5xx unless the answer says
`x-should-retry: false`; a conflict that a resend cannot resolve (a 409 without `Retry-After`) says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.errors import ErrorInfo

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, if any.")
    code: str | None = Field(description="sdqueue's error type (e.g. `invalid_request`, `rate_limited`).")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


def openai_error(status_code: int, info: ErrorInfo, headers: Mapping[str, str]) -> JSONResponse:
    status = 400 if status_code == 422 else status_code
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    out = dict(headers)
    if status == 409 and not any(name.lower() == "retry-after" for name in out):
        out["x-should-retry"] = "false"
    body = OpenAIErrorResponse(error=OpenAIError(message=info.message, type=kind, param=info.field, code=info.type))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=out)


def responses(described: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these routes: each status in `described`, and any other 4xx, in this shape."""
    entries: dict[int | str, dict[str, Any]] = {
        code: {"model": OpenAIErrorResponse, "description": text} for code, text in described.items()
    }
    for code in (429, 503):
        if code in entries:
            entries[code]["headers"] = {"Retry-After": {"description": "Seconds to wait.",
                                                        "schema": {"type": "integer"}}}
    # Also keeps FastAPI from documenting its own 422, which these routes never answer.
    entries["4XX"] = {"model": OpenAIErrorResponse, "description": "Any other client error, in the same shape."}
    return entries
