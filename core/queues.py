"""Redis connection and the names of everything sdqueue keeps in Redis (one place, so api and worker agree)."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue

from core.jobs import Priority

# The function path RQ records for each job. The API enqueues by this string and never imports the worker.
JOB_FUNC = "worker.tasks.run_job"

# Dequeue order: a worker always looks at higher priorities first.
PRIORITY_ORDER: tuple[Priority, ...] = (Priority.high, Priority.normal, Priority.low)
MODEL_INFIX = "model-"  # a model's queues: {prefix}-model-{name}-{priority}


def connect(url: str, socket_timeout: float | None = None) -> Redis:
    """A client for `url`; bytes in and out (RQ needs decode_responses=False).

    `socket_timeout` bounds each command's wait for Redis (connecting included), so that a stalled Redis raises
    `redis.exceptions.TimeoutError` instead of blocking; without it, the redis-py version's default applies.
    """
    options: dict[str, Any] = {"health_check_interval": 30}
    if not url.startswith("unix://"):  # redis-py's unix-socket connections take no keepalive option
        options["socket_keepalive"] = True
    if socket_timeout is not None:
        options.update(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
    return Redis.from_url(url, **options)


class Keys:
    """Queue names and Redis keys under one prefix (``SDQ_QUEUE_PREFIX``)."""

    def __init__(self, prefix: str = "sdq") -> None:
        self.prefix = prefix

    def queue(self, priority: Priority | str, model: str | None = None) -> str:
        """The queue of one priority: of one model (``{prefix}-model-{model}-{priority}``), or, for ``None``, the
        queue of jobs that name no model, which every worker serves (``{prefix}-{priority}``)."""
        p = Priority(priority).value
        return f"{self.prefix}-{p}" if model is None else f"{self.prefix}-{MODEL_INFIX}{model}-{p}"

    def queues(self, model: str | None = None) -> list[str]:
        """One model's queues (``None``: the queues of jobs that name no model), highest priority first."""
        return [self.queue(p, model) for p in PRIORITY_ORDER]

    def worker_queues(self, model: str) -> list[str]:
        """What a worker holding ``model`` listens on, in dequeue order: at each priority its model's queue, then
        the queue of jobs that name no model (any worker may run those)."""
        return [name for p in PRIORITY_ORDER for name in (self.queue(p, model), self.queue(p))]

    def parse(self, name: str) -> tuple[str | None, Priority] | None:
        """(model or None, priority) of one of sdqueue's job queues; None for any other name."""
        head, _, tail = name.rpartition("-")
        if tail not in {p.value for p in PRIORITY_ORDER}:
            return None
        if head == self.prefix:
            return None, Priority(tail)
        model = head.removeprefix(f"{self.prefix}-{MODEL_INFIX}")
        if model == head or not model:
            return None
        return model, Priority(tail)

    def all_queues(self, redis: Redis) -> list[str]:
        """Every job queue: the ones of jobs naming no model, then each model's that RQ knows (created by an
        enqueue or a worker listening on it), by model name."""
        names = {(key.decode() if isinstance(key, bytes) else str(key)).removeprefix(Queue.redis_queue_namespace_prefix)
                 for key in redis.smembers(Queue.redis_queues_keys)}
        models = sorted({parsed[0] for name in names if (parsed := self.parse(name)) and parsed[0] is not None})
        return self.queues() + [name for model in models for name in self.queues(model)]

    def models_seen(self) -> str:
        """Sorted set of model names by the last time a live worker held them (unix seconds), so that a model whose
        workers restart or scaled to zero still takes jobs for a while (SDQ_MODEL_SEEN_TTL_S)."""
        return f"{self.prefix}:models-seen"

    def webhooks(self) -> str:
        """The RQ queue of webhook deliveries; only `sdqueue webhooks` processes listen on it, never a GPU worker."""
        return f"{self.prefix}-webhooks"

    def event_log(self, job_id: str) -> str:
        """Stream of the same events, so a client that (re)connects late still reads them (SSE Last-Event-ID)."""
        return f"{self.prefix}:event-log:{job_id}"

    def owner_jobs(self, owner: str | None) -> str:
        """Sorted set of an API key's job ids by creation time (``-``: jobs submitted without auth)."""
        return f"{self.prefix}:owner:{owner or '-'}:jobs"

    def owner_queued(self, owner: str) -> str:
        """Sorted set of an API key's jobs that may still be waiting (for SDQ_MAX_QUEUED_PER_KEY)."""
        return f"{self.prefix}:owner:{owner}:queued"

    def rate_bucket(self, owner: str) -> str:
        """Token bucket hash of an API key's submissions (SDQ_RATE_LIMIT_PER_MIN)."""
        return f"{self.prefix}:owner:{owner}:bucket"

    def idempotency(self, owner: str | None, key_digest: str) -> str:
        """What an Idempotency-Key was used for: request fingerprint and job id, for 24 h."""
        return f"{self.prefix}:owner:{owner or '-'}:idem:{key_digest}"

    def api_keys(self) -> str:
        """Hash of API keys added at run time: name -> SHA256HEX[:MAX_PRIORITY] (as in SDQ_API_KEYS)."""
        return f"{self.prefix}:apikeys"

    def cancel_requests(self) -> str:
        """Set of job ids whose cancel was requested while they run; workers check it every step."""
        return f"{self.prefix}:cancel"

    def enqueue_fence(self, token: str) -> str:
        """Set by the look-up after an enqueue whose reply was lost, so that transaction can no longer commit."""
        return f"{self.prefix}:enqueue-fence:{token}"

    def durable_probe(self) -> str:
        """Written after a group commit; the AOF holding it means the commit is on disk (SDQ_DURABLE_SUBMIT)."""
        return f"{self.prefix}:durable-probe"

    def stats(self, model: str | None = None) -> str:
        """Hash of moving averages the workers record (seconds per image, images per job) for queue ETAs: of one
        model's workers, or (``None``) of all workers."""
        return f"{self.prefix}:stats" if model is None else f"{self.prefix}:stats:{model}"
