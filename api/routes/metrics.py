"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def get_metrics(m: MetricsDep) -> Response:
    """HTTP requests and latency by route, jobs submitted, queue depth per queue, live workers."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
