"""The chaos drills. Each takes a running `Cluster` and a `Size`, breaks something while jobs run, lets the service
recover, and returns its `Figure` once `Ledger.check` found the end state right (it raises otherwise).

1. ``worker_sigkill``: the worker running a batch is SIGKILLed, a new one started; repeated.
2. ``redis_restart``: Redis is SIGKILLed while the workers are busy and started again (append-only file replay);
   clients keep submitting through the outage.
3. ``redis_full``: Redis refuses writes (``maxmemory`` + ``noeviction``, a filler key) while the workers are busy,
   then is freed; clients keep submitting.
4. ``api_sigkill``: the API is SIGKILLed under load and a new one started; clients retry with the same
   Idempotency-Key until they get an answer.
5. ``queue_burst``: 2,000 requests at once on an API with a small ``SDQ_MAX_QUEUED_JOBS``.
6. ``poison_job``: the worker that starts one particular job is SIGKILLed, every time: that job alone fails.
7. ``webhook_after_crash``: a worker is SIGKILLed the moment one of its jobs has succeeded: the job's completed
   webhook and terminal event still come.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
import redis.exceptions
from rq.job import Job

from api.intake import PENDING_TTL_S
from tests.chaos import clients
from tests.chaos.clients import Submission
from tests.chaos.cluster import Cluster, Proc, wait_until
from tests.chaos.ledger import Figure, Ledger
from tests.redis_server import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    jobs: int = 4  # jobs per round
    rounds: int = 2  # faults per drill
    steps: int = 4  # denoising steps of a job
    busy_steps: int = 60  # steps of the jobs running when Redis goes (a batch of a second or more)
    outage_s: float = 3.0  # longer than a lease (3 s with SDQ_HEARTBEAT_S=1)
    burst: int = 2000
    queue_limit: int = 10  # SDQ_MAX_QUEUED_JOBS of the burst's API
    connections: int = 50  # the burst's keep-alive connections


SHORT = Size()
FULL = Size(jobs=12, rounds=5, outage_s=5.0, queue_limit=20)


ALL_EVENTS = ("start", "progress", "completed")


class Seeds:
    """A drill's job parameters, each job with a seed of its own."""

    def __init__(self) -> None:
        self.next = 1

    def params(self, cluster: Cluster, steps: int, n: int = 1, events: tuple[str, ...] = ("completed",)
               ) -> dict[str, Any]:
        """A small txt2img job (64x64, one batch key for a given ``steps``) with a webhook to the receiver."""
        self.next += 1
        return {"prompt": "a chaos drill", "width": 64, "height": 64, "steps": steps, "sampler": "euler",
                "seed": self.next, "n": n, "webhook": cluster.receiver.url, "webhook_events_filter": list(events)}


def submit_all(cluster: Cluster, params: list[dict[str, Any]], allowed: frozenset[str] = clients.DOCUMENTED,
               deadline_s: float = 120) -> list[Submission]:
    """Each job submitted in turn, every one retried until answered (for at most ``deadline_s`` each)."""
    with httpx.Client(base_url=cluster.url, timeout=10) as http:
        return [clients.submit(http, p, deadline_s=deadline_s, allowed=allowed) for p in params]


def submit_in_background(cluster: Cluster, params: list[dict[str, Any]],
                         allowed: frozenset[str] = clients.DOCUMENTED, deadline_s: float = 120
                         ) -> Callable[[], list[Submission]]:
    """``submit_all`` on a thread; the returned function joins it and gives its submissions."""
    out: list[Submission] = []
    thread = threading.Thread(target=lambda: out.extend(submit_all(cluster, params, allowed, deadline_s)),
                              daemon=True)
    thread.start()

    def join() -> list[Submission]:
        thread.join(deadline_s + 60)
        assert not thread.is_alive(), f"the submitting client is still retrying after {deadline_s + 60:.0f} s"
        return out

    return join


def job_fields(cluster: Cluster, job_ids: list[str]) -> list[tuple[str, str]]:
    """(status, worker name) of each job, as RQ's job hashes hold them."""
    pipe = cluster.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(f"rq:job:{job_id}", ["status", "worker_name"])
    return [((s or b"").decode(), (w or b"").decode()) for s, w in pipe.execute()]


def running_worker(cluster: Cluster, job_ids: list[str], timeout: float = 60) -> Proc:
    """The worker process of the first of these jobs to be started, as soon as one is."""
    found: list[Proc] = []

    def started() -> bool:
        for status, name in job_fields(cluster, job_ids):
            proc = cluster.worker_named(name) if status == "started" else None
            if proc is not None and proc.alive():
                found.append(proc)
                return True
        return False

    wait_until(started, timeout, "a job of the round to start", every=0.01)
    return found[0]


def replace(cluster: Cluster, victim: Proc) -> Proc:
    """SIGKILL ``victim`` and start a worker in its place (not waited for)."""
    cluster.kill(victim)
    return cluster.start_worker(wait=False)


