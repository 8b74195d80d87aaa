"""``sdqueue webhooks``: the webhook sender. An RQ worker on the ``{prefix}-webhooks`` queue, with RQ's scheduler for
the retries, and its own /metrics listener (``SDQ_METRICS_HOST``, ``SDQ_WEBHOOK_METRICS_PORT``). No torch, no GPU:
run it from the API image, as many as the load needs.

Each process sends one message at a time; a receiver that hangs holds its sender for at most the request timeout
(``sdqueue.webhook_delivery.REQUEST_TIMEOUT_S``), so run more senders when receivers are slow.
"""

from __future__ import annotations

import logging
from typing import Any

from rq.job import Job
from rq.worker import SimpleWorker

from core.metrics_http import MetricsPortError, serve_metrics
from core.queues import Keys, connect
from core.settings import Settings
from sdqueue.webhook_delivery import METRICS, DeliveryError

log = logging.getLogger(__name__)


class WebhookWorker(SimpleWorker):
    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # A failed attempt was logged in one line where it happened; RQ would add a traceback for each attempt.
        if isinstance(exc_info[1], DeliveryError):
            return
        super().handle_exception(job, *exc_info)


def run(settings: Settings) -> int:
    """Send webhooks until SIGTERM/SIGINT (which lets the message being sent finish); returns the exit code (2: the
    metrics port cannot be used)."""
    if settings.webhook_secret is None:
        log.warning("SDQ_WEBHOOK_SECRET is not set: the API refuses jobs with a webhook, so none will be sent")
    try:
        serve_metrics(METRICS.registry, what="webhook sender", host=settings.metrics_host,
                      port=settings.webhook_metrics_port, setting="SDQ_WEBHOOK_METRICS_PORT",
                      chosen="webhook_metrics_port" in settings.model_fields_set)
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2
    queue = Keys(settings.queue_prefix).webhooks()
    worker = WebhookWorker([queue], connection=connect(settings.redis_url), log_job_description=False)
    log.info("webhook sender %s on queue %s", worker.name, queue)
    worker.work(with_scheduler=True, logging_level=settings.log_level)
    return 0
