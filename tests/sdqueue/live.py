"""A real API and worker (subprocesses, tiny random checkpoint) for the client and `sdqueue submit` tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from redis import Redis

from sdqueue.client import GenerateOptions
from tests.e2e.conftest import Service

# Quick on any CPU, with several progress events (sent at most 4 times a second).
QUICK: GenerateOptions = {"width": 64, "height": 64, "steps": 8, "sampler": "euler"}
# Long enough that no CPU finishes it before a test cancels it (150 steps of 2 images at 256x256).
SLOW: GenerateOptions = {"width": 256, "height": 256, "steps": 150, "n": 2, "sampler": "euler"}


@contextlib.contextmanager
def service(redis_url: str, workdir: Path, **env: str) -> Iterator[Service]:
    from model import weights

    Redis.from_url(redis_url).flushall()
    checkpoint = workdir / "tiny.safetensors"
    weights.save_random_checkpoint(checkpoint, *weights.tiny_configs())
    svc = Service(redis_url, workdir, checkpoint)
    svc.env.update(env)
    try:
        svc.start_api()
        svc.start_worker()
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def job_count(redis_url: str) -> int:
    """RQ job records in Redis (jobs of every kind, webhook deliveries included)."""
    with Redis.from_url(redis_url) as r:
        return sum(1 for key in r.scan_iter("rq:job:*", count=1000) if key.count(b":") == 2)  # not rq:job:{id}:x
