"""Give back the jobs of workers that died: the runs whose lease lapsed, as soon as it lapses, and jobs taken off
their queue by a worker that died before it started them.

- **Leases that lapsed** (``LeaseWatch``). A running job holds a lease of 3 heartbeats in RQ's started registry,
  renewed every heartbeat; when its worker dies, the lease lapses at most 3 heartbeats after the death. A thread of
  every worker reads the earliest lease of each queue and wakes when it lapses (at least once a heartbeat), then
  runs the worker's started-registry cleanup (RQ ``Retry``), whatever the worker itself is doing: RQ's maintenance
  runs only between batches, so a busy survivor would hand the jobs back only after its batch, and an idle one up to
  a heartbeat late. A job whose worker died goes back to the front of its queue: it had waited its turn once (RQ's
  ``Retry`` would put it at the back, behind every job queued since). Like the rest of the cleanup, it waits for
  steady contact with Redis after an outage, and after the worker's start.
- **Claimed, not started.** The claim scripts (``worker.batcher``) put a claimed id on RQ's intermediate list of its
  queue and write the claiming worker's name into the job hash (``sdq_claimed_by``); the start transaction
  (``worker.rq_records``) takes the id off the list and deletes the name. RQ's own intermediate-queue cleanup waits a
  minute after it first sees an id (``IntermediateQueue.should_be_cleaned_up``), then fails the job through the
  worker's failure path, spending a retry. Here an id whose claiming worker's registration is gone (it expires one
  lease after the worker's last heartbeat) goes back to the front of its queue at once, status ``queued``, no retry
  spent, since the job never ran.
- **Popped, not claimed.** With several queues RQ's dequeue is a ``BLPOP``: a worker killed between it and the claim
  script leaves a job ``queued`` on no list at all, which no worker would ever take. The sweep scans RQ's job hashes
  for jobs of our queues that are ``queued``, were enqueued more than a lease ago and are on neither their queue nor
  its intermediate list, and pushes each back to the front of its queue. Jobs that wait elsewhere (scheduled,
  deferred) have other statuses.

The last two run with the worker's registry maintenance (one worker at a time, under a lock that expires, so a
worker killed while sweeping blocks no one for long). Each give-back is one Lua script that checks again what it
found, so a job that a live worker claims or starts in the meantime is left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import redis.exceptions
from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.queue import Queue
from rq.utils import current_timestamp, now, utcparse

from core.attempts import CLAIMED_BY_FIELD
from core.outages import Link

log = logging.getLogger(__name__)

SCAN_COUNT = 1000
LAPSE_MARGIN_S = 0.05  # wake this long after a lease's end, so that the cleanup finds it lapsed
FRONT_FIELD = "enqueue_at_front_on_retry"  # RQ's job-hash field for Retry(enqueue_at_front=True)

# KEYS: intermediate list, queue list, job hash. ARGV: job id, the claimed-by field, the worker-key prefix.
# Returns 1 when the job went back to its queue.
RETURN_CLAIMED = """
if redis.call('LPOS', KEYS[1], ARGV[1]) == false then return 0 end
local claimer = redis.call('HGET', KEYS[3], ARGV[2])
if not claimer or redis.call('EXISTS', ARGV[3] .. claimer) == 1 then return 0 end
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('HGET', KEYS[3], 'status') ~= 'started' then return 0 end
redis.call('HSET', KEYS[3], 'status', 'queued')
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""

