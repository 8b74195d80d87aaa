"""``sdqueue worker``: load the model once, serve metrics, register with RQ, run batches until told to stop."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from core.metrics_http import MetricsPortError
from core.queues import Keys, connect
from core.settings import Settings, parse_warmup_shapes
from worker.batch_worker import BatchWorker
from worker.metrics import WorkerMetrics
from worker.tasks import Resident, load_resident

log = logging.getLogger(__name__)


def worker_name() -> str:
    # host and pid say where it runs; the suffix keeps a restarted container (same host, pid 1) from colliding with
    # its predecessor's key, which RQ keeps for one lease after a crash.
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def warm_up_resident(resident: Resident, settings: Settings, metrics: WorkerMetrics) -> None:
    """Run SDQ_WARMUP_SHAPES once (model/warmup.py), report the time, and pad batches to them if asked (CUDA)."""
    from model.warmup import BatchPadding, warm_up

    shapes = parse_warmup_shapes(settings.warmup_shapes)
    if not shapes:
        return
    pipe = resident.pipe
    started = time.monotonic()
    warmed = warm_up(pipe, [(s.width, s.height, b) for s in shapes for b in s.batch_sizes])
    seconds = time.monotonic() - started
    metrics.warmup_seconds.set(seconds)
    log.info("warm-up: %d of %d shapes in %.1f s", len(warmed), sum(len(s.batch_sizes) for s in shapes), seconds)
    if settings.pad_to_warmed:
        if pipe.device.type != "cuda":
            log.info("SDQ_PAD_TO_WARMED applies on CUDA only; %s batches run unpadded", pipe.device.type)
            return
        sizes: dict[tuple[int, int], list[int]] = {}
        for w in warmed:
            sizes.setdefault((w.width, w.height), []).append(w.batch)
        pipe.batch_padding = BatchPadding(sizes)


def main(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit code (2: its metrics port cannot be used)."""
    metrics = WorkerMetrics()
    try:
        metrics.serve(settings.metrics_host, settings.worker_metrics_port,
                      chosen="worker_metrics_port" in settings.model_fields_set)
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2
    try:
        resident = load_resident(settings)
    except Exception as exc:
        log.error("cannot load the model from SDQ_CHECKPOINT=%s: %s", settings.checkpoint, exc)
        return 1
    metrics.model_load_seconds.set(resident.load_seconds)
    warm_up_resident(resident, settings, metrics)  # before BatchWorker registers: ready means warm
    keys = Keys(settings.queue_prefix)
    worker = BatchWorker(
        keys.worker_queues(resident.pipe.name),
        connection=connect(settings.redis_url),
        settings=settings,
        resident=resident,
        metrics=metrics,
        name=worker_name(),
    )
    log.info(
        "worker %s: up to %d images per batch, %d ms window, heartbeat %d s",
        worker.name, settings.max_batch_images, settings.batch_window_ms, settings.heartbeat_s,
    )
    worker.work(logging_level=settings.log_level)
    if not worker.stop_requested:
        # RQ's loop also ends on an error nobody expected (Redis outages are waited out: worker.rq_adapter); a
        # non-zero exit lets the supervisor restart the worker. Jobs it was running come back through their leases.
        log.error("worker %s stopped without a shutdown request (see the errors above)", worker.name)
        return 1
    log.info("worker %s stopped", worker.name)
    return 0
