"""The API application: `create_app(settings)` wires settings, Redis, storage and metrics into the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import a1111, deps, docs, errors, openai_images, playground
from api.auth import Authenticator
from api.cors import add_cors
from api.durability import Durability
from api.instrumentation import ApiMetrics, HttpMetricsMiddleware
from api.intake import Services
from api.limits import BodyLimitMiddleware, KeyLimits
from api.request_id import RequestIdMiddleware
from api.routes import events, health, images, img2img, jobs, limits, metrics, models
from api.submitter import Submitter
from core import eventlog
from core.queues import Keys, connect
from core.settings import Settings, load_settings
from core.storage import make_storage
from core.version import __version__

log = logging.getLogger(__name__)

# What any route behind an API key may answer (routes add their own, and may describe these more closely).
_PROTECTED_ERRORS = errors.responses(401, 503, described={503: "Redis is unreachable; retry after `Retry-After`."})
# Routes that need an API key when auth is on; health, readiness and metrics stay open for probes and scrapers.
# A route with a body among them is an `api.auth.AuthenticatedRoute`, so that the key is checked before the body.
PROTECTED = (jobs, events, img2img, images, models, limits, a1111)


def operation_id(route: APIRoute) -> str:
    """OpenAPI operationIds are the route functions' names (`submit_txt2img`, `get_job`), so that SDKs generated
    from the spec get those as method names; tests/api/test_openapi.py keeps them unique."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; with no argument, settings come from the environment (uvicorn's `--factory` mode)."""
    settings = settings or load_settings()
    # Every Redis wait of a request is bounded: a stalled Redis gets 503 with Retry-After, not a hung request.
    redis = connect(settings.redis_url, socket_timeout=settings.redis_timeout_s)  # pooled, shared by all requests
    # For short commands awaited without a thread: auth, limits and Idempotency-Key checks.
    acommands = AsyncRedis.from_url(
        settings.redis_url, health_check_interval=30, socket_keepalive=True, socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    # For blocking reads of event logs (SSE, Prefer: wait), which wait up to READ_BLOCK_S before Redis answers.
    aredis = AsyncRedis.from_url(
        settings.redis_url, health_check_interval=30, socket_keepalive=True,
        socket_timeout=eventlog.READ_BLOCK_S + settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    durability = Durability.from_settings(settings.durable_submit, settings.redis_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.durable_submit:
            await _check_durability(durability, redis)
        yield
        await aredis.aclose()  # type: ignore[attr-defined]  # (the redis stubs predate aclose)
        await acommands.aclose()  # type: ignore[attr-defined]
        redis.close()

    app = FastAPI(
        title="sdqueue",
        version=__version__,
        summary="Stable Diffusion 1.x jobs over HTTP: submit, follow, download.",
        description="Errors always have the shape `{\"error\": {\"type\", \"message\", \"field\"}}`. With auth on, "
        "every route but /healthz, /readyz, /metrics, the docs and the playground page at / needs "
        "`Authorization: Bearer <API key>`.",
        lifespan=lifespan,
        docs_url=None,  # served by `docs.add_docs` from local files instead of a CDN
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    fastapi_openapi = app.openapi
    app.openapi = lambda: errors.unify_error_docs(fastapi_openapi())  # type: ignore[method-assign]
    keys = Keys(settings.queue_prefix)
    app.state.settings = settings
    app.state.redis = redis
    app.state.aredis = aredis
    app.state.keys = keys
    app.state.storage = make_storage(settings)
    app.state.metrics = ApiMetrics(redis, keys)
    app.state.submitter = Submitter(redis, settings, durability)
    app.state.authenticator = Authenticator(settings, acommands, keys)
    app.state.services = Services(
        settings=settings, redis=redis, aredis=aredis, acommands=acommands, keys=keys, storage=app.state.storage,
        submitter=app.state.submitter, limits=KeyLimits(acommands, keys, settings), metrics=app.state.metrics,
    )
    log.info("API keys %s", "required" if app.state.authenticator.enabled else "not required (SDQ_AUTH)")
    # The last middleware added runs first: metrics see every answer, the 413s of the body limit included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    add_cors(app, settings.cors_origin_list())  # outside the metrics: preflights are answered here, uncounted
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a 413 or a preflight too, has X-Request-ID
    app.add_exception_handler(errors.ApiError, errors.api_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(RedisError, errors.redis_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)
    for module in PROTECTED:
        app.include_router(module.router, dependencies=[deps.AUTHENTICATED], responses=_PROTECTED_ERRORS)
    # OpenAI's Images API (/v1/images/generations, edits, variations): its errors in the shape OpenAI's clients parse.
    app.include_router(openai_images.router, dependencies=[deps.AUTHENTICATED])
    errors.add_error_shape(app, openai_images.PATHS, openai_images.openai_error)
    for module in (health, metrics):
        app.include_router(module.router)
    docs.add_docs(app)  # also open: the pages, their files and /openapi.json
    playground.add_playground(app)  # open: a static page at /; its API calls send the key
    return app


async def _check_durability(durability: Durability, redis: Redis) -> None:
    """Refuse to start (DurabilityUnavailable) when SDQ_DURABLE_SUBMIT is on and Redis cannot honour it; a Redis
    that cannot be reached now is asked again before the first enqueue."""
    try:
        await to_thread.run_sync(durability.ensure, redis)
    except RedisError as exc:
        log.warning("SDQ_DURABLE_SUBMIT: Redis cannot be asked now (%s); it is asked before the first enqueue", exc)
