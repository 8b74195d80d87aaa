"""What route handlers get injected: the app's settings, Redis clients, key names, storage and metrics, the
calling API key, and a submission context.

The providers are `async def` although most do not await: FastAPI runs a plain `def` dependency in its thread pool,
a thread hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials
from redis import Redis

from api.auth import Caller, authenticate, bearer_scheme
from api.instrumentation import ApiMetrics
from api.intake import MAX_WAIT_S, Intake, Services
from core.queues import Keys
from core.settings import Settings
from core.storage import Storage


async def _settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


async def _redis(request: Request) -> Redis:
    return cast(Redis, request.app.state.redis)


async def _keys(request: Request) -> Keys:
    return cast(Keys, request.app.state.keys)


async def _storage(request: Request) -> Storage:
    return cast(Storage, request.app.state.storage)


async def _metrics(request: Request) -> ApiMetrics:
    return cast(ApiMetrics, request.app.state.metrics)


async def _services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


async def _caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Caller:
    """The API key's owner name (401 without a valid key when auth is on; anonymous when it is off)."""
    return await authenticate(request, credentials)


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[Redis, Depends(_redis)]
KeysDep = Annotated[Keys, Depends(_keys)]
StorageDep = Annotated[Storage, Depends(_storage)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
CallerDep = Annotated[Caller, Depends(_caller)]
ServicesDep = Annotated[Services, Depends(_services)]
# For `include_router(dependencies=[AUTHENTICATED])`: routes that do not otherwise need the caller.
AUTHENTICATED = Depends(_caller)


async def _intake(
    request: Request,
    caller: CallerDep,
    prefer: Annotated[str | None, Header(
        # No `examples`: API fuzzers send them, and each costs N seconds with no worker to end the job.
        description=f"`wait=N`, e.g. `wait=30`: answer when the job has ended or after N seconds (at most "
        f"{MAX_WAIT_S}), whichever is first: 200 with the ended job, else 202 as without it. The answer has "
        "`Preference-Applied: wait=N`.",
    )] = None,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
        description="Any unique string per intended job (e.g. a UUID). A repeat with the same key and body within "
        "24 h returns the first job (202, `Idempotent-Replayed: true`) instead of queuing another; the same key "
        "with another body is 409.",
        examples=["5f1c0a52-0c3e-4d52-9a43-d56f2f7e9c1b"],
    )] = None,
) -> Intake:
    return Intake(await _services(request), caller, prefer, idempotency_key)


IntakeDep = Annotated[Intake, Depends(_intake)]