# KEYS: queue list, intermediate list, job hash. ARGV: job id. Returns 1 when the job went back to its queue.
RETURN_STRANDED = """
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
if redis.call('LPOS', KEYS[1], ARGV[1]) ~= false or redis.call('LPOS', KEYS[2], ARGV[1]) ~= false then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""


class Sweeper:
    def __init__(self, connection: Redis, queues: Sequence[Queue], *, worker_key_prefix: str, stranded_after_s: float,
                 ) -> None:
        self.connection = connection
        self.queues = {queue.name: queue for queue in queues}
        self.worker_key_prefix = worker_key_prefix
        self.stranded_after = timedelta(seconds=stranded_after_s)
        self._return_claimed = connection.register_script(RETURN_CLAIMED)
        self._return_stranded = connection.register_script(RETURN_STRANDED)

    def return_claimed(self) -> list[str]:
        """Jobs on an intermediate list whose claiming worker is gone, back to the front of their queues."""
        back = []
        for queue in self.queues.values():
            for raw in self.connection.lrange(queue.intermediate_queue_key, 0, -1):
                job_id = raw.decode()
                if self._return_claimed(keys=[queue.intermediate_queue_key, queue.key, Job.key_for(job_id)],
                                        args=[job_id, CLAIMED_BY_FIELD, self.worker_key_prefix]):
                    log.warning("job %s was claimed by a worker that died before starting it: queued again", job_id)
                    back.append(job_id)
        return back

    def return_stranded(self) -> list[str]:
        """Queued jobs of our queues that are on no list, back to the front of their queues."""
        back = []
        cutoff = now() - self.stranded_after
        for keys in self._job_hash_batches():
            with self.connection.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, ["status", "origin", "enqueued_at"])
                rows = pipe.execute()
            for key, (status, origin, enqueued_at) in zip(keys, rows, strict=True):
                queue = self.queues.get(origin.decode()) if origin else None
                if queue is None or status != b"queued" or not enqueued_at:
                    continue
                if utcparse(enqueued_at.decode()) > cutoff:
                    continue  # RQ writes a retried job's hash and its queue entry in one transaction; still, wait
                job_id = key.decode().removeprefix(Job.redis_job_namespace_prefix)
                if self._return_stranded(keys=[queue.key, queue.intermediate_queue_key, key], args=[job_id]):
                    log.warning("job %s was queued on no list (its worker died while taking it): queued again",
                                job_id)
                    back.append(job_id)
        return back

    def _job_hash_batches(self) -> list[list[bytes]]:
        batches = []
        cursor = 0
        while True:
            cursor, keys = self.connection.scan(cursor, match=f"{Job.redis_job_namespace_prefix}*", count=SCAN_COUNT,
                                                _type="hash")
            # rq:job:{id} only, not RQ's per-job side keys (rq:job:{id}:dependents and the like)
            keys = [k for k in keys if b":" not in k[len(Job.redis_job_namespace_prefix):]]
            if keys:
                batches.append(keys)
            if cursor == 0:
                return batches


class LeaseWatch:
    """A thread that runs ``clean(queue)`` (the worker's started-registry cleanup) for each queue whose earliest
    lease has lapsed, as soon as it lapses; it looks at least every ``cap_s``."""

    def __init__(self, connection: Redis, queues: Sequence[Queue], clean: Callable[[Queue], None], *, link: Link,
                 settle_s: float, cap_s: float) -> None:
        self.connection = connection
        self.queues = list(queues)
        self.clean = clean
        self.link = link
        self.settle_s = settle_s
        self.cap_s = cap_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdq-lease-watch", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                wait = self.watch()
            except redis.exceptions.RedisError as exc:
                self.link.failed(exc, "looking for runs whose worker died")
                wait = self.cap_s
            except Exception:
                log.exception("looking for runs whose worker died failed")  # a bug; the next look may get through
                wait = self.cap_s

    def watch(self) -> float:
        """Clean the queues with a lapsed lease; returns the seconds until the next lease lapses (at most ``cap_s``)."""
        unsettled = self.settle_s - self.link.steady_for()
        if unsettled > 0:  # right after an outage every lease looks lapsed: live workers renew theirs first
            return min(unsettled, self.cap_s)
        clock = current_timestamp()
        wait = self.cap_s
        for queue in self.queues:
            earliest = self.connection.zrange(queue.started_job_registry.key, 0, 0, withscores=True)
            if not earliest:
                continue
            lapses_in = float(earliest[0][1]) - clock
            if lapses_in < 0:
                self.clean(queue)
            else:
                wait = min(wait, lapses_in + LAPSE_MARGIN_S)
        return wait


def back_first(connection: Redis) -> Callable[..., None]:
    """An exception handler for RQ's started-registry cleanup: a job whose worker died (``AbandonedJobError``) is
    queued again at the front of its queue (in memory and in its hash, so a re-read job keeps it)."""

    def handler(job: Job, exc_type: Any, *rest: Any) -> None:
        if isinstance(exc_type, type) and issubclass(exc_type, AbandonedJobError):
            job.enqueue_at_front_on_retry = True
            connection.hset(job.key, FRONT_FIELD, 1)

    return handler
