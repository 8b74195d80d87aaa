"""What the API must know about an enqueue transaction before it answers: did it commit, and is it on disk.

- **Lost replies.** A ConnectionError or TimeoutError while a MULTI/EXEC is in flight does not say whether Redis
  ran it: EXEC may have committed and only its reply been lost, or it may still be waiting in Redis' input buffer
  (a slow Redis runs what a timed-out client sent). The job ids are known and a transaction is all or nothing, so
  `committed` looks the jobs up on a fresh connection, retried briefly. So that "not there" also means "never
  will be", the transaction WATCHes a fence key of its own (`new_fence`), and the look-up sets that key before it
  looks: an EXEC that Redis had not run by then aborts. Only a look-up that answers makes the outcome sure; one
  that cannot reach Redis leaves it unknown (`CommitUnknown`).
- **Idempotency-Key records** turn from "pending" to final inside the enqueue transaction (`finalize_records`), so
  "the key names a job" and "the job is queued" are one fact: a crash can never leave a key naming a job that does
  not exist, and a pending record that outlives its request lapses on its own (see `api.intake`).
- **Durable submit.** Redis answers a write once it is in memory; with `appendfsync everysec` (its default) the
  last second of writes is lost if the host dies. `confirm_on_disk` waits (WAITAOF, Redis >= 7.2) until the local
  AOF has fsynced everything written so far: it writes a probe key on its own connection and waits for that
  write. WAITAOF counts the writes of the connection it is sent on, and the AOF is fsynced in order, so the probe
  being on disk means every earlier write is, the enqueue transaction included. One probe covers a whole group
  commit, and it also works after a lost reply, when the transaction's own connection is gone.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError, TimeoutError
from rq.job import Job

from core.queues import Keys

log = logging.getLogger(__name__)

# Pauses before each look-up of an enqueue whose reply was lost: at once (a dropped connection), then twice more
# for a Redis that is restarting or briefly stalled. Each look-up may also wait up to the client's socket timeout.
LOOKUP_DELAYS_S = (0.0, 0.2, 1.0)
# A fence outlives any transaction that could still be waiting in Redis' input buffer.
FENCE_TTL_S = 600

# KEYS[1]: the record; ARGV: the pending value this request set, the final value, its TTL. A record that another
# request holds now (this one's lapsed and was taken over) is left alone.
_FINALIZE_RECORD = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or not value then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


class CommitUnknown(Exception):
    """The enqueue transaction was sent; neither its reply nor a look-up afterwards says whether it committed."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        super().__init__(f"whether {len(job_ids)} jobs were queued is unknown: Redis did not answer")
        self.job_ids = frozenset(job_ids)


class NotOnDisk(Exception):
    """The jobs are queued, but Redis did not confirm in time that its append-only file holds them."""

    def __init__(self, job_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"{len(job_ids)} queued jobs not confirmed on disk: {reason}")
        self.job_ids = frozenset(job_ids)


@dataclass(frozen=True)
class KeyRecord:
    """An Idempotency-Key record for the enqueue transaction: `key` holds `pending` while the request is in flight;
    the transaction replaces it with `final` for `ttl_s` seconds."""

    key: str
    pending: str
    final: str
    ttl_s: int


def finalize_records(pipe: Any, records: Iterable[KeyRecord]) -> None:
    """Add to the enqueue transaction `pipe` the writes that make `records` final."""
    for record in records:
        pipe.eval(_FINALIZE_RECORD, 1, record.key, record.pending, record.final, record.ttl_s)


def new_fence(keys: Keys) -> str:
    """A key for one enqueue transaction to WATCH: nothing sets it but that transaction's look-up (`committed`)."""
    return keys.enqueue_fence(uuid.uuid4().hex)


def committed(redis: Redis, fence: str, job_ids: Sequence[str]) -> bool | None:
    """Whether the transaction that WATCHed `fence` and creates `job_ids` committed; once this has answered, it
    cannot commit any more. True if any of the jobs exists (it is all or nothing); None when Redis cannot be
    asked."""
    for delay in LOOKUP_DELAYS_S:
        time.sleep(delay)
        try:
            pipe = redis.pipeline(transaction=False)
            pipe.set(fence, b"1", ex=FENCE_TTL_S)  # runs before the look-up: a later EXEC of the transaction aborts
            for job_id in job_ids:
                pipe.exists(Job.key_for(job_id))
            _, *found = pipe.execute()
            return any(int(n) for n in found)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("looking up %d jobs whose enqueue reply was lost failed: %s", len(job_ids), exc)
    return None


def confirm_on_disk(redis: Redis, keys: Keys, job_ids: Sequence[str], timeout_ms: int) -> None:
    """Return once the local AOF has fsynced every write made before this call; raise NotOnDisk after `timeout_ms`
    or when Redis cannot be asked. Needs Redis >= 7.2 with `appendonly yes` (see `api.durability`)."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(keys.durable_probe(), b"1")  # one small key, overwritten by every probe
    pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
    try:
        _, (local, _replicas) = pipe.execute()
    except (ConnectionError, TimeoutError) as exc:
        raise NotOnDisk(job_ids, f"Redis did not answer WAITAOF ({exc})") from exc
    if int(local) < 1:
        raise NotOnDisk(job_ids, f"the AOF fsync took longer than {timeout_ms} ms")

