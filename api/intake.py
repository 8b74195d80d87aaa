"""What every job-creating route does with a validated job: check the caller may submit it, honour
`Idempotency-Key` and `Prefer: wait=N`, apply the per-key limits, enqueue it.

A route builds its `JobSpec` and hands it over:

    @router.post("/txt2img", status_code=202, responses=SUBMIT_RESPONSES)
    async def submit_txt2img(request: Txt2ImgRequest, intake: IntakeDep, response: Response) -> JobPublic:
        return await intake.accept(jobstore.new_job_spec(request, "txt2img"), response, request)

Order of checks: priority allowed for the key (403), idempotent replay (no limits spent), submissions per minute
and queued jobs per key (429), the global queue limit (503). A request refused after claiming its Idempotency-Key
gives the key back, so the client can retry with it.

Whatever dies when, nothing is lost and nothing stays stuck:
- The API dies after claiming an Idempotency-Key and before the enqueue: the claim is a "pending" record that
  lapses after PENDING_TTL_S, and a retry then takes the key (`_IdempotencyClaim`).
- The enqueue's reply is lost: the jobs are looked up before answering (`core.commit`): 202 if they exist, 503
  with the inputs deleted and the key given back if they surely do not, and 503 keeping both (the job may exist)
  if Redis cannot be asked.
- With SDQ_DURABLE_SUBMIT, 202 means the job is on disk (`api.durability`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from fastapi import Response
from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from api import errors
from api.auth import Caller
from api.durability import DurabilityUnavailable
from api.errors import ApiError
from api.instrumentation import ApiMetrics
from api.limits import KeyLimits
from api.submitter import QueueFullError, Submitter
from core import commit, eventlog, fleet, jobstore
from core.catalog import live_models
from core.commit import KeyRecord
from core.jobs import JobPublic, JobSpec
from core.loras import unknown_loras
from core.queues import Keys
from core.settings import Settings
from core.storage import Storage

MAX_WAIT_S = 60
IDEMPOTENCY_TTL_S = 24 * 3600
# How long a claimed Idempotency-Key waits for its request's enqueue. A request gets from its claim to the enqueue
# transaction within a few Redis timeouts (SDQ_REDIS_TIMEOUT_S each) even when Redis stalls; one whose API process
# died never gets there, and its retry may take the key once the claim has lapsed.
PENDING_TTL_S = 60
_UNAVAILABLE_RETRY_S = 5
_QUEUE_FULL_RETRY_S = 5

SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobPublic, "description": "With `Prefer: wait=N`: the job ended within N seconds (any outcome)."},
    400: {"model": errors.ErrorResponse, "description": "The body cannot be read (e.g. a malformed multipart form)."},
    202: {"description": "Queued (or, with `Idempotent-Replayed: true`, the job an earlier request made). Poll "
                         "`Location`, or follow `GET /v1/jobs/{id}/events`."},
    **errors.responses(401, 403, 409, 413, 422, 429, 503, described={
        403: "The API key may not use this `priority`.",
        409: "The Idempotency-Key was used with a different body, its first request is still being handled, or "
             "the job it made has expired.",
        503: "The queues hold SDQ_MAX_QUEUED_JOBS jobs, Redis is unreachable, or (SDQ_DURABLE_SUBMIT) Redis did not "
             "confirm the job on disk in time; retry after `Retry-After`, with the same Idempotency-Key if any.",
    }),
}


@dataclass
class Services:
    """The app-wide parts a submission needs (one per app, built in `create_app`)."""

    settings: Settings
    redis: Redis
    aredis: AsyncRedis  # for blocking reads of event logs (its socket timeout is above their block time)
    acommands: AsyncRedis  # for short commands (auth, limits, Idempotency-Key): times out after SDQ_REDIS_TIMEOUT_S
    keys: Keys
    storage: Storage
    submitter: Submitter
    limits: KeyLimits
    metrics: ApiMetrics


class Intake:
    """One request's submission: the app's services plus who calls and the request's Prefer / Idempotency-Key."""

    def __init__(self, services: Services, caller: Caller, prefer: str | None, idempotency_key: str | None) -> None:
        self.s = services
        self.caller = caller
        self.wait_s = parse_wait(prefer)
        self.idempotency_key = idempotency_key

    async def accept(
        self, spec: JobSpec, response: Response, request: BaseModel,
        on_refused: Callable[[], Awaitable[None]] | None = None,
    ) -> JobPublic:
        """Queue `spec` for the caller (or find the job an earlier request with the same Idempotency-Key made).

        `request` is the validated request body: "the same request" for Idempotency-Key means the same task and
        an equal `request`. `on_refused` undoes what the route did before (e.g. stored input images) when the job
        is not queued after all; it is not called for a replay, whose spec is simply dropped.
        """
        caller = self.caller
        if not caller.allows(spec.params.priority):
            raise ApiError(
                403, "forbidden",
                f"priority {spec.params.priority.value!r} is not allowed for API key {caller.name!r} (its highest "
                f"is {caller.max_priority.value!r})",
                field="priority",
            )
        # What the live workers hold, read once: every check below is against it.
        live = await to_thread.run_sync(live_models, self.s.redis, self.s.keys)
        try:  # the model it runs on (core.fleet), before anything is queued
            model = await to_thread.run_sync(fleet.route, self.s.redis, self.s.keys, spec.params.model,
                                             self.s.settings.default_model, self.s.settings.model_seen_ttl_s, live)
        except fleet.ModelRefused as exc:
            if on_refused is not None:
                await on_refused()
            raise ApiError(422, "invalid_request", str(exc), field="model") from None
        spec = spec.model_copy(update={"params": spec.params.model_copy(update={"model": model})})
        if model is not None and spec.task == "txt2img" and not {"width", "height"} & spec.params.model_fields_set:
            # a size left out is the model's own (SDXL 1024); the rules hold for it as for any size given
            side = live.default_size(model)
            if side is not None and (side, side) != (spec.params.width, spec.params.height):
                params = spec.params.model_copy(update={"width": side, "height": side})
                spec = spec.model_copy(update={"params": params})
        if spec.params.loras:  # a name no live worker can load is refused before anything is queued
            problem = unknown_loras(spec.params.loras, live.loras())
            if problem is not None:
                if on_refused is not None:
                    await on_refused()
                raise ApiError(422, "invalid_request", problem, field="loras")
        if spec.params.refiner is not None:  # a live worker of the job's model must hold that refiner
            held = live.refiners_of(model)
            if spec.params.refiner.model not in held:
                if on_refused is not None:
                    await on_refused()
                where = f"model {model!r}" if model else "this deployment"
                raise ApiError(422, "invalid_request", f"refiner {spec.params.refiner.model!r} is not held by a live "
                               f"worker of {where}; held: {', '.join(held) or 'none'}", field="refiner.model")
        if spec.params.vae == "tiny" and not live.tiny_vae():
            if on_refused is not None:
                await on_refused()
            raise ApiError(422, "invalid_request", "vae 'tiny': no live worker holds a tiny VAE (the operator sets "
                           "SDQ_TINY_VAE); use vae 'full'", field="vae")
        spec = spec.model_copy(update={"owner": caller.name})
        claim = None
        if self.idempotency_key is not None:
            claim = _IdempotencyClaim(self.s, caller, self.idempotency_key, _fingerprint(spec.task, request))
        try:
            earlier = await claim.take(spec.id) if claim is not None else None
            if earlier is not None:
                await self._replay_on_disk(earlier)
            position = await self._enqueue(spec, claim) if earlier is None else None
        except Exception as exc:  # not CancelledError: a client that went away may still have its job queued
            if on_refused is not None and not isinstance(exc, _MaybeQueued):
                await on_refused()
            raise
        if earlier is not None:
            if on_refused is not None:
                await on_refused()
            response.headers["Idempotent-Replayed"] = "true"
            return await self._respond(earlier, response, None)
        self.s.metrics.jobs_submitted.labels(spec.task, spec.params.priority.value, spec.params.model or "").inc()
        return await self._respond(spec.id, response, jobstore.queued_view(spec, position))

    async def _enqueue(self, spec: JobSpec, claim: _IdempotencyClaim | None) -> int:
        owner = self.caller.name
        try:
            if owner is not None:
                await self.s.limits.take_submission(owner)
                await self.s.limits.reserve_queued(owner, spec.id)
            return await self.s.submitter.submit(spec, claim.record(spec.id) if claim is not None else None)
        except commit.CommitUnknown:
            # The job may be queued: its inputs, key and slot stay (a pending key lapses, a slot of a job that never
            # came is pruned); the client can look, or retry with its Idempotency-Key.
            raise _MaybeQueued(
                f"Redis stopped answering while job {spec.id} was being queued and could not be asked afterwards "
                f"whether it was; GET /v1/jobs/{spec.id} tells once Redis answers{_RETRY_HINT}"
            ) from None
        except commit.NotOnDisk as exc:
            raise _MaybeQueued(
                f"job {spec.id} is queued, but {exc} (SDQ_DURABLE_SUBMIT); it may still run{_RETRY_HINT}"
            ) from None
        except Exception as exc:
            if claim is not None:
                await claim.give_back(spec.id)
            if owner is not None:
                await self.s.limits.release_queued(owner, spec.id)
            if isinstance(exc, QueueFullError):
                raise ApiError(
                    503, "queue_full",
                    f"queue full: {self.s.settings.max_queued_jobs} jobs waiting (SDQ_MAX_QUEUED_JOBS); retry later",
                    headers={"Retry-After": str(_QUEUE_FULL_RETRY_S)},
                ) from None
            if isinstance(exc, DurabilityUnavailable):
                raise _unavailable(str(exc)) from None
            raise

    async def _replay_on_disk(self, job_id: str) -> None:
        """With SDQ_DURABLE_SUBMIT a replay, too, answers 202 only once its job is on disk: the first request may
        have been answered 503 because its confirmation was late."""
        try:
            await self.s.submitter.confirm_on_disk(job_id)
        except (commit.NotOnDisk, DurabilityUnavailable) as exc:
            raise _unavailable(f"job {job_id} is queued, but {exc} (SDQ_DURABLE_SUBMIT)") from None

    async def _respond(self, job_id: str, response: Response, view: JobPublic | None) -> JobPublic:
        """The job as it is now; with `Prefer: wait=N` once it has ended or N seconds have passed (then 200 if
        it ended). `view` saves a read when nothing happened since it was made."""
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        if self.wait_s is not None:
            response.headers["Preference-Applied"] = f"wait={self.wait_s}"
            if view is None or not view.status.is_terminal():
                await wait_for_end(self.s.aredis, self.s.keys, job_id, self.wait_s)
                view = None
        if view is None:
            view = await to_thread.run_sync(jobstore.get_job, self.s.redis, self.s.keys, self.s.storage, job_id)
        if view is None:  # expired between the idempotency record and now
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        if self.wait_s is not None and view.status.is_terminal():
            response.status_code = 200
        return view


