"""Run the jobs of one batch through the resident pipeline, so that each job gets its own outcome.

- Jobs are converted to ``GenerationRequest``s and grouped by ``GenerationRequest.batch_key()`` (what the pipeline
  requires; normally one group, since the batcher matched ``JobSpec.batch_key()``).
- One ``Pipeline.generate`` call per group, with a ``StepReporter`` for progress, previews and cancellation.
- If the call raises for the whole batch: out of memory -> split the batch in two halves (by images) and run each,
  recursively, before any job fails; any other error -> run the jobs one by one, so only the faulty one fails.
  A job timeout ends the call for all its jobs (they ran out of time together).
- An infrastructure error out of the call (``outages.is_infrastructure_error``: Redis, storage; the step callback
  swallows its own, so this is a second line) is never a job's error: the same jobs run again, after a pause, up to
  ``INFRA_RERUNS`` times, and are then given back to their queues (``GiveBack``, RQ ``Retry``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import Redis
from rq.queue import Queue
from rq.timeouts import BaseDeathPenalty, JobTimeoutException

from core.jobs import JobSpec
from core.queues import Keys
from core.storage import Storage
from core.webhook_queue import WebhookNotifier
from model.requests import GenerationRequest, GenerationResult, LoraRef
from worker.inputs import load_inputs, paste_back
from worker.outages import Link, is_infrastructure_error
from worker.progress import DropReason, ReportedJob, StepReporter
from worker.rq_records import ExcInfo, RunningJob

if TYPE_CHECKING:
    from model.pipeline import Pipeline

log = logging.getLogger(__name__)

INFRA_RERUNS = 2
RERUN_PAUSE_S = 1.0  # times the rerun's number


@dataclass
class BatchItem:
    run: RunningJob
    spec: JobSpec
    request: GenerationRequest


@dataclass(frozen=True)
class CallStats:
    seconds: float  # text encoding to decoded images
    images: int
    jobs: int
    steps: int  # denoising steps run
    steps_per_second: float


@dataclass(frozen=True)
class Done:
    result: GenerationResult
    pipeline_seconds: float


@dataclass(frozen=True)
class Error:
    exc_info: ExcInfo


@dataclass(frozen=True)
class Dropped:
    reason: DropReason


@dataclass(frozen=True)
class GiveBack:
    """The infrastructure kept the job from finishing here: back to its queue through RQ's Retry."""

    exc_info: ExcInfo


@dataclass(frozen=True)
class Retry:
    """After a failed call: outcomes that are final, and the parts to run again."""

    final: list[tuple[BatchItem, Outcome]]
    parts: list[list[BatchItem]]
    free_memory: bool = False  # out of memory: collect garbage before the parts run
    rerun: bool = False  # the call failed for the infrastructure's reasons: its parts are the same jobs again


Outcome = Done | Error | Dropped | GiveBack
Finished = Iterator[tuple[BatchItem, Outcome]]  # each item once, with its outcome, as soon as it is known
# Called after every pipeline call that produced images, with what it ran and how fast.
CallObserver = Callable[["CallStats"], None]


def to_request(spec: JobSpec, storage: Storage | None = None) -> GenerationRequest:
    """The pipeline request of ``spec``; img2img / inpaint inputs are read from ``storage``."""
    p = spec.params
    init_image, mask = load_inputs(spec, storage)
    return GenerationRequest(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        task=spec.task,
        width=p.width,
        height=p.height,
        steps=p.steps,
        guidance_scale=p.guidance_scale,
        sampler=p.sampler.value,
        karras=p.karras,
        eta=p.eta,
        seed=spec.seed,
        n=p.n,
        strength=1.0 if spec.strength is None else spec.strength,
        init_image=init_image,
        mask=mask,
        loras=[LoraRef(lora.name, lora.scale) for lora in p.loras],
        vae=p.vae,
        original_size=p.original_size,
        crop_top_left=p.crops_coords_top_left,
        target_size=p.target_size,
        refiner_switch=None if p.refiner is None else p.refiner.switch_at,
    )


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError is a RuntimeError; other backends (MPS, oneDNN) raise plain RuntimeErrors saying so.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def current_exc_info() -> ExcInfo:
    exc_type, exc, tb = sys.exc_info()
    assert exc_type is not None and exc is not None
    return exc_type, exc, tb


