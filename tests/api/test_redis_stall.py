"""A Redis that stops answering (SIGSTOP: the process is there, its socket open, nothing comes back) costs a
request at most SDQ_REDIS_TIMEOUT_S, then 503 with Retry-After; the long blocking reads of event logs still work
with a short timeout."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from api.main import create_app
from core import apikeys, eventlog
from core.jobs import Priority
from core.queues import Keys
from core.settings import Settings, load_settings
from tests.api.test_auth import ALICE, with_keys
from tests.redis_server import RedisServer

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}
CAROL_KEY = "sdq_carol-test-key"  # stored in Redis: checking it needs Redis
CAROL = {"Authorization": f"Bearer {CAROL_KEY}"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, so that stopping it stops no other test."""
    server = RedisServer(tmp_path / "redis")
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


def stalled_settings(server: RedisServer, tmp_path: Path) -> Settings:
    return with_keys(load_settings(redis_url=server.url, data_dir=tmp_path / "data", redis_timeout_s=1))


def test_a_stalled_redis_is_503_with_retry_after_within_the_redis_timeout(own_redis: RedisServer,
                                                                          tmp_path: Path) -> None:
    settings = stalled_settings(own_redis, tmp_path)
    apikeys.store(Redis.from_url(own_redis.url), Keys(), apikeys.ApiKey("carol", apikeys.digest(CAROL_KEY),
                                                                        Priority.normal))
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/txt2img", json=TINY, headers=ALICE).json()
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/v1/jobs/{job['id']}", {"headers": ALICE}),  # the sync client
            ("POST", f"/v1/jobs/{job['id']}/cancel", {"headers": ALICE}),
            ("GET", "/v1/jobs", {"headers": ALICE}),
            ("POST", "/v1/txt2img", {"headers": ALICE, "json": TINY}),  # limits: the async client
            ("POST", "/v1/txt2img", {"headers": {**ALICE, "Idempotency-Key": "k"}, "json": TINY}),
            ("GET", "/v1/models", {"headers": CAROL}),  # a key stored in Redis
        ]
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            for method, path, kwargs in requests:
                start = time.monotonic()
                r = client.request(method, path, **kwargs)
                elapsed = time.monotonic() - start
                assert r.status_code == 503, (method, path, r.text)
                assert r.json()["error"]["type"] == "unavailable" and int(r.headers["retry-after"]) > 0
                assert elapsed < 3.5, f"{method} {path} took {elapsed:.1f} s with SDQ_REDIS_TIMEOUT_S=1"
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 200
        assert client.get("/v1/models", headers=CAROL).status_code == 200


def test_blocking_event_log_reads_outlast_a_short_redis_timeout(settings: Settings) -> None:
    """`Prefer: wait=3` blocks on the job's event log for longer than SDQ_REDIS_TIMEOUT_S=1: the client for those
    reads has a timeout above its block time, so the answer is the 202 of a job still queued, not a 503."""
    with TestClient(create_app(settings.model_copy(update={"redis_timeout_s": 1.0}))) as client:
        start = time.monotonic()
        r = client.post("/v1/txt2img", json=TINY, headers={"Prefer": "wait=3"})
        assert 3 <= time.monotonic() - start < 6
        assert r.status_code == 202 and r.json()["status"] == "queued"
        blocking = client.app.state.aredis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        assert blocking["socket_timeout"] > eventlog.READ_BLOCK_S
