"""Who is calling: the API key in `Authorization: Bearer <key>`, checked when auth is on.

HTTP Basic with the key as the password (any user name) works too, since that is what AUTOMATIC1111's clients
send (`--api-auth`).

Auth is on with SDQ_AUTH=on, or with SDQ_AUTH=auto (the default) as soon as SDQ_API_KEYS lists a key. Keys are
looked up by their SHA-256 digest: first among SDQ_API_KEYS (read once at start), then in the Redis hash that
`sdqueue apikey create --store` fills, so keys added there work without a restart and revoked ones stop at once.
The key's name owns the jobs it submits: another key gets 404 for them.

A route with a body is an `AuthenticatedRoute`: the key is checked before the body is read, so a caller without
a valid key gets 401 whatever it sends (no 413, 422 or 400 that would tell it about the route, and no body read).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis as AsyncRedis

from api.errors import ApiError
from core import apikeys
from core.jobs import Priority
from core.queues import PRIORITY_ORDER, Keys
from core.settings import Settings

# Declared for OpenAPI (`securitySchemes`); auto_error=False so that missing credentials get our own 401.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from the operator (`sdqueue apikey create`). Required when auth is on.",
)


@dataclass(frozen=True)
class Caller:
    name: str | None  # the API key's name, owner of the jobs it submits; None when auth is off
    max_priority: Priority

    def can_see(self, owner: str | None) -> bool:
        """With auth off everyone sees every job; with auth on a key sees the jobs it submitted."""
        return self.name is None or owner == self.name

    def allows(self, priority: Priority) -> bool:
        """Whether this key may submit at `priority` (the native API answers 403 when it may not)."""
        return PRIORITY_ORDER.index(priority) >= PRIORITY_ORDER.index(self.max_priority)

    def default_priority(self) -> Priority:
        """The priority of a job whose API has no priorities (`/sdapi/v1`, `/v1/images`): normal, or the highest
        this key may use when that is lower, so such a key's jobs run instead of being refused."""
        return Priority.normal if self.allows(Priority.normal) else self.max_priority


ANONYMOUS = Caller(None, Priority.high)


class Authenticator:
    def __init__(self, settings: Settings, aredis: AsyncRedis, keys: Keys) -> None:
        self.enabled = settings.auth_enabled()
        self.configured = apikeys.parse_list(settings.api_keys)
        self.aredis = aredis
        self.keys = keys

    async def caller(self, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        if credentials is None or not credentials.credentials.strip():
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (or HTTP Basic, the key as "
                                "the password)", "")
        digest = apikeys.digest(credentials.credentials.strip())
        key = self.configured.get(digest) or await self._stored(digest)
        if key is None:
            raise _unauthorized("unknown or revoked API key", ' error="invalid_token"')
        return Caller(key.name, key.max_priority)

    async def _stored(self, digest: str) -> apikeys.ApiKey | None:
        for key in apikeys.parse_hash(await self.aredis.hgetall(self.keys.api_keys())):
            if hmac.compare_digest(key.digest, digest):
                return key
        return None


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = None) -> Caller:
    """The caller of `request` (401 without a valid key when auth is on), found once per request: the route class
    asks first, the `CallerDep` dependency gets the same answer."""
    state = request.scope.setdefault("state", {})  # shared by copies of the request (see api.multipart)
    caller = state.get("sdq_caller")
    if caller is None:
        if credentials is None:
            credentials = await bearer_scheme(request) or basic_password(request)
        authenticator = cast(Authenticator, request.app.state.authenticator)
        caller = state["sdq_caller"] = await authenticator.caller(credentials)
    return cast(Caller, caller)


class AuthenticatedRoute(APIRoute):
    """An APIRoute that authenticates before anything reads the request body; subclasses that read the body
    themselves (multipart) do it in `body_handler`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = self.body_handler()

        async def route(request: Request) -> Response:
            await authenticate(request)
            return await handler(request)

        return route

    def body_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """What runs once the caller is known: FastAPI's own handler, which reads and validates the body."""
        return super().get_route_handler()


def basic_password(request: Request) -> HTTPAuthorizationCredentials | None:
    """The password of `Authorization: Basic base64(user:password)`, as the API key; None without Basic auth."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user_password = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        user_password = ""  # malformed: no key, so a 401 when auth is on
    return HTTPAuthorizationCredentials(scheme="Basic", credentials=user_password.partition(":")[2])


def _unauthorized(message: str, challenge_params: str) -> ApiError:
    return ApiError(401, "unauthorized", message, field="Authorization",
                    headers={"WWW-Authenticate": "Bearer" + challenge_params})
