"""API keys and per-key limits, against a real Redis: who may call, what they see, and how much they may ask."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from api.main import create_app
from core import apikeys
from core.jobs import Priority
from core.queues import Keys
from core.settings import Settings
from sdqueue import cli

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}
ALICE_KEY, BOB_KEY = "sdq_alice-test-key", "sdq_bob-test-key"
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}


def with_keys(settings: Settings, **update: Any) -> Settings:
    """Alice may use every priority, Bob the default (up to normal)."""
    keys = f"alice:{apikeys.digest(ALICE_KEY)}:high, bob:{apikeys.digest(BOB_KEY)}"
    return settings.model_copy(update={"api_keys": keys, **update})


@pytest.fixture
def authed(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(with_keys(settings))) as c:
        yield c


def submit(client: TestClient, headers: dict[str, str], **params: Any) -> Any:
    return client.post("/v1/txt2img", json={**TINY, **params}, headers=headers)


def assert_error(r: Any, status: int, error_type: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == error_type and error["field"] == field, error
    return error


def test_no_key_or_a_wrong_key_is_401_with_a_bearer_challenge(authed: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer sdq_not-a-key"}, {"Authorization": f"Basic {ALICE_KEY}"},
                    {"Authorization": "Bearer "}):
        r = submit(authed, headers)
        assert_error(r, 401, "unauthorized", "Authorization")
        assert r.headers["www-authenticate"].startswith("Bearer")
    for path in ("/v1/jobs", "/v1/jobs/0123/events", "/v1/images/0123/0.png", "/v1/models", "/v1/samplers"):
        assert_error(authed.get(path), 401, "unauthorized", "Authorization")
    assert authed.post("/v1/jobs/0123/cancel").status_code == 401
    assert authed.get("/v1/jobs", headers=BOB).status_code == 200


def test_probes_metrics_and_docs_need_no_key(authed: TestClient) -> None:
    assert authed.get("/healthz").status_code == 200
    assert authed.get("/readyz").status_code == 503  # not ready (no worker), but not 401
    assert authed.get("/metrics").status_code == 200
    assert authed.get("/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert authed.get("/docs").status_code == 200


def test_a_key_sees_only_its_own_jobs(authed: TestClient) -> None:
    job = submit(authed, ALICE).json()
    path = f"/v1/jobs/{job['id']}"

    for r in (authed.get(path, headers=BOB), authed.post(f"{path}/cancel", headers=BOB),
              authed.get(f"{path}/events", headers=BOB)):
        assert_error(r, 404, "not_found")
    assert authed.get("/v1/jobs", headers=BOB).json() == {"jobs": [], "next_cursor": None}
    assert authed.get(path, headers=ALICE).json()["status"] == "queued"
    assert [j["id"] for j in authed.get("/v1/jobs", headers=ALICE).json()["jobs"]] == [job["id"]]
    assert authed.post(f"{path}/cancel", headers=ALICE).json()["status"] == "canceled"


def test_keys_stored_in_redis_work_at_once_and_stop_when_revoked(settings: Settings, redis: Redis,
                                                                 keys: Keys) -> None:
    carol_key = apikeys.generate()
    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as client:
        carol = {"Authorization": f"Bearer {carol_key}"}
        assert submit(client, carol).status_code == 401
        apikeys.store(redis, keys, apikeys.ApiKey("carol", apikeys.digest(carol_key), Priority.low))
        assert submit(client, carol, priority="low").status_code == 202
        assert_error(submit(client, carol, priority="normal"), 403, "forbidden", "priority")
        assert apikeys.revoke(redis, keys, "carol")
        assert submit(client, carol, priority="low").status_code == 401


def test_priority_above_the_keys_highest_is_403_naming_priority(authed: TestClient, redis: Redis) -> None:
    error = assert_error(submit(authed, BOB, priority="high"), 403, "forbidden", "priority")
    assert "'high'" in error["message"] and "'normal'" in error["message"]
    assert submit(authed, BOB, priority="low").status_code == 202
    assert submit(authed, BOB, priority="normal").status_code == 202
    assert submit(authed, ALICE, priority="high").status_code == 202
    assert len(Queue("sdq-high", connection=redis)) == 1


def test_submissions_beyond_the_rate_limit_are_429_with_retry_after(settings: Settings) -> None:
    limited = with_keys(settings, rate_limit_per_min=60, rate_limit_burst=2)  # one token a second, two at once
    with TestClient(create_app(limited)) as client:
        assert [submit(client, ALICE).status_code for _ in range(2)] == [202, 202]
        r = submit(client, ALICE)
        assert_error(r, 429, "rate_limited")
        assert r.headers["retry-after"] == "1"
        assert submit(client, BOB).status_code == 202  # each key has its own bucket
        assert client.get("/v1/jobs", headers=ALICE).status_code == 200  # reading is not limited
        time.sleep(1.05)
        assert submit(client, ALICE).status_code == 202


def test_more_queued_jobs_than_a_key_may_have_is_429_until_one_leaves_the_queue(settings: Settings) -> None:
    with TestClient(create_app(with_keys(settings, max_queued_per_key=2))) as client:
        first, _ = (submit(client, ALICE).json() for _ in range(2))
        r = submit(client, ALICE)
        error = assert_error(r, 429, "too_many_queued")
        assert "SDQ_MAX_QUEUED_PER_KEY" in error["message"] and int(r.headers["retry-after"]) > 0
        assert submit(client, BOB).status_code == 202
        client.post(f"/v1/jobs/{first['id']}/cancel", headers=ALICE)
        assert submit(client, ALICE).status_code == 202


def test_a_full_queue_is_503_with_retry_after_and_takes_no_per_key_slot(settings: Settings, redis: Redis,
                                                                        keys: Keys) -> None:
    with TestClient(create_app(with_keys(settings, max_queued_jobs=1))) as client:
        assert submit(client, BOB).status_code == 202
        r = submit(client, ALICE)
        assert_error(r, 503, "queue_full")
        assert r.headers["retry-after"] == "5"
    assert redis.zcard(keys.owner_queued("alice")) == 0


def test_a_body_over_the_limit_is_413_declared_or_streamed(settings: Settings, redis: Redis) -> None:
    big = b'{"prompt": "' + b"x" * 3000 + b'"}'
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 2048}))) as client:
        declared = client.post("/v1/txt2img", content=big, headers={"content-type": "application/json"})
        streamed = client.post("/v1/txt2img", content=iter([big[:1500], big[1500:]]),
                               headers={"content-type": "application/json"})
        small = client.post("/v1/txt2img", json=TINY)
    for r in (declared, streamed):
        error = assert_error(r, 413, "payload_too_large")
        assert "2048 bytes (SDQ_MAX_BODY_BYTES)" in error["message"]
    assert "content-length" not in streamed.request.headers  # really sent chunked
    assert small.status_code == 202
    assert len(Queue("sdq-normal", connection=redis)) == 1


def test_auth_is_off_without_keys_and_sdq_auth_off_ignores_them(settings: Settings) -> None:
    assert not settings.auth_enabled()
    assert with_keys(settings).auth_enabled()
    assert not with_keys(settings, auth="off").auth_enabled()
    with TestClient(create_app(with_keys(settings, auth="off"))) as client:
        assert submit(client, {}, priority="high").status_code == 202


def test_api_key_entries_are_checked_and_generated_keys_round_trip() -> None:
    key = apikeys.generate()
    entry = apikeys.ApiKey("ci-bot", apikeys.digest(key), Priority.low).entry()
    assert apikeys.parse_list(entry) == {apikeys.digest(key): apikeys.ApiKey("ci-bot", apikeys.digest(key),
                                                                            Priority.low)}
    assert key.startswith("sdq_") and len(key) > 40 and key not in entry
    for bad, rule in [("bob", "64 lowercase hex"), (f"b b:{'0' * 64}", "name"), (f"bob:{'0' * 64}:urgent", "urgent"),
                      (f"bob:{'0' * 64},bob:{'1' * 64}", "listed twice")]:
        with pytest.raises(ValueError, match=rule):
            apikeys.parse_list(bad)


def test_the_apikey_command_makes_keys_that_work(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SDQ_REDIS_URL", settings.redis_url)
    assert cli.main(["apikey", "create", "dave", "--max-priority", "low", "--store"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    key, entry = lines["key"].strip(), lines["entry"].strip()
    assert entry == f"dave:{apikeys.digest(key)}:low"

    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as client:
        assert submit(client, {"Authorization": f"Bearer {key}"}, priority="low").status_code == 202
        assert cli.main(["apikey", "list"]) == 0 and "dave\tmax priority low" in capsys.readouterr().out
        assert cli.main(["apikey", "revoke", "dave"]) == 0
        assert submit(client, {"Authorization": f"Bearer {key}"}, priority="low").status_code == 401
    with TestClient(create_app(settings.model_copy(update={"api_keys": entry}))) as client:
        assert submit(client, {"Authorization": f"Bearer {key}"}, priority="low").status_code == 202


class BodySpy:
    """ASGI wrapper that notes every body message the app reads."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.reads: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def spied() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.reads.append(scope["path"])
            return message

        await self.app(scope, spied, send)


