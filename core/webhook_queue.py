"""Job events become webhook deliveries: RQ jobs on the ``{prefix}-webhooks`` queue that `sdqueue webhooks` sends.

Queuing a delivery is one Redis write (joined to the caller's pipeline where it has one) and no network I/O to the
receiver, so a GPU batch never waits on one; only jobs that asked for the event pay anything. The body is the job as
``GET /v1/jobs/{id}`` shows it at the time of the event, built by ``core.jobview`` (so image URLs are the API's)
from the job object in memory. A ``completed`` delivery is queued in the same transaction (or script) as the job's
final record, so a job that ended always has it, and only once. The body stays the same on every retry of that
message.

Events (a job's ``webhook_events_filter`` picks among them):
- ``start``: the job started running;
- ``progress``: while it runs, at most once every ``PROGRESS_EVERY_S`` per job;
- ``completed``: it succeeded, failed or was canceled (also when canceled while still queued).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job

from core import jobview
from core.attempts import read_counts
from core.jobs import DEFAULT_WEBHOOK_EVENTS, JobPublic, WebhookEvent
from core.queues import Keys
from core.settings import Settings
from core.storage.base import Storage
from core.webhooks import new_message_id

log = logging.getLogger(__name__)

DELIVER_FUNC = "sdqueue.webhook_delivery.deliver"
RETRIES = 6  # with the default 1 s base: retries after 1, 2, 4, 8, 16 and 32 s
PROGRESS_EVERY_S = 1.0
DELIVERY_TIMEOUT_S = 60  # one attempt: the request timeout for each resolved address, with room to spare
DELIVERED_TTL_S = 3600  # how long a delivered message stays inspectable in RQ


def retry_intervals(base_s: float) -> list[float]:
    """Exponential backoff: base, 2 x base, 4 x base, ... (RQ's scheduler acts on whole seconds)."""
    return [base_s * 2**i for i in range(RETRIES)]


def wants(params: dict[str, Any], event: WebhookEvent) -> bool:
    """Whether a job with these (serialized) parameters asked for `event`: cheap, no model validation."""
    return bool(params.get("webhook")) and event in params.get("webhook_events_filter", DEFAULT_WEBHOOK_EVENTS)


def enqueue_delivery(
    connection: Redis, settings: Settings, view: JobPublic, event: WebhookEvent, *, pipeline: Pipeline | None = None
) -> str | None:
    """Queue the delivery of `view` for `event` if the job asked for it; returns the message id (``webhook-id``)."""
    if view.params.webhook is None or event not in view.params.webhook_events_filter:
        return None
    msg_id = new_message_id()
    retry = Retry(max=RETRIES, interval=retry_intervals(settings.webhook_retry_base_s))  # type: ignore[arg-type]
    data = Queue.prepare_data(
        DELIVER_FUNC,
        kwargs={
            "msg_id": msg_id,
            "url": view.params.webhook,
            "event": event,
            "job_id": view.id,
            "payload": view.model_dump(mode="json"),
            "event_at": time.time(),
        },
        job_id=msg_id,  # one RQ job per message: its retries keep the id, as Standard Webhooks requires
        description=f"webhook {event} of job {view.id}",  # RQ's default would copy the whole payload
        retry=retry,
        timeout=DELIVERY_TIMEOUT_S,
        result_ttl=DELIVERED_TTL_S,
        failure_ttl=settings.result_ttl_s,
    )
    # enqueue_many, unlike enqueue_call, adds to a pipeline that already holds commands (it never calls MULTI).
    Queue(Keys(settings.queue_prefix).webhooks(), connection=connection).enqueue_many([data], pipeline=pipeline)
    return msg_id


class WebhookNotifier:
    """The worker's side: turns a running batch's job events into queued deliveries.

    A ``start`` or ``progress`` webhook that cannot be queued is logged and the job goes on; ``completed`` goes into
    the transaction of the job's final record, which the worker retries until Redis answers.
    """

    def __init__(self, connection: Redis, settings: Settings, storage: Storage) -> None:
        self.connection = connection
        self.settings = settings
        self.keys = Keys(settings.queue_prefix)
        self.storage = storage
        # Last progress delivery per job; weak keys, so entries go with the batch's job objects.
        self._progress_sent: weakref.WeakKeyDictionary[Job, float] = weakref.WeakKeyDictionary()

    def started(self, job: Job, pipeline: Pipeline) -> None:
        """After the job is marked started in `pipeline` (its status and meta are current in memory)."""
        if _asked(job, "start"):
            self._from_memory(job, "start", pipeline)

    def progress(self, job: Job, pipeline: Pipeline) -> None:
        """After the job's progress meta was updated; throttled to one delivery per PROGRESS_EVERY_S."""
        if not _asked(job, "progress"):
            return
        clock = time.monotonic()
        if clock - self._progress_sent.get(job, -PROGRESS_EVERY_S) >= PROGRESS_EVERY_S:
            self._progress_sent[job] = clock
            self._from_memory(job, "progress", pipeline)

    def completed(self, job: Job, pipeline: Pipeline | None = None, *,
                  return_value: dict[str, Any] | None = None) -> None:
        """Into the transaction (`pipeline`) that writes the job's final record, whose status, ``ended_at`` and meta
        are current in memory (and a success's `return_value`): the view is built from memory
        (``jobview.final_view``), exactly as GET /v1/jobs/{id} returns it once the transaction landed. Its attempt
        counts are read from the job hash, which nothing changes while a job ends.

        Raises Redis errors (of the read; nothing was queued then: the caller tries again)."""
        if not _asked(job, "completed"):
            return
        attempts, given_back = read_counts(self.connection, job.key)
        try:
            view = jobview.final_view(job, self.storage, attempts, given_back, return_value)
        except Exception:  # a view that cannot be built must not keep the job from ending
            log.exception("could not build the completed webhook of job %s", job.id)
            return
        enqueue_delivery(self.connection, self.settings, view, "completed", pipeline=pipeline)

    def _from_memory(self, job: Job, event: WebhookEvent, pipeline: Pipeline) -> None:
        # A running job's view needs no Redis read: status, meta and spec are on the job object.
        try:
            view = jobview.job_view(self.connection, self.keys, self.storage, job)
            enqueue_delivery(self.connection, self.settings, view, event, pipeline=pipeline)
        except Exception:
            log.exception("could not queue the %s webhook of job %s", event, job.id)


def _asked(job: Job, event: WebhookEvent) -> bool:
    try:
        return wants(job.kwargs["spec"]["params"], event)
    except Exception:  # an unreadable spec: the worker fails that job on its own
        return False
