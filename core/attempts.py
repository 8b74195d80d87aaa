"""How often workers started a job, and how many of those runs ended with the worker gone.

Two counters in the RQ job hash, next to RQ's own fields (RQ's ``Job.save`` writes its fields with ``HSET`` and
leaves others alone), so that a claim script can read them and the API can show them:

- ``sdq_attempts``: incremented in the transaction that marks the job started (``worker.rq_records``).
- ``sdq_given_back``: incremented in the transaction that gives the job back to its queue for the infrastructure's
  reasons (a storage outage), a run that ended without the worker dying.

Every other run ends with the job's final record, so a queued job with ``attempts > given_back`` came back from a
run whose worker died (or was presumed dead): the batcher runs such a job alone, so that a job that kills its
worker takes no batch mates down with it.
"""

from __future__ import annotations

from redis import Redis

ATTEMPTS_FIELD = "sdq_attempts"
GIVEN_BACK_FIELD = "sdq_given_back"
CLAIMED_BY_FIELD = "sdq_claimed_by"  # the worker that claimed a job and has not started it yet (``worker.sweeper``)


def parse_count(raw: bytes | str | None) -> int:
    return int(raw) if raw else 0


def read_counts(redis: Redis, job_key: str) -> tuple[int, int]:
    """(attempts, given back) of the job stored under ``job_key``."""
    attempts, given_back = redis.hmget(job_key, [ATTEMPTS_FIELD, GIVEN_BACK_FIELD])
    return parse_count(attempts), parse_count(given_back)


def died_message(deaths: int) -> str:
    times = "once" if deaths == 1 else f"{deaths} times"
    return f"the worker died {times} while running this job"