MULTIPART = "multipart/form-data; boundary=b0"


@pytest.mark.parametrize(("path", "content_type", "body"), [
    ("/v1/txt2img", "application/json", b"{not json"),
    ("/v1/txt2img", "application/json", b'{"prompt": "' + b"x" * 3000 + b'"}'),  # over max_body_bytes
    ("/v1/img2img", MULTIPART, b"--b0\r\nbroken"),
    ("/v1/inpaint", MULTIPART, b"--b0\r\n" + b"x" * 3000),
    ("/v1/img2img", "application/json", b"{}"),
])
def test_without_a_valid_key_the_answer_is_401_before_the_body_is_read(
    settings: Settings, path: str, content_type: str, body: bytes
) -> None:
    spy = BodySpy(create_app(with_keys(settings, max_body_bytes=2048)))
    with TestClient(spy) as client:
        for headers in ({}, {"Authorization": "Bearer sdq_not-a-key"}):
            declared = client.post(path, content=body, headers={"content-type": content_type, **headers})
            chunked = client.post(path, content=iter([body]), headers={"content-type": content_type, **headers})
            for r in (declared, chunked):
                assert_error(r, 401, "unauthorized", "Authorization")
        assert spy.reads == []
        # With a key, the same bodies get the answers they earn.
        r = client.post(path, content=body, headers={"content-type": content_type, **ALICE})
        assert r.status_code == (413 if len(body) > 2048 else 400 if content_type == MULTIPART else 422), r.text


def test_with_a_valid_key_a_declared_body_over_the_limit_is_413_without_being_read(settings: Settings) -> None:
    spy = BodySpy(create_app(with_keys(settings, max_body_bytes=2048)))
    big = b'{"prompt": "' + b"x" * 3000 + b'"}'
    with TestClient(spy) as client:
        r = client.post("/v1/txt2img", content=big, headers={"content-type": "application/json", **ALICE})
    assert_error(r, 413, "payload_too_large")
    assert r.headers["connection"] == "close" and spy.reads == []


def test_every_protected_route_with_a_body_authenticates_before_reading_it() -> None:
    from fastapi.routing import APIRoute

    from api.auth import AuthenticatedRoute
    from api.main import PROTECTED

    routes = [r for module in PROTECTED for r in module.router.routes if isinstance(r, APIRoute)]
    with_body = [r for r in routes if r.body_field is not None]
    assert {r.path for r in with_body} >= {"/v1/txt2img", "/v1/img2img", "/v1/inpaint"}
    assert [r.path for r in with_body if not isinstance(r, AuthenticatedRoute)] == []
