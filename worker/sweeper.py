"""Give back jobs that a worker took off their queue but died before it started them.

Two windows RQ leaves open, closed by sweeps every worker runs with its registry maintenance (one worker at a time,
under a lock that expires, so a worker killed while sweeping blocks no one for long):

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

Each give-back is one Lua script that checks again what it found, so a job that a live worker claims or starts in
the meantime is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.utils import now, utcparse

from core.attempts import CLAIMED_BY_FIELD

log = logging.getLogger(__name__)

SCAN_COUNT = 1000

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
