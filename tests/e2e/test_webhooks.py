"""Webhooks on real processes: API, GPU worker and webhook sender on a real Redis, receivers on loopback.

Loopback receivers are allowed the way an operator would allow an internal host: SDQ_WEBHOOK_ALLOWED_HOSTS.
"""

from __future__ import annotations

from typing import Any

import httpx

from core.webhooks import verify
from tests.e2e.conftest import Service
from tests.redis_server import free_port
from tests.webhook_receiver import Received, WebhookReceiver, verified_json

SECRET = "whsec_" + "c2RxdWV1ZSB0ZXN0IHNpZ25pbmcga2V5IDMyIGJ5dGVz"
SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 3, "sampler": "euler"}


def verified(requests: list[Received]) -> list[dict[str, Any]]:
    """The bodies, each after checking its signature as a receiver does: with the Standard Webhooks reference
    library, and with `core.webhooks.verify`, the check our documentation gives receivers."""
    for request in requests:
        verify(SECRET, request.headers, request.body)
    return [verified_json(SECRET, r) for r in requests]


def test_signed_webhooks_for_start_progress_and_completion_with_retries(service: Service) -> None:
    metrics_port = free_port()
    service.env.update({
        "SDQ_WEBHOOK_SECRET": SECRET,
        "SDQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "SDQ_WEBHOOK_RETRY_BASE_S": "0.2",
        "SDQ_WEBHOOK_METRICS_PORT": str(metrics_port),
    })
    receiver = WebhookReceiver()
    flaky = WebhookReceiver(statuses=(500, 500, 204))  # fails twice, then takes it
    try:
        service.start_api()
        service.start_worker()
        service.start_webhooks()
        service.wait_ready()

        refused = service.http.post("/v1/txt2img", json={**SMALL, "webhook": "http://10.0.0.1/hook"})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook"

        job = service.submit(**SMALL, seed=1, webhook=receiver.url,
                             webhook_events_filter=["start", "progress", "completed"])
        other = service.submit(**SMALL, seed=2, webhook=flaky.url, webhook_events_filter=["completed"])
        done = service.wait_job(job["id"])
        service.wait_job(other["id"])

        # One sender sends in queue order: start, then progress, then completed.
        got = receiver.wait_until(lambda r: any(b"succeeded" in x.body for x in r), 30, "completed webhook")
        bodies = verified(got)
        assert bodies[0]["status"] == "running" and bodies[-1]["status"] == "succeeded"
        assert bodies[0]["started_at"] is not None and bodies[0]["images"] == []
        progress = bodies[1:-1]
        assert progress and all(b["status"] == "running" and b["progress"]["step"] >= 1 for b in progress)
        final = bodies[-1]
        assert final == done  # the job exactly as GET /v1/jobs/{id} shows it
        assert [i["url"] for i in final["images"]] == [f"{service.url}/v1/images/{job['id']}/0.png"]
        assert service.http.get(final["images"][0]["url"]).status_code == 200
        assert len({r.headers["webhook-id"] for r in got}) == len(got)  # one message per event

        # 500, 500, then delivered: every attempt of the message carries the same id, signed anew.
        attempts = flaky.wait_for(3)
        assert [b["status"] for b in verified(attempts)] == ["succeeded"] * 3
        assert len({a.headers["webhook-id"] for a in attempts}) == 1

        page = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'sdq_webhook_deliveries_total{event="completed",outcome="retried"} 2.0' in page
        assert 'sdq_webhook_deliveries_total{event="completed",outcome="delivered"} 2.0' in page
        assert 'sdq_webhook_deliveries_total{event="start",outcome="delivered"} 1.0' in page
    finally:
        receiver.stop()
        flaky.stop()
