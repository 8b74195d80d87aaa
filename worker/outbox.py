"""What leaves with a job's final record, in the same transaction (an outbox): its terminal event, the end of its
cancel request and its ``completed`` webhook delivery.

A job's end is one ``MULTI``/``EXEC``: the record (success, failure, cancel, stop; or the failure RQ's registry
cleanup gives a job whose last worker died) and everything a client learns from it land together or not at all. So
a crash or an outage at any moment leaves either a job that has not ended, which is run or finalized again, or a
job that ended with its event in its log and its webhook queued; a retried write whose first attempt landed writes
nothing again (``rq_records.Bookkeeper.landed``), so there is never a second one.
"""

from __future__ import annotations

from typing import Any

from redis.client import Pipeline
from rq.job import Job

from core.queues import Keys
from core.webhook_queue import WebhookNotifier
from worker.events import JobEvent, publish


class Outbox:
    def __init__(self, keys: Keys, webhooks: WebhookNotifier | None = None) -> None:
        self.keys = keys
        self.webhooks = webhooks

    def write(self, pipe: Pipeline, job: Job, event: JobEvent, return_value: dict[str, Any] | None = None) -> None:
        """Into the transaction that writes ``job``'s final record, after it: ``job``'s status, ``ended_at`` and
        meta are current in memory, and ``return_value`` is a success's result."""
        pipe.srem(self.keys.cancel_requests(), job.id)
        publish(pipe, self.keys, event)
        if self.webhooks is not None:
            self.webhooks.completed(job, pipe, return_value=return_value)
