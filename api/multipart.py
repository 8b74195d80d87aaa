"""multipart/form-data for routes whose body is a JSON model: the form is turned into that JSON, then FastAPI
validates it as usual, so both encodings share one model, one set of rules and one OpenAPI schema.

- A file part becomes the base64 text of its bytes, which is how the JSON body carries an image. A file larger than
  SDQ_MAX_IMAGE_BYTES is refused with 413 before it is encoded.
- A text part stays text; pydantic reads "30", "7.5" and "true" as the numbers and booleans the model asks for.
- A field whose type is a list takes every part of that name (``-F webhook_events_filter=start -F ...=completed``).
- A field whose type is an object (``outpaint``) is sent as JSON text, as OpenAPI encodes objects in multipart.
- A body that is not a whole form (no boundary, a broken part header, cut off before the closing boundary) is
  400 `bad_request`, as the README documents, never a 422 about fields that were merely cut off.
"""

from __future__ import annotations

import base64
import json
import types
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any, Literal, Union, get_args, get_origin

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.auth import AuthenticatedRoute
from api.errors import ApiError
from core.settings import Settings

FieldKind = Literal["text", "list", "json"]
MAX_FIELDS = 64
IMAGE_TYPES = "image/png, image/jpeg, image/webp"


class MultipartAsJsonRoute(AuthenticatedRoute):
    """An APIRoute that also accepts multipart/form-data for its JSON body model (see the module docstring). The
    form is read only once the caller is authenticated."""

    def body_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().body_handler()
        annotation = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise TypeError(f"{self.path}: MultipartAsJsonRoute needs a route whose body is one pydantic model")
        kinds = field_kinds(annotation)

        async def route(request: Request) -> Response:
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                request = await form_as_json(request, kinds)
            return await handler(request)

        return route


def field_kinds(model: type[BaseModel]) -> dict[str, FieldKind]:
    """How each field of ``model`` is read from a form part."""
    kinds: dict[str, FieldKind] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        kind: FieldKind = "text"
        for option in options:
            if get_origin(option) is list:
                kind = "list"
            elif isinstance(option, type) and issubclass(option, BaseModel):
                kind = "json"
        kinds[field.alias or name] = kind  # a form part is named as the JSON key (`image[]` for OpenAI's arrays)
    return kinds


class _WholeFormParser(MultiPartParser):
    """Starlette's multipart parser, noting whether the body reached its closing boundary: on its own it returns
    the parts of a truncated body as if they were the whole form, which would end in a misleading 422."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def form_as_json(request: Request, kinds: dict[str, FieldKind]) -> Request:
    """A copy of ``request`` whose body is the form as JSON (content-type application/json); 400 `bad_request`
    for a body that is no whole multipart form (no boundary, a broken part, cut short)."""
    settings: Settings = request.app.state.settings
    body: dict[str, Any] = {}
    # A text part may hold a base64 image: let it be as large as the largest allowed image in base64.
    max_text = settings.max_image_bytes * 4 // 3 + 4096
    async with aclosing(request.stream()) as stream:
        parser = _WholeFormParser(request.headers, stream, max_files=len(kinds), max_fields=MAX_FIELDS,
                                  max_part_size=max_text)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, "bad_request", f"multipart body: {exc.message}") from None
    try:
        if not parser.complete:
            raise ApiError(400, "bad_request", "multipart body: it ends before the closing boundary (cut short?)")
        for name in form:
            values = [await _value(name, v, kinds.get(name, "text"), settings) for v in form.getlist(name)]
            body[name] = values if kinds.get(name) == "list" or len(values) > 1 else values[0]
    finally:
        await form.close()
    data = json.dumps(body).encode()
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)


async def _value(name: str, value: UploadFile | str, kind: FieldKind, settings: Settings) -> Any:
    if isinstance(value, UploadFile):
        content = await value.read(settings.max_image_bytes + 1)
        if len(content) > settings.max_image_bytes:
            raise ApiError(413, "payload_too_large", f"{name} is more than the {settings.max_image_bytes:,}-byte "
                                                     "limit (SDQ_MAX_IMAGE_BYTES)", name)
        return base64.b64encode(content).decode("ascii")
    if kind == "json":
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ApiError(422, "invalid_request", f"{name} must be JSON text in a form ({exc})", name) from None
    return value


def multipart_openapi(model: type[BaseModel], files: tuple[str, ...]) -> dict[str, Any]:
    """``openapi_extra`` adding the multipart form of ``model``'s body: the same schema, files for ``files``."""
    kinds = field_kinds(model)
    encoding: dict[str, Any] = {name: {"contentType": IMAGE_TYPES} for name in files}
    encoding |= {name: {"contentType": "application/json"} for name, kind in kinds.items() if kind == "json"}
    return {"requestBody": {"content": {"multipart/form-data": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
        "encoding": encoding,
    }}}}
