"""Sending one webhook message: the RQ job that `sdqueue webhooks` runs for each queued delivery.

One attempt: check the URL again (its host may resolve elsewhere now: DNS rebinding), sign the body, POST it to an
address that was just checked, with the URL's own Host header and TLS server name, and classify the answer:

- 2xx: delivered;
- 429, 5xx or a network error (connect, timeout, reset): raise, so RQ's ``Retry`` schedules the next attempt after
  the backoff interval, or after ``Retry-After`` (up to ``MAX_RETRY_AFTER_S``) when the receiver sent one;
- any other status (3xx included: redirects are not followed, they could point anywhere): failed, no retry;
- a URL that now breaks the URL rule: refused, no retry.

Connecting to the checked address leaves no window between the check and the connection, so a host that resolves to
a public address for the check and to a private one right after cannot redirect the request. HTTP(S)_PROXY variables
are ignored for the same reason (a proxy would resolve the name again).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from rq import get_current_job
from rq.job import Job

from core.settings import Settings, get_settings
from core.version import __version__
from core.webhooks import Address, AllowList, WebhookURLError, check_webhook_url, signed_headers, signing_key

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
MAX_RETRY_AFTER_S = 600.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class WebhookMetrics:
    """The sender's metrics, in a registry of their own (served on SDQ_WEBHOOK_METRICS_PORT)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "sdq_webhook_deliveries",
            "Delivery attempts by event and outcome: delivered, retried (failed, another attempt is scheduled), "
            "failed (given up) or refused (the URL breaks the URL rule).",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sdq_webhook_delivery_seconds",
            "Time from the job event to its delivery (queueing and retries included).",
            ["event"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "sdq_webhook_request_seconds", "Duration of one delivery attempt's HTTP request.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )


METRICS = WebhookMetrics()  # one per process: the sender process serves it


class DeliveryError(Exception):
    """An attempt that did not deliver; already logged and counted by the time it is raised."""


def deliver(msg_id: str, url: str, event: str, job_id: str, payload: dict[str, Any], event_at: float) -> dict[str, Any]:
    """The RQ job function of a delivery (see core.webhook_queue.enqueue_delivery)."""
    return Delivery(get_settings(), METRICS).attempt(msg_id, url, event, job_id, payload, event_at)


class Delivery:
    """One attempt at one message, with the process's settings (the URL rule and the secret as they are now)."""

    def __init__(self, settings: Settings, metrics: WebhookMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.allowed = AllowList.parse(settings.webhook_allowed_hosts)

    def attempt(
        self, msg_id: str, url: str, event: str, job_id: str, payload: dict[str, Any], event_at: float
    ) -> dict[str, Any]:
        job = get_current_job()
        retries_left = (job.retries_left or 0) if job is not None else 0
        what = f"webhook {msg_id} ({event} of job {job_id}) to {httpx.URL(url).host}"
        try:
            addresses = check_webhook_url(url, allow_private=self.settings.webhook_allow_private, allowed=self.allowed)
        except WebhookURLError as exc:
            self._give_up(job, event, "refused", f"{what} refused: {exc}")
        if self.settings.webhook_secret is None:
            self._give_up(job, event, "failed", f"{what} not sent: SDQ_WEBHOOK_SECRET is not set")
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            **signed_headers(signing_key(self.settings.webhook_secret.get_secret_value()), msg_id, body),
            "content-type": "application/json",
            "user-agent": f"sdqueue-webhooks/{__version__}",
        }
        started = time.monotonic()
        try:
            response = post_pinned(url, addresses, headers, body)
        except httpx.TransportError as exc:
            response, problem = None, f"{type(exc).__name__}: {exc}"
        finally:
            self.metrics.request_seconds.observe(time.monotonic() - started)
        if response is not None and response.is_success:
            self.metrics.deliveries.labels(event, "delivered").inc()
            self.metrics.latency.labels(event).observe(max(0.0, time.time() - event_at))
            log.info("%s delivered: %d", what, response.status_code)
            return {"status_code": response.status_code}
        retry_after = None
        if response is not None:
            problem = f"answered {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                self._give_up(job, event, "failed", f"{what} failed, not retried: {problem}")
            retry_after = retry_after_s(response)
        if job is None or retries_left <= 0:
            self._give_up(job, event, "failed", f"{what} failed after its last attempt: {problem}")
        if retry_after is not None and job.retry_intervals:
            # RQ takes the next delay from this list when the job raises (Job.retry): make it at least Retry-After.
            index = max(len(job.retry_intervals) - retries_left, 0)
            wait = math.ceil(max(job.retry_intervals[index], min(retry_after, MAX_RETRY_AFTER_S)))
            job.retry_intervals[index] = wait
        self.metrics.deliveries.labels(event, "retried").inc()
        log.warning("%s %s; %d retries left", what, problem, retries_left)
        raise DeliveryError(f"{what} {problem}")

    def _give_up(self, job: Job | None, event: str, outcome: str, message: str) -> NoReturn:
        """Count and log a final outcome, then fail the RQ job without a retry (it stays in RQ's failed registry)."""
        self.metrics.deliveries.labels(event, outcome).inc()
        log.warning(message)
        if job is not None:
            job.retries_left = 0  # read by RQ when this attempt raises: no further attempt
        raise DeliveryError(message)


def post_pinned(url: str, addresses: list[Address], headers: dict[str, str], body: bytes) -> httpx.Response:
    """POST to the first of `addresses` that accepts a connection, as if to `url` (Host header, TLS name)."""
    target = httpx.URL(url)
    extensions: dict[str, Any] = {}
    name = target.raw_host.decode("ascii")
    if target.scheme == "https" and not _is_address(name):
        extensions["sni_hostname"] = name  # the certificate is checked against the name, not the address
    headers = {**headers, "host": target.netloc.decode("ascii")}
    last: httpx.TransportError | None = None
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
        for address in addresses:
            try:
                return client.post(target.copy_with(host=str(address)), content=body, headers=headers,
                                   extensions=extensions)
            except httpx.ConnectError as exc:  # this address is down: the next one was checked too
                last = exc
    assert last is not None
    raise last


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
