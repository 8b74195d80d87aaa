"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from api.deps import KeysDep, RedisDep
from core.catalog import ModelLoad, model_loads
from core.jobstore import live_worker_count

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    redis: bool
    workers: int
    models: dict[str, ModelLoad] = Field(
        default_factory=dict, description="Per model: its live workers and waiting jobs (models with jobs waiting and "
        "no live worker included: they are not served now).",
    )
    reason: str | None = None


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The API process is up (it does not look at Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}})
def readyz(response: Response, redis: RedisDep, keys: KeysDep) -> Readiness:
    """Ready when Redis answers and at least one live worker listens on sdqueue's queues."""
    try:
        redis.ping()
        workers = live_worker_count(redis, keys)
        models = model_loads(redis, keys)
    except RedisError as exc:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(ready=False, redis=False, workers=0, reason=f"Redis unreachable: {exc}")
    if workers == 0:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        reason = "no live worker on queues " + ", ".join(keys.queues())
        return Readiness(ready=False, redis=True, workers=0, models=models, reason=reason)
    return Readiness(ready=True, redis=True, workers=workers, models=models)
