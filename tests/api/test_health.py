from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, Worker

from api.main import create_app
from core.queues import Keys
from core.settings import Settings
from tests.redis_server import free_port


def test_healthz_is_ok_without_looking_at_redis(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_503_without_a_worker(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["redis"] is True and r.json()["workers"] == 0
    assert "no live worker" in r.json()["reason"]


def test_readyz_is_503_when_redis_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["redis"] is False and "Redis unreachable" in r.json()["reason"]


def test_readyz_counts_live_workers_on_sdqueue_queues(client: TestClient, redis: Redis, keys: Keys) -> None:
    other = Worker([Queue("other", connection=redis)], connection=redis, name="other")
    other.register_birth()
    assert client.get("/readyz").status_code == 503  # a worker on someone else's queue does not count

    ours = Worker([Queue(n, connection=redis) for n in keys.queues()], connection=redis, name="ours")
    ours.register_birth()
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "redis": True, "workers": 1, "models": {}, "reason": None}

    redis.delete(ours.key)  # what an expired registration (a killed worker) looks like
    assert client.get("/readyz").status_code == 503


def test_requests_needing_redis_get_503_while_it_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        submit = client.post("/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64})
        read = client.get("/v1/jobs/0123456789abcdef")
    for r in (submit, read):
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        error = r.json()["error"]
        assert error["type"] == "unavailable" and error["message"].startswith("Redis unreachable")
