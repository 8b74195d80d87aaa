"""The sdqueue worker: RQ's ``work()`` loop (``worker.rq_adapter``) with a turn that runs one batch of jobs.

States (``Phase``):  starting -> idle -> collecting -> running -> idle -> ...  (SIGTERM: finish the batch, stopping)

``run_turn`` is the whole turn, top to bottom: claim the head job RQ dequeued, collect compatible waiting jobs
(``batcher``), mark them started (``rq_records.Bookkeeper``), read their inputs, run them through the pipeline
(``runner``: one call, split on out-of-memory, one by one on other errors), then finalize each job as soon as its
outcome is known (``finalizer``): write its images, record the outcome in RQ, announce it.

No step of a turn raises for Redis or storage being away (``outages``): the claims, the start and every job's
record wait for Redis, the per-step progress is skipped while it is away, and storage outages are waited out for
up to each job's timeout before the job is given back to its queue (``patient_storage``). So a worker keeps its
batch through an outage of any length, and jobs fail only for their own errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from enum import Enum

import redis.exceptions
from redis import Redis
from rq.job import Job
from rq.queue import Queue

from core import logs
from core.catalog import mark_served, publish_model
from core.jobs import JobSpec
from core.outages import quick_client
from core.queue_stats import record_pipeline_call
from core.settings import Settings
from core.webhook_queue import WebhookNotifier
from worker.batcher import Batcher, Claim, job_spec
from worker.finalizer import Finalizer
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.model_info import describe_model
from worker.patient_storage import StorageUnavailable
from worker.rq_adapter import RQWorker
from worker.rq_records import Bookkeeper
from worker.runner import BatchItem, BatchRunner, CallStats, Error, GiveBack, current_exc_info, to_request
from worker.sweeper import LeaseWatch, Sweeper, back_first
from worker.tasks import Resident

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 1.0  # the step callback's Redis calls give up after this: a skipped progress write, not a stall


class Phase(str, Enum):
    starting = "starting"
    idle = "idle"
    collecting = "collecting"
    running = "running"
    stopping = "stopping"


class BatchWorker(RQWorker):
    def __init__(
        self,
        queues: Sequence[str],
        *,
        connection: Redis,
        settings: Settings,
        resident: Resident,
        metrics: WorkerMetrics,
        name: str | None = None,
    ) -> None:
        super().__init__(queues, connection=connection, heartbeat_s=settings.heartbeat_s, name=name)
        self.phase = Phase.starting
        self.resident = resident
        self.model = describe_model(resident.pipe, settings.checkpoint)
        self.seen_ttl_s = settings.model_seen_ttl_s
        self.metrics = metrics
        self.webhooks = WebhookNotifier(connection, settings, resident.storage)  # queues deliveries, never sends
        self.books = Bookkeeper(self, resident.keys, self.lease_s, webhooks=self.webhooks, redis=self.redis_link)
        self.batcher = Batcher(
            connection, self.queues, max_images=settings.max_batch_images, window_s=settings.batch_window_ms / 1000,
            redis=self.redis_link, wait_cap_s=self.heartbeat_s, claimer=self.name,
        )
        self.sweeper = Sweeper(connection, self.queues, worker_key_prefix=self.redis_worker_namespace_prefix,
                               stranded_after_s=self.lease_s)
        # per model: each model's workers sweep its queues (and every worker the queues of jobs naming no model)
        self.sweep_lock = f"{resident.keys.prefix}:sweep:{resident.pipe.name}"
        # A dead worker's jobs come back as soon as their leases lapse (idle or busy), first in line; after an
        # outage, with the same steady contact that RQ's registry cleanup waits for (RQWorker.clean_registries).
        self.push_exc_handler(back_first(connection))
        self.lease_watch = LeaseWatch(connection, self.queues, self._clean_started, link=self.redis_link,
                                      settle_s=self.lease_s + self.heartbeat_s, cap_s=self.heartbeat_s)
        self.runner = BatchRunner(
            resident.pipe,
            quick_client(connection, STEP_TIMEOUT_S),
            resident.keys,
            death_penalty_class=self.death_penalty_class,
            stop_requests=lambda: set(self.stop_ids),
            observe=self._observe,
            webhooks=self.webhooks,
            redis=self.redis_link,
        )
        self.finalizer = Finalizer(self.books, resident.storage, resident.model, metrics, wait_cap_s=self.heartbeat_s)

    def on_birth(self) -> None:
        # GET /v1/models reads the model from the worker's own hash, so the entry lives and dies with the worker
        # (and comes back with it when the worker registers again after an outage).
        publish_model(self.connection, self.key, self.model)
        self._mark_served()
        self.lease_watch.start()

    def teardown(self) -> None:
        self.lease_watch.stop()
        super().teardown()

    def on_idle(self) -> None:
        self._enter(Phase.idle)

    def _mark_served(self) -> None:
        # for SDQ_MODEL_SEEN_TTL_S: the API keeps taking this model's jobs a while after its last worker left
        mark_served(self.connection, self.resident.keys, self.resident.pipe.name, time.time(),
                    self.seen_ttl_s)

    def on_maintenance(self) -> None:
        self._mark_served()
        # One worker sweeps per heartbeat (claimed, not started) and per lease (popped, not claimed: a scan of every
        # job hash). The locks are never released: they are rate limits, and a killed sweeper holds them briefly.
        if self.connection.set(f"{self.sweep_lock}:claimed", self.name, nx=True, ex=self.heartbeat_s):
            self.sweeper.return_claimed()
        if self.connection.set(f"{self.sweep_lock}:stranded", self.name, nx=True, ex=self.lease_s):
            self.sweeper.return_stranded()

    # one turn ------------------------------------------------------------------------------------------------
    def run_turn(self, job: Job, queue: Queue) -> None:
        """Run the batch headed by ``job``: every job of it ends with exactly one outcome."""
        self._enter(Phase.collecting)
        try:
            # 1. claim the head (it may have been canceled, or started by another worker, since RQ popped it)
            head = self.batcher.take_head(job, queue)
            if head is None:
                log.info("job %s is no longer queued (canceled or started elsewhere): skipped", job.id)
                return
            # 2. collect compatible waiting jobs, within the batch window (none for a job whose worker died)
            claims = self._collect(head)
            specs = [_spec_or_error(claim) for claim in claims]
            # 3. mark them started: RQ records, meta.started_at, `running` events, start webhooks
            batch_images = sum(s.params.n for s in specs if isinstance(s, JobSpec))
            runs = self.books.start(claims, batch_images)
            self.batch_ids = {run.id for run in runs}
            self._enter(Phase.running)
            with logs.jobs([run.id for run in runs]), Heartbeat(self.books, self.heartbeat_s) as heartbeat:
                log.info("batch of %d jobs, %d images", len(runs), batch_images)
                heartbeat.track(runs)
                # 4. read each job's inputs; a job the model cannot run fails alone, before the batch
                items = []
                for run, spec in zip(runs, specs, strict=True):
                    with logs.jobs([run.id]):
                        if isinstance(spec, Error):  # no readable spec: it fails alone, with the parse error
                            self.finalizer.finalize(heartbeat, run, None, spec)
                            continue
                        try:
                            if spec.params.model not in (None, self.resident.pipe.name):  # misrouted: never run it
                                raise ValueError(f"this job is for model {spec.params.model!r}, and this worker "
                                                 f"holds {self.resident.pipe.name!r}")
                            refiner = self.resident.pipe.refiner
                            if spec.params.refiner is not None and spec.params.refiner.model != (
                                    refiner.name if refiner else None):
                                raise ValueError(f"refiner.model: this job asks for {spec.params.refiner.model!r}, "
                                                 f"and this worker holds {refiner.name if refiner else 'none'}")
                            # reads img2img / inpaint inputs, waiting out a storage outage for as long as the job may
                            request = to_request(spec, self.finalizer.storage_for(run))
                            self.resident.pipe.check(request)
                        except StorageUnavailable:
                            self.finalizer.finalize(heartbeat, run, spec, GiveBack(current_exc_info()))
                            continue
                        except Exception:
                            self.finalizer.finalize(heartbeat, run, spec, Error(current_exc_info()))
                            continue
                    items.append(BatchItem(run, spec, request))
                # 5. run them; each job's outcome comes back as soon as it is known
                for item, outcome in self.runner.run(items):
                    # 6. write its images, record the outcome in RQ, announce it
                    with logs.jobs([item.run.id]):
                        self.finalizer.finalize(heartbeat, item.run, item.spec, outcome)
        finally:
            self._enter(Phase.stopping if self.stop_requested else Phase.idle)

    def _collect(self, head: Claim) -> list[Claim]:
        """The batcher's collection, with the worker's heartbeat kept up: a window may outlast a lease, and the
        sweeper takes back the claims of a worker whose registration lapsed."""
        last_beat = time.monotonic()

        def keep_alive() -> None:
            nonlocal last_beat
            if time.monotonic() - last_beat >= self.heartbeat_s:
                last_beat = time.monotonic()
                self.heartbeat()

        return self.batcher.collect(head, should_stop=lambda: self.stop_requested, keep_alive=keep_alive)

    def _observe(self, call: CallStats) -> None:
        self.metrics.pipeline_call(call.images, call.steps, call.steps_per_second, call.seconds)
        try:
            record_pipeline_call(self.connection, self.resident.keys, call.seconds, call.images, call.jobs,
                                 self.resident.pipe.name)
        except redis.exceptions.RedisError as exc:  # statistics for ETAs: this call's are skipped
            self.redis_link.failed(exc, "recording queue statistics")

    def _enter(self, phase: Phase) -> None:
        if phase != self.phase:
            log.debug("worker %s: %s -> %s", self.name, self.phase.value, phase.value)
            self.phase = phase
        self.metrics.busy.set(1 if phase in (Phase.collecting, Phase.running) else 0)


def _spec_or_error(claim: Claim) -> JobSpec | Error:
    """The job's spec; a job without a readable one fails alone, with the parse error."""
    try:
        return job_spec(claim.job)
    except Exception:
        return Error(current_exc_info())
