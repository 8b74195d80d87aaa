"""Prometheus metrics of the API process: HTTP traffic, submitted jobs, and queue state read at scrape time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.catalog import model_loads
from core.jobstore import live_worker_count
from core.queue_stats import eta_seconds
from core.queues import Keys

log = logging.getLogger(__name__)

# Submit and poll latencies are milliseconds; image downloads and /readyz can take longer.
_REGISTRIES = {
    "running": StartedJobRegistry,
    "succeeded": FinishedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ApiMetrics:
    """One registry per app, so that several apps in one process (tests) do not share counters."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "sdq_http_requests", "HTTP requests by API layer, route template and status.",
            ["layer", "method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "sdq_http_request_duration_seconds", "HTTP request handling time.", ["layer", "method", "route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "sdq_jobs_submitted", "Jobs accepted onto a queue (model: \"\" for jobs that name none).",
            ["task", "priority", "model"], registry=self.registry,
        )
        self.http_errors = Counter(
            "sdq_http_errors", "Error responses by status and error type (unauthorized, rate_limited, queue_full...).",
            ["status", "type"], registry=self.registry,
        )
        self.event_streams = Gauge(
            "sdq_event_streams", "Open Server-Sent Events streams (GET /v1/jobs/{id}/events).", registry=self.registry
        )
        self.registry.register(_QueueCollector(redis, keys))

    def count_error(self, status: int, error_type: str) -> None:
        self.http_errors.labels(str(status), error_type).inc()


class _QueueCollector(Collector):
    """Queue depth and live workers, read from Redis when /metrics is scraped (so every API replica agrees)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sdq_redis_up", "Whether the API reached Redis during this scrape.")
        try:
            names = self.keys.all_queues(self.redis)
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.llen(Queue(name, connection=self.redis).key)
            depths = dict(zip(names, (int(n) for n in pipe.execute()), strict=True))
            workers = live_worker_count(self.redis, self.keys)
            by_status = self._jobs_by_status(names)
            per_model = self._per_model()
        except RedisError as exc:
            log.warning("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("sdq_queue_depth", "Jobs waiting per queue (model: \"\" for jobs that name none).",
                                  labels=["queue", "model", "priority"])
        for name, n in depths.items():
            model, priority = self.keys.parse(name) or (None, None)
            depth.add_metric([name, model or "", priority.value if priority else ""], n)
        yield depth
        yield GaugeMetricFamily("sdq_workers", "Live workers registered on sdqueue's queues.", value=workers)
        yield from per_model
        yield by_status

    def _per_model(self) -> list[GaugeMetricFamily]:
        """Live workers, waiting jobs and the time to run those, per model (``core.catalog.model_loads``)."""
        workers = GaugeMetricFamily("sdq_model_workers", "Live workers holding each model.", labels=["model"])
        queued = GaugeMetricFamily("sdq_model_queued", "Jobs waiting on each model's queues.", labels=["model"])
        eta = GaugeMetricFamily(
            "sdq_model_queue_eta_seconds", "Seconds until a model's live workers have run the jobs waiting on its "
            "queues, at the speed they recorded (no sample without a live worker or a recorded speed).",
            labels=["model"],
        )
        for model, load in model_loads(self.redis, self.keys).items():
            workers.add_metric([model], load.workers)
            queued.add_metric([model], load.queued)
            seconds = eta_seconds(self.redis, self.keys, load.queued, 0, load.workers, model) if load.workers else None
            if seconds is not None:
                eta.add_metric([model], seconds)
        return [workers, queued, eta]

    def _jobs_by_status(self, names: list[str]) -> GaugeMetricFamily:
        """Running jobs, and finished ones until they expire (SDQ_RESULT_TTL_S), from RQ's registries."""
        family = GaugeMetricFamily(
            "sdq_jobs_by_status", "Jobs running, and ended jobs not yet expired, per queue (RQ registries).",
            labels=["queue", "status"],
        )
        pipe = self.redis.pipeline(transaction=False)
        rows = []
        for name in names:
            queue = Queue(name, connection=self.redis)
            for status, registry in _REGISTRIES.items():
                pipe.zcard(registry(queue=queue).key)
                rows.append((name, status))
        for (name, status), n in zip(rows, pipe.execute(), strict=True):
            family.add_metric([name, status], int(n))
        return family


# The API layers, by path prefix: AUTOMATIC1111's and OpenAI's compatibility layers, and the native API (the rest).
LAYER_PREFIXES = (("/sdapi/", "a1111"), ("/v1/images/", "openai"))
NATIVE_TEMPLATES = frozenset({"/v1/images/{key:path}"})  # the native image download, under OpenAI's prefix


def layer_of(path: str, template: str) -> str:
    """`native`, `a1111` or `openai`: the API layer a request was made to."""
    if template in NATIVE_TEMPLATES:
        return "native"
    return next((layer for prefix, layer in LAYER_PREFIXES if path.startswith(prefix)), "native")


class HttpMetricsMiddleware:
    """Counts requests and their latency, labelled by API layer and route template (`/v1/jobs/{job_id}`, which
    bounds cardinality)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before responding, the server answers 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            layer = layer_of(scope["path"], template)
            self.metrics.http_requests.labels(layer, method, template, str(status)).inc()
            self.metrics.http_latency.labels(layer, method, template).observe(time.perf_counter() - start)
