"""The API's side of webhooks: which URLs a submit accepts (422 on `webhook` otherwise), and the completed webhook
of a job canceled while queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core.queues import Keys
from core.settings import load_settings

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}
SECRET = "whsec_" + "c2RxdWV1ZSB0ZXN0IHNpZ25pbmcga2V5IDMyIGJ5dGVz"


def app_client(redis_url: str, tmp_path: Path, **overrides: Any) -> TestClient:
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path / "data", public_url="http://api.example",
                             **overrides)
    return TestClient(create_app(settings))


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with app_client(redis_url, tmp_path, webhook_secret=SECRET) as c:
        yield c


def webhook_error(response: Any) -> str:
    """The message of a 422 that names the `webhook` field."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", "webhook")
    return str(error["message"])


@pytest.mark.parametrize(
    ("url", "kind"),
    [("http://10.0.0.1/hook", "private"), ("http://127.0.0.1:9000/hook", "loopback"),
     ("http://[::1]/hook", "loopback"), ("http://169.254.169.254/latest", "link-local"),
     ("http://192.168.1.1/hook", "private"), ("http://localhost:9000/hook", "loopback")],
)
def test_webhooks_to_non_public_addresses_are_refused(client: TestClient, url: str, kind: str) -> None:
    message = webhook_error(client.post("/v1/txt2img", json={**TINY, "webhook": url}))
    assert message.startswith("webhook") and f"a {kind} address" in message


def test_a_malformed_webhook_is_refused_by_the_model(client: TestClient) -> None:
    message = webhook_error(client.post("/v1/txt2img", json={**TINY, "webhook": "ftp://93.184.216.34/x"}))
    assert "http:// or https://" in message
    r = client.post("/v1/txt2img", json={**TINY, "webhook": "https://93.184.216.34/x",
                                         "webhook_events_filter": ["finished"]})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("webhook_events_filter")


def test_a_public_webhook_is_accepted_with_the_default_events(client: TestClient) -> None:
    r = client.post("/v1/txt2img", json={**TINY, "webhook": "https://93.184.216.34/hook?token=x"})
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert params["webhook"] == "https://93.184.216.34/hook?token=x"
    assert params["webhook_events_filter"] == ["start", "completed"]


def test_without_a_secret_the_server_refuses_webhooks(redis_url: str, tmp_path: Path) -> None:
    with app_client(redis_url, tmp_path) as c:
        message = webhook_error(c.post("/v1/txt2img", json={**TINY, "webhook": "https://93.184.216.34/h"}))
        assert "SDQ_WEBHOOK_SECRET" in message
        assert c.post("/v1/txt2img", json=TINY).status_code == 202  # jobs without a webhook are unaffected


def test_the_operator_can_allow_private_receivers(redis_url: str, tmp_path: Path) -> None:
    with app_client(redis_url, tmp_path, webhook_secret=SECRET, webhook_allow_private=True) as c:
        assert c.post("/v1/txt2img", json={**TINY, "webhook": "http://127.0.0.1:9000/h"}).status_code == 202
    with app_client(redis_url, tmp_path, webhook_secret=SECRET, webhook_allowed_hosts="10.0.0.0/8") as c:
        assert c.post("/v1/txt2img", json={**TINY, "webhook": "http://10.0.0.1/h"}).status_code == 202
        webhook_error(c.post("/v1/txt2img", json={**TINY, "webhook": "http://192.168.1.1/h"}))


def test_canceling_a_queued_job_queues_its_completed_webhook(client: TestClient, redis_url: str) -> None:
    job = client.post("/v1/txt2img", json={**TINY, "webhook": "https://93.184.216.34/h"}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    redis = Redis.from_url(redis_url)
    try:
        [delivery_id] = Queue(Keys().webhooks(), connection=redis).job_ids
        kwargs = Job.fetch(delivery_id, connection=redis).kwargs
    finally:
        redis.close()
    assert (kwargs["event"], kwargs["job_id"], kwargs["msg_id"]) == ("completed", job["id"], delivery_id)
    assert kwargs["payload"]["status"] == "canceled"
    assert kwargs["url"] == "https://93.184.216.34/h"
