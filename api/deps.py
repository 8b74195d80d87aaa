"""What route handlers get injected: the app's settings, Redis client, key names, storage and metrics.

The providers are `async def` although they do not await: FastAPI runs a plain `def` dependency in its thread pool,
a thread hop per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from redis import Redis

from api.instrumentation import ApiMetrics
from api.submitter import Submitter
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


async def _submitter(request: Request) -> Submitter:
    return cast(Submitter, request.app.state.submitter)


async def _metrics(request: Request) -> ApiMetrics:
    return cast(ApiMetrics, request.app.state.metrics)


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[Redis, Depends(_redis)]
KeysDep = Annotated[Keys, Depends(_keys)]
StorageDep = Annotated[Storage, Depends(_storage)]
SubmitterDep = Annotated[Submitter, Depends(_submitter)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