class BatchRunner:
    def __init__(
        self,
        pipe: Pipeline,
        connection: Redis,
        keys: Keys,
        *,
        death_penalty_class: type[BaseDeathPenalty],
        stop_requests: Callable[[], set[str]] = set,
        observe: CallObserver | None = None,
        webhooks: WebhookNotifier | None = None,
        redis: Link | None = None,
    ) -> None:
        self.pipe = pipe
        self.connection = connection  # for the step callback
        self.keys = keys
        self.death_penalty_class = death_penalty_class
        self.stop_requests = stop_requests
        self.observe = observe
        self.webhooks = webhooks
        self.redis = redis or Link("Redis")
        # On the CPU, a network's first pass measures each layer kind packed and plain (``model.cpu_choice``) and
        # only then fixes the path, so that pass mixes paths. The first batch is run once with its results dropped,
        # so every image is computed on the settled paths: the same request gives the same pixels in every batch.
        # A worker whose warm-up (SDQ_WARMUP_SHAPES) already ran that pass skips it.
        device = getattr(pipe, "device", None)
        settle = getattr(pipe, "settle_cpu_self_check", None)
        self.self_check_pending = getattr(device, "type", None) == "cpu" and not (settle is not None and settle())

    def run(self, items: Sequence[BatchItem]) -> Finished:
        """Yield every item exactly once with its outcome, as soon as that item is done."""
        groups: dict[str, list[BatchItem]] = {}
        for item in items:
            groups.setdefault(item.request.batch_key(), []).append(item)
        for group in groups.values():
            yield from self._run(group)

    def _run(self, items: list[BatchItem], reruns: int = 0) -> Finished:
        reporter = StepReporter(
            self.connection,
            self.keys,
            [ReportedJob(item.run.job, item.spec) for item in items],
            preview=self.pipe.preview,
            stop_requests=self.stop_requests,
            webhooks=self.webhooks,
            redis=self.redis,
        )
        started = time.monotonic()
        retry: Retry | None = None
        try:
            with self._deadline(items):
                if self.self_check_pending:
                    self.self_check_pending = False
                    # One step at full strength: the same networks and shapes (rows, size, guidance), at a step's cost.
                    log.info("first batch: one step for the CPU self-check, then the batch for its results")
                    self.pipe.generate([dataclasses.replace(item.request, steps=1, strength=1.0) for item in items])
                results = self.pipe.generate([item.request for item in items], callback=reporter)
        except JobTimeoutException:
            exc_info = current_exc_info()
            for item in items:
                yield item, Error(exc_info)  # they ran out of time together
            return
        except Exception as exc:
            retry = self._after_failure(items, reporter, exc, reruns)
        if retry is not None:
            # Past the except block, so the exception's traceback no longer pins the failed call's tensors.
            if retry.free_memory:
                release_memory()
            yield from retry.final
            if retry.rerun:
                time.sleep(RERUN_PAUSE_S * (reruns + 1))
            for part in retry.parts:
                yield from self._run(part, reruns + 1 if retry.rerun else 0)
            return
        seconds = time.monotonic() - started
        done = [(item, result) for item, result in zip(items, results, strict=True) if result is not None]
        if done and self.observe is not None:
            self.observe(CallStats(seconds, images(items), len(items), reporter.steps, reporter.steps_per_second()))
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            if result is None:
                yield item, Dropped(reporter.dropped.get(i, "canceled"))
            else:
                yield item, Done(paste_back(item.spec, item.request, result), seconds)

    def _after_failure(self, items: list[BatchItem], reporter: StepReporter, exc: Exception, reruns: int) -> Retry:
        """What a call that raised leaves: jobs dropped before the error stay dropped; after an infrastructure error
        the others run again as they were (given back after ``INFRA_RERUNS``); else a lone job fails, and the
        others run again (split in halves on out-of-memory, else one by one, so only the faulty job fails)."""
        final: list[tuple[BatchItem, Outcome]] = [(items[i], Dropped(why)) for i, why in reporter.dropped.items()]
        pending = [item for i, item in enumerate(items) if i not in reporter.dropped]
        if pending and is_infrastructure_error(exc):
            if reruns < INFRA_RERUNS:
                log.warning("pipeline call of %d jobs failed (%s: %s), not for any job's reasons: running it again",
                            len(pending), type(exc).__name__, exc)
                return Retry(final, [pending], rerun=True)
            log.warning("pipeline call of %d jobs failed %d times (%s: %s): giving the jobs back to their queues",
                        len(pending), reruns + 1, type(exc).__name__, exc)
            exc_info = current_exc_info()
            return Retry([*final, *((item, GiveBack(exc_info)) for item in pending)], [])
        if len(pending) == 1:
            return Retry([*final, (pending[0], Error(current_exc_info()))], [])
        if pending and is_out_of_memory(exc):
            first, second = halves(pending)
            log.warning("out of memory on %d images: retrying as %d + %d",
                        images(pending), images(first), images(second))
            return Retry(final, [first, second], free_memory=True)
        if pending:
            log.warning("batch of %d jobs failed (%s: %s): running them one by one",
                        len(pending), type(exc).__name__, exc)
        return Retry(final, [[item] for item in pending])

    @contextlib.contextmanager
    def _deadline(self, items: list[BatchItem]) -> Iterator[None]:
        """RQ's job timeout for the call: the longest of its jobs' timeouts, so no job is cut short of its own."""
        timeouts = [int(item.run.job.timeout or Queue.DEFAULT_TIMEOUT) for item in items]
        if any(t <= 0 for t in timeouts):  # -1 = no timeout
            yield
            return
        with self.death_penalty_class(max(timeouts), JobTimeoutException, job_id=items[0].run.id):
            yield


def images(items: Sequence[BatchItem]) -> int:
    return sum(item.request.n for item in items)


def halves(items: list[BatchItem]) -> tuple[list[BatchItem], list[BatchItem]]:
    """Split in two parts of about equal image counts, keeping order; both non-empty."""
    total, running = images(items), 0
    for cut in range(1, len(items)):
        running += items[cut - 1].request.n
        if running * 2 >= total:
            return items[:cut], items[cut:]
    return items[:-1], items[-1:]


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
