"""The API application: `create_app(settings)` wires settings, Redis, storage and metrics into the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError

from api.errors import redis_error_handler, validation_error_handler
from api.instrumentation import ApiMetrics, HttpMetricsMiddleware
from api.routes import health, images, jobs, metrics
from api.submitter import Submitter
from core.queues import Keys, connect
from core.settings import Settings, load_settings
from core.storage import make_storage
from sdqueue import __version__


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; with no argument, settings come from the environment (uvicorn's `--factory` mode)."""
    settings = settings or load_settings()
    redis = connect(settings.redis_url)  # pooled and thread-safe: shared by all requests

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        redis.close()

    app = FastAPI(
        title="sdqueue",
        version=__version__,
        summary="Stable Diffusion 1.x jobs over HTTP: submit, poll, download.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.keys = Keys(settings.queue_prefix)
    app.state.storage = make_storage(settings)
    app.state.metrics = ApiMetrics(redis, app.state.keys)
    app.state.submitter = Submitter(redis, settings)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(RedisError, redis_error_handler)
    for module in (jobs, images, health, metrics):
        app.include_router(module.router)
    return app