# 1 --------------------------------------------------------------------------------------------------------------
def worker_sigkill(cluster: Cluster, size: Size) -> Figure:
    ledger = Ledger(cluster, "worker_sigkill")
    seeds = Seeds()
    for _ in range(size.rounds):
        subs = submit_all(cluster, [seeds.params(cluster, size.steps, n=1 + i % 2) for i in range(size.jobs)])
        ledger.add(*subs)
        victim = running_worker(cluster, [s.job_id for s in subs if s.job_id])
        ledger.fault()
        new = replace(cluster, victim)
        # One fault per job: the round's jobs end before the next round kills again.
        ledger.wait_ended([s.job_id for s in subs if s.job_id])
        cluster.wait_registered(new)
    return ledger.check()


# 2, 3 -----------------------------------------------------------------------------------------------------------
def _redis_outage(cluster: Cluster, size: Size, drill: str, begin: Callable[[], None], end: Callable[[], None]
                  ) -> Figure:
    """Once a batch runs the outage begins; a client submits through it; it ends after ``size.outage_s``."""
    ledger = Ledger(cluster, drill)
    seeds = Seeds()
    for _ in range(size.rounds):
        # Their start and progress webhooks keep the webhook sender busy too.
        subs = submit_all(cluster, [seeds.params(cluster, size.busy_steps, n=1 + i % 2, events=ALL_EVENTS)
                                    for i in range(size.jobs)])
        ledger.add(*subs)
        busy = [s.job_id for s in subs if s.job_id]
        running_worker(cluster, busy)
        begin()
        began = datetime.now(timezone.utc)
        ledger.fault()
        late = submit_in_background(cluster, [seeds.params(cluster, size.steps) for _ in range(max(1, size.jobs // 2))])
        time.sleep(size.outage_s)
        end()
        ledger.add(*late())
        ledger.wait_ended()
        ended = [Job.fetch(j, connection=cluster.redis).ended_at for j in busy]
        assert any(e is None or e.replace(tzinfo=timezone.utc) > began for e in ended), (
            f"{drill}: every job of the batch had ended before the outage began")
    return ledger.check()


def redis_restart(cluster: Cluster, size: Size) -> Figure:
    server = cluster.redis_server

    def kill() -> None:
        # A 202 promises the job is on disk only with SDQ_DURABLE_SUBMIT (whose fsync check this Redis, 7.0 with
        # everysec, cannot give); the drill wants jobs accepted before the kill to exist after it, so it writes
        # them to disk first. What the workers write from here on is as safe as appendfsync everysec makes it.
        server.persist()
        server.kill()

    return _redis_outage(cluster, size, "redis_restart", kill, server.start)


def redis_full(cluster: Cluster, size: Size) -> Figure:
    return _redis_outage(cluster, size, "redis_full", cluster.redis_server.fill, cluster.redis_server.free)


# 4 --------------------------------------------------------------------------------------------------------------
def api_sigkill(cluster: Cluster, size: Size) -> Figure:
    ledger = Ledger(cluster, "api_sigkill")
    seeds = Seeds()
    per_client = max(2, size.jobs * size.rounds // 2)
    # A kill before the enqueue leaves the key's pending claim, refused with 409 until it lapses (PENDING_TTL_S);
    # the same key's retry may be cut off again by the next kill, so one submission may wait out a claim per round.
    deadline_s = (size.rounds + 1) * PENDING_TTL_S + 60
    joins = [submit_in_background(cluster, [seeds.params(cluster, size.steps) for _ in range(per_client)],
                                  allowed=clients.RETRYABLE, deadline_s=deadline_s)
             for _ in range(4)]
    total = 4 * per_client
    for r in range(size.rounds):
        # Kill once a share of the jobs is queued, while the clients are still sending.
        threshold = total * (r + 1) // (size.rounds + 2)

        def queued(at_least: int = threshold) -> bool:
            return ledger.new_jobs() >= at_least

        wait_until(queued, 60, f"{threshold} jobs queued", every=0.005)
        api = cluster.api()
        assert api is not None
        cluster.kill(api)
        ledger.fault()
        time.sleep(0.3)
        cluster.start_api()
    for join in joins:
        ledger.add(*join())
    ledger.wait_ended()
    return ledger.check()


# 5 --------------------------------------------------------------------------------------------------------------
def queue_burst(cluster: Cluster, size: Size) -> Figure:
    ledger = Ledger(cluster, "queue_burst")
    seeds = Seeds()
    limited = cluster.start_api(port=free_port(), extra_env={"SDQ_MAX_QUEUED_JOBS": str(size.queue_limit)})
    try:
        params = [seeds.params(cluster, 2) for _ in range(size.burst)]
        ledger.fault()
        answers = clients.burst(limited.url, params, size.connections)
        burst_s = time.monotonic() - ledger.began
    finally:
        cluster.retire(limited)
    kinds: Counter[str] = Counter()
    for p, answer in zip(params, answers, strict=True):
        sub = Submission(p, answers=[str(answer.status)])
        kinds[str(answer.status)] += 1
        if answer.status == 202:
            sub.job_id = str(json.loads(answer.body)["id"])
        elif answer.status in (429, 503):
            if "retry-after" not in answer.headers:
                sub.problems.append(f"{answer.status} without Retry-After: {answer.body[:200]!r}")
        else:
            sub.problems.append(f"answer {answer.status}: {answer.body[:200]!r}")
        if sub.job_id is not None or sub.problems:  # a documented refusal made no job and is only counted
            ledger.add(sub)
    ledger.wait_ended(timeout=180)
    note = (f"{size.burst} requests in {burst_s:.1f} s, answers "
            + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    return ledger.check(note=note)


# 6 --------------------------------------------------------------------------------------------------------------
def poison_job(cluster: Cluster, size: Size) -> Figure:
    """The poison job is queued first, with compatible mates behind it, while no worker runs; so the first worker
    that starts takes them all into one batch. Every worker that starts the poison job is SIGKILLed."""
    ledger = Ledger(cluster, "poison_job")
    seeds = Seeds()
    for worker in cluster.live("worker"):
        cluster.retire(worker)
    subs = submit_all(cluster, [seeds.params(cluster, size.steps, n=1 + i % 2) for i in range(max(3, size.jobs))])
    ledger.add(*subs)
    poison = subs[0].job_id
    mates = [s.job_id for s in subs[1:] if s.job_id]
    assert poison is not None
    ledger.expected[poison] = "failed"
    killed: set[str] = set()
    shared: list[int] = []  # mates started in the same batch as the poison job, at each kill
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            try:
                [(status, name)] = job_fields(cluster, [poison])
                if status in ("failed", "finished", "canceled", "stopped"):
                    return
                proc = cluster.worker_named(name) if status == "started" and name not in killed else None
                if proc is not None:
                    together = [j for j, (s, w) in zip(mates, job_fields(cluster, mates), strict=True)
                                if s == "started" and w == name]
                    killed.add(name)
                    replace(cluster, proc)
                    ledger.fault()
                    shared.append(len(together))
            except redis.exceptions.RedisError:
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        for _ in range(cluster.config.workers):
            cluster.start_worker(wait=False)
        ledger.wait_ended([poison], timeout=60 + 20 * cluster.config.job_retries)
        ledger.wait_ended()
    finally:
        stop.set()
        thread.join(10)
    assert shared and shared[0] > 0, f"poison_job: no mate shared the poison job's first batch ({shared})"
    return ledger.check(note=f"poison job killed {len(killed)} workers; mates in its batch at each kill: {shared}")


# 7 --------------------------------------------------------------------------------------------------------------
def webhook_after_crash(cluster: Cluster, size: Size) -> Figure:
    """Redis keyspace notifications on the jobs' hashes tell the drill the instant a job's status becomes
    ``finished``; the worker that ran it is SIGKILLed right then, before the rest of its bookkeeping."""
    ledger = Ledger(cluster, "webhook_after_crash")
    seeds = Seeds()
    previous = cluster.redis.config_get("notify-keyspace-events")["notify-keyspace-events"]
    cluster.redis.config_set("notify-keyspace-events", "Kh")
    hits: list[str] = []
    try:
        for _ in range(size.rounds):
            params = [seeds.params(cluster, size.steps, n=1 + i % 2, events=ALL_EVENTS)
                      for i in range(size.jobs)]
            subs = submit_all(cluster, params)
            ledger.add(*subs)
            ids = [s.job_id for s in subs if s.job_id]
            hit = _kill_on_first_success(cluster, ids)
            if hit is not None:
                hits.append(hit[0])
                ledger.fault()
            ledger.wait_ended(ids)
            if hit is not None:
                cluster.wait_registered(hit[1])
    finally:
        cluster.redis.config_set("notify-keyspace-events", previous)
    assert hits, "webhook_after_crash: no worker was killed"
    return ledger.check(note=f"{len(hits)} workers killed right after a success")


def _kill_on_first_success(cluster: Cluster, job_ids: list[str], timeout: float = 60) -> tuple[str, Proc] | None:
    """Wait for the first of ``job_ids`` to be finished and SIGKILL its worker at once; returns the job id and the
    worker started in its place."""
    pubsub = cluster.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*(f"__keyspace@0__:rq:job:{j}" for j in job_ids))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message is None:
                continue
            job_id = message["channel"].decode().rsplit(":", 1)[1]
            [(status, name)] = job_fields(cluster, [job_id])
            if status == "finished":
                proc = cluster.worker_named(name)
                if proc is None or not proc.alive():
                    return None
                return job_id, replace(cluster, proc)
        return None
    finally:
        pubsub.close()


DRILLS: dict[str, Callable[[Cluster, Size], Figure]] = {
    "worker_sigkill": worker_sigkill,
    "redis_restart": redis_restart,
    "redis_full": redis_full,
    "api_sigkill": api_sigkill,
    "queue_burst": queue_burst,
    "poison_job": poison_job,
    "webhook_after_crash": webhook_after_crash,
}
