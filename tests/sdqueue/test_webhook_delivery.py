"""Webhook deliveries through RQ on a real Redis, sent by the webhook worker to a real HTTP receiver on loopback."""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from core import jobstore, jobview
from core.jobs import GenerationParams, Status
from core.queues import Keys
from core.settings import Settings, get_settings
from core.storage import make_storage
from core.webhook_queue import WebhookNotifier, enqueue_delivery
from core.webhooks import verify
from sdqueue.webhook_delivery import METRICS, post_pinned
from sdqueue.webhooks import WebhookWorker
from tests.webhook_receiver import WebhookReceiver, verified_json

SECRET = "whsec_" + "c2RxdWV1ZSB0ZXN0IHNpZ25pbmcga2V5IDMyIGJ5dGVz"


@pytest.fixture
def settings(redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    """The webhook worker reads its settings from the environment, as `sdqueue webhooks` does."""
    for name, value in {
        "SDQ_REDIS_URL": redis_url,
        "SDQ_DATA_DIR": str(tmp_path),
        "SDQ_WEBHOOK_SECRET": SECRET,
        "SDQ_WEBHOOK_ALLOW_PRIVATE": "true",
        "SDQ_WEBHOOK_RETRY_BASE_S": "0",  # retries re-enter the queue at once, so a burst run sends them all
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.stop()


def view(url: str, events: list[str] | None = None) -> Any:
    params = GenerationParams.model_validate(
        {"prompt": "a cat", "webhook": url, **({"webhook_events_filter": events} if events else {})}
    )
    return jobview.queued_view(jobstore.new_job_spec(params), queue_position=0)


def run_sender(redis: Redis, settings: Settings) -> None:
    WebhookWorker([Keys(settings.queue_prefix).webhooks()], connection=redis,
                  heartbeat_s=settings.heartbeat_s).work(burst=True)


def count(event: str, outcome: str) -> float:
    return METRICS.deliveries.labels(event, outcome)._value.get()


def test_a_delivery_is_signed_and_carries_the_job(redis: Redis, settings: Settings, receiver: WebhookReceiver) -> None:
    job = view(receiver.url)
    before = count("completed", "delivered")
    msg_id = enqueue_delivery(redis, settings, job, "completed")
    run_sender(redis, settings)

    [got] = receiver.wait_for(1)
    verify(SECRET, got.headers, got.body)
    assert verified_json(SECRET, got) == job.model_dump(mode="json")  # the reference library agrees
    assert got.headers["webhook-id"] == msg_id and msg_id.startswith("msg_")
    assert got.headers["content-type"] == "application/json"
    assert got.path == "/hook"
    assert count("completed", "delivered") == before + 1
    assert Job.fetch(msg_id, connection=redis).get_status() == JobStatus.FINISHED


def test_5xx_is_retried_with_the_same_id_until_delivered(redis: Redis, settings: Settings) -> None:
    receiver = WebhookReceiver(statuses=(500, 503, 200))
    try:
        retried = count("start", "retried")
        msg_id = enqueue_delivery(redis, settings, view(receiver.url, ["start"]), "start")
        run_sender(redis, settings)
        attempts = receiver.wait_for(3)
    finally:
        receiver.stop()
    assert [a.headers["webhook-id"] for a in attempts] == [msg_id] * 3
    for attempt in attempts:
        verify(SECRET, attempt.headers, attempt.body)
        verified_json(SECRET, attempt)
    assert len({a.body for a in attempts}) == 1  # the same message each time
    assert count("start", "retried") == retried + 2
    assert Job.fetch(msg_id, connection=redis).get_status() == JobStatus.FINISHED


def test_other_4xx_fail_at_once_and_stay_in_the_failed_registry(redis: Redis, settings: Settings) -> None:
    receiver = WebhookReceiver(statuses=(404,))
    try:
        failed = count("completed", "failed")
        msg_id = enqueue_delivery(redis, settings, view(receiver.url), "completed")
        run_sender(redis, settings)
        time.sleep(0.2)
        assert len(receiver.received) == 1
    finally:
        receiver.stop()
    assert count("completed", "failed") == failed + 1
    queue = Keys(settings.queue_prefix).webhooks()
    assert msg_id in FailedJobRegistry(queue, connection=redis).get_job_ids()


def test_retry_after_sets_the_next_delay(redis: Redis, settings: Settings) -> None:
    receiver = WebhookReceiver(statuses=(429,), retry_after="120")
    try:
        msg_id = enqueue_delivery(redis, settings, view(receiver.url), "start")
        started = time.time()
        run_sender(redis, settings)
    finally:
        receiver.stop()
    registry = ScheduledJobRegistry(Keys(settings.queue_prefix).webhooks(), connection=redis)
    when = registry.get_scheduled_time(msg_id).timestamp()
    assert 119 <= when - started <= 125  # the retry waits for Retry-After, not the 0 s backoff


def test_a_url_refused_at_delivery_is_not_sent(redis: Redis, settings: Settings, receiver: WebhookReceiver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    msg_id = enqueue_delivery(redis, settings, view(receiver.url), "completed")
    monkeypatch.setenv("SDQ_WEBHOOK_ALLOW_PRIVATE", "false")  # the operator tightened the rule since the submit
    get_settings.cache_clear()
    refused = count("completed", "refused")
    run_sender(redis, settings)
    assert receiver.received == []
    assert count("completed", "refused") == refused + 1
    assert msg_id in FailedJobRegistry(Keys(settings.queue_prefix).webhooks(), connection=redis).get_job_ids()


def test_the_request_goes_to_the_checked_address_without_resolving_again(
    redis: Redis, settings: Settings, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is resolved once, for the check; the connection uses that address."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.rebind.test":
            lookups.append(host)
            # First answer: loopback (allowed in this test). Any later answer would point elsewhere.
            return real("127.0.0.1" if len(lookups) == 1 else "192.0.2.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    enqueue_delivery(redis, settings, view(f"http://hooks.rebind.test:{receiver.port}/hook"), "completed")
    run_sender(redis, settings)
    [got] = receiver.wait_for(1)
    assert got.headers["host"] == f"hooks.rebind.test:{receiver.port}"
    assert lookups == ["hooks.rebind.test"]


def test_the_worker_side_queues_only_what_the_job_asked_for(redis: Redis, settings: Settings) -> None:
    keys = Keys(settings.queue_prefix)
    storage = make_storage(settings)
    notifier = WebhookNotifier(redis, settings, storage)
    with_hook = jobstore.new_job_spec(GenerationParams.model_validate(
        {"prompt": "a cat", "webhook": "https://93.184.216.34/h", "webhook_events_filter": ["start", "progress"]}
    ))
    without = jobstore.new_job_spec(GenerationParams(prompt="a dog"))
    for spec in (with_hook, without):
        jobstore.enqueue(redis, settings, spec)
    deliveries = Queue(keys.webhooks(), connection=redis)
    for spec in (with_hook, without):
        job = Job.fetch(spec.id, connection=redis)
        with redis.pipeline() as pipe:
            job.prepare_for_execution("w", pipeline=pipe)
            job.meta["started_at"] = "2030-01-01T00:00:00+00:00"
            notifier.started(job, pipe)
            pipe.execute()
        for _ in range(3):  # three progress updates within a second: one delivery
            job.meta["progress"] = {"step": 1, "total": 4, "percent": 25.0}
            with redis.pipeline() as pipe:
                notifier.progress(job, pipe)
                pipe.execute()
        notifier.completed(job)  # "completed" is not in its filter
    queued = [Job.fetch(i, connection=redis).kwargs for i in deliveries.job_ids]
    assert [(k["event"], k["job_id"]) for k in queued] == [("start", with_hook.id), ("progress", with_hook.id)]
    start, progress = (k["payload"] for k in queued)
    assert start["status"] == progress["status"] == Status.running.value
    assert start["params"]["webhook"] == "https://93.184.216.34/h"
    assert progress["progress"]["percent"] == 25.0


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` (and its key), signed by itself: the client trusts exactly this one."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_file, key_file


def test_https_to_the_checked_address_verifies_the_certificate_against_the_url_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path, "hooks.tls.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    receiver = WebhookReceiver(tls=server_tls)
    # Trust only this certificate (the sender otherwise trusts the public CAs).
    trusted = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, verify=trusted))
    loopback = [ipaddress.ip_address("127.0.0.1")]
    try:
        response = post_pinned(f"https://hooks.tls.test:{receiver.port}/hook", loopback, {}, b"{}")
        assert response.status_code == 204
        assert receiver.received[0].headers["host"] == f"hooks.tls.test:{receiver.port}"
        # The same address under a name the certificate does not carry: refused, as without pinning.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            post_pinned(f"https://other.tls.test:{receiver.port}/hook", loopback, {}, b"{}")
    finally:
        receiver.stop()
