"""Redis connection and the names of everything sdqueue keeps in Redis (one place, so api and worker agree)."""

from __future__ import annotations

from redis import Redis

from core.jobs import Priority

# The function path RQ records for each job. The API enqueues by this string and never imports the worker.
JOB_FUNC = "worker.tasks.run_job"

# Dequeue order: a worker always looks at higher priorities first.
PRIORITY_ORDER: tuple[Priority, ...] = (Priority.high, Priority.normal, Priority.low)


def connect(url: str) -> Redis:
    """A client for `url`; bytes in and out (RQ needs decode_responses=False)."""
    return Redis.from_url(url, health_check_interval=30, socket_keepalive=True)


class Keys:
    """Queue names and Redis keys under one prefix (``SDQ_QUEUE_PREFIX``)."""

    def __init__(self, prefix: str = "sdq") -> None:
        self.prefix = prefix

    def queue(self, priority: Priority | str) -> str:
        return f"{self.prefix}-{Priority(priority).value}"

    def queues(self) -> list[str]:
        return [self.queue(p) for p in PRIORITY_ORDER]

    def events(self, job_id: str) -> str:
        """Pub/sub channel of one job's events (running, progress, preview, terminal)."""
        return f"{self.prefix}:events:{job_id}"

    def cancel_requests(self) -> str:
        """Set of job ids whose cancel was requested while they run; workers check it every step."""
        return f"{self.prefix}:cancel"

    def stats(self) -> str:
        """Hash of moving averages the workers record (seconds per image, images per job) for queue ETAs."""
        return f"{self.prefix}:stats"