_RETRY_HINT = "; a retry with the same Idempotency-Key never makes a second job"


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(_UNAVAILABLE_RETRY_S)})


class _MaybeQueued(ApiError):
    """503 for a submission whose job may be queued: nothing the request made is undone."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "unavailable", message, headers={"Retry-After": str(_UNAVAILABLE_RETRY_S)})


# KEYS[1]: the record; ARGV[1]: the value this request set. Deletes it only if it is still that value.
_DELETE_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class _IdempotencyClaim:
    """`Idempotency-Key` per API key, one Redis record per key.

    The record is "fingerprint:job id:pending" (SET NX, PENDING_TTL_S) while the request is in flight, and the
    enqueue transaction itself turns it into "fingerprint:job id" for 24 h (`core.commit.finalize_records`). So
    a final record always names a job that was queued, and a request that dies before its enqueue leaves only a
    pending record, which lapses: its retry gets 409 "still being handled" with Retry-After until then, and takes
    the key after. (Recording the key only in the enqueue transaction would leave two concurrent requests with one
    key both free to queue a job; a pending record with a long TTL would lock the key for that TTL after a crash.)
    A pending record whose job exists (it was queued by a process that wrote no final record) answers as final.
    """

    def __init__(self, services: Services, caller: Caller, key: str, fingerprint: str) -> None:
        self.aredis = services.acommands
        self.key = key
        self.fingerprint = fingerprint
        self.redis_key = services.keys.idempotency(caller.name, hashlib.sha256(key.encode()).hexdigest()[:32])

    async def take(self, job_id: str) -> str | None:
        """None when this request now owns the key (for `job_id`); else the id of the earlier request's job."""
        for _ in range(3):  # a record that expires between SET NX and GET is simply taken on the next try
            if await self.aredis.set(self.redis_key, self._pending(job_id), nx=True, ex=PENDING_TTL_S):
                return None
            earlier = await self.aredis.get(self.redis_key)
            if earlier is None:
                continue
            fingerprint, earlier_id, *pending = earlier.decode().split(":")
            if fingerprint != self.fingerprint:
                raise ApiError(
                    409, "idempotency_conflict",
                    f"Idempotency-Key {self.key!r} was used with a different request body in the last 24 h; use a "
                    "new key for a new request",
                    field="Idempotency-Key",
                )
            if await self.aredis.exists(Job.key_for(earlier_id)):
                return earlier_id
            if pending:
                raise ApiError(
                    409, "idempotency_conflict",
                    f"a request with Idempotency-Key {self.key!r} is still being handled; retry in a moment (if "
                    f"it was cut off, the key is free again within {PENDING_TTL_S} s)",
                    field="Idempotency-Key", headers={"Retry-After": "1"},
                )
            raise ApiError(
                409, "idempotency_conflict",
                f"the job made for Idempotency-Key {self.key!r} ({earlier_id}) has expired; use a new key",
                field="Idempotency-Key",
            )
        raise ApiError(409, "idempotency_conflict", f"Idempotency-Key {self.key!r} is busy; retry",
                       field="Idempotency-Key", headers={"Retry-After": "1"})

    def record(self, job_id: str) -> KeyRecord:
        """What the enqueue transaction writes to make this request's claim final."""
        return KeyRecord(self.redis_key, self._pending(job_id), f"{self.fingerprint}:{job_id}", IDEMPOTENCY_TTL_S)

    async def give_back(self, job_id: str) -> None:
        """Forget the claim if it is still this request's (the job was surely not queued)."""
        await self.aredis.eval(_DELETE_IF_SAME, 1, self.redis_key, self._pending(job_id))  # type: ignore[misc]

    def _pending(self, job_id: str) -> str:
        return f"{self.fingerprint}:{job_id}:pending"


def _fingerprint(task: str, request: BaseModel) -> str:
    body = json.dumps(request.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{task}\n{body}".encode()).hexdigest()


def parse_wait(prefer: str | None) -> int | None:
    """Seconds from `Prefer: wait=N` (RFC 7240; other preferences ignored), capped at MAX_WAIT_S; None if absent
    or not a whole number."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if value.isdigit():
                return min(int(value), MAX_WAIT_S)
    return None


async def wait_for_end(aredis: AsyncRedis, keys: Keys, job_id: str, seconds: float) -> None:
    """Return when the job's event log shows a terminal event, or after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    last_id: bytes | str = "0-0"
    log_key = keys.event_log(job_id)
    while (remaining := deadline - loop.time()) > 0:
        block_ms = max(1, int(min(remaining, eventlog.READ_BLOCK_S) * 1000))
        reply = await aredis.xread({log_key: last_id}, count=100, block=block_ms)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                if json.loads(fields[b"message"])["event"] in eventlog.TERMINAL_EVENTS:
                    return
