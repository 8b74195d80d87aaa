"""Webhook signing (Standard Webhooks) and the URL rule. No network: IP literals, and a fake resolver for names."""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import time
from datetime import datetime, timezone

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from core.settings import SettingsError, load_settings
from core.webhooks import (
    Address,
    AllowList,
    Resolver,
    WebhookURLError,
    WebhookVerificationError,
    check_webhook_url,
    sign,
    signed_headers,
    signing_key,
    verify,
)

# The example secret of the Standard Webhooks specification's test vectors.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'


def reference_signature(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The signature by the specification's reference library (`standardwebhooks`), independent of ours."""
    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body.decode())


def test_signature_matches_the_reference_library_and_the_published_vector() -> None:
    key = signing_key(SECRET)
    assert sign(key, MSG_ID, TIMESTAMP, BODY) == reference_signature(SECRET, MSG_ID, TIMESTAMP, BODY)
    # The value the specification publishes for this input.
    assert sign(key, MSG_ID, TIMESTAMP, BODY) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_carry_id_timestamp_and_signature() -> None:
    headers = signed_headers(signing_key(SECRET), MSG_ID, BODY, timestamp=TIMESTAMP)
    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": reference_signature(SECRET, MSG_ID, TIMESTAMP, BODY),
    }


@pytest.mark.parametrize(
    ("secret", "reference_secret"),
    [
        (SECRET, SECRET),  # whsec_ + base64: both decode the same key from the same string
        ("whsec_" + base64.b64encode(bytes(range(32))).decode(), bytes(range(32))),
        ("a raw secret of more than sixteen bytes", b"a raw secret of more than sixteen bytes"),  # UTF-8 bytes
    ],
    ids=["spec-example", "whsec-32-bytes", "raw-string"],
)
def test_the_reference_library_verifies_what_we_send_and_we_verify_what_it_signs(
    secret: str, reference_secret: str | bytes
) -> None:
    body = b'{"id": "job", "status": "succeeded", "prompt": "caf\xc3\xa9"}'
    headers = signed_headers(signing_key(secret), MSG_ID, body)  # now: the library checks against its clock
    assert Webhook(reference_secret).verify(body, headers) == json.loads(body)
    with pytest.raises(ReferenceVerificationError):
        Webhook(reference_secret).verify(body.replace(b"succeeded", b"failed"), headers)

    timestamp = int(time.time())
    theirs = {"webhook-id": MSG_ID, "webhook-timestamp": str(timestamp),
              "webhook-signature": reference_signature(reference_secret, MSG_ID, timestamp, body)}
    verify(secret, theirs, body)


def test_verify_accepts_a_genuine_message_in_any_header_case() -> None:
    headers = signed_headers(signing_key(SECRET), MSG_ID, BODY, timestamp=TIMESTAMP)
    verify(SECRET, {k.title(): v for k, v in headers.items()}, BODY, now=TIMESTAMP + 10)
    # Several signatures (a secret being rotated): one match is enough.
    rotated = {**headers, "webhook-signature": "v1,AAAA " + headers["webhook-signature"]}
    verify(SECRET, rotated, BODY, now=TIMESTAMP)


@pytest.mark.parametrize(
    ("secret", "body", "now", "error"),
    [
        (SECRET, BODY + b" ", TIMESTAMP, "no webhook-signature matches"),  # tampered body
        ("whsec_" + base64.b64encode(b"another key of 24 bytes!").decode(), BODY, TIMESTAMP, "no webhook-signature"),
        (SECRET, BODY, TIMESTAMP + 301, "off this clock"),  # stale: more than 5 minutes old
        (SECRET, BODY, TIMESTAMP - 301, "off this clock"),  # from the future
    ],
    ids=["tampered-body", "wrong-secret", "stale", "future"],
)
def test_verify_rejects(secret: str, body: bytes, now: float, error: str) -> None:
    headers = signed_headers(signing_key(SECRET), MSG_ID, BODY, timestamp=TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match=error):
        verify(secret, headers, body, now=now)


def test_verify_rejects_missing_headers_and_a_bad_timestamp() -> None:
    headers = signed_headers(signing_key(SECRET), MSG_ID, BODY, timestamp=TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match=r"missing header.*webhook-signature"):
        verify(SECRET, {k: v for k, v in headers.items() if k != "webhook-signature"}, BODY, now=TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match="unix seconds"):
        verify(SECRET, {**headers, "webhook-timestamp": "yesterday"}, BODY, now=TIMESTAMP)


def test_secret_forms() -> None:
    raw = "a raw secret of more than sixteen bytes"
    assert signing_key(raw) == raw.encode()
    assert signing_key(SECRET) == base64.b64decode(SECRET[6:])
    with pytest.raises(ValueError, match="after whsec_ must be base64"):
        signing_key("whsec_not*base64")
    with pytest.raises(ValueError, match="at least 16 bytes, got 5"):
        signing_key("short")


def test_settings_check_the_secret_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDQ_WEBHOOK_SECRET", "whsec_tooshort")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "SDQ_WEBHOOK_SECRET:" in str(info.value) and "tooshort" not in str(info.value)
    monkeypatch.setenv("SDQ_WEBHOOK_SECRET", "")
    assert load_settings().webhook_secret is None  # empty = unset
    monkeypatch.setenv("SDQ_WEBHOOK_ALLOWED_HOSTS", "10.0.0.0/33")
    with pytest.raises(SettingsError, match="SDQ_WEBHOOK_ALLOWED_HOSTS"):
        load_settings()


# --- URL rule -------------------------------------------------------------------------------------------------------


def no_dns(host: str, port: int) -> list[Address]:
    raise AssertionError(f"an IP literal must not be resolved, got {host}")


def fake_dns(table: dict[str, list[str]]) -> Resolver:
    def resolve(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.1/hook", "private"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://192.168.1.1/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://100.64.0.1/hook", "non-public"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped
        ("http://[::ffff:169.254.169.254]/hook", "link-local"),
        ("http://[2002:a00:1::1]/hook", "private"),  # 6to4 around 10.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/hook", "link-local"),  # NAT64 around 169.254.169.254
    ],
)
def test_non_public_addresses_are_refused(url: str, kind: str) -> None:
    with pytest.raises(WebhookURLError, match=f"a {kind} address"):
        check_webhook_url(url, resolve=no_dns)


def test_a_name_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(WebhookURLError, match=r"'localhost' resolves to \S+, a loopback address"):
        check_webhook_url("http://localhost:9000/hook")  # the system resolver: localhost needs no network


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    resolve = fake_dns({"hooks.example": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(WebhookURLError, match=r"resolves to 10\.1\.2\.3, a private address"):
        check_webhook_url("https://hooks.example/x", resolve=resolve)


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/hook", "https://93.184.216.34:8443/a?b=c", "http://[2606:2800:220:1::1]/hook",
            "http://[::ffff:93.184.216.34]/hook", "http://[64:ff9b::5db8:d822]/hook"],
)
def test_public_addresses_are_accepted(url: str) -> None:
    [address] = check_webhook_url(url, resolve=no_dns)
    assert address.is_global


def test_names_are_resolved_and_every_address_returned() -> None:
    resolve = fake_dns({"hooks.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    got = check_webhook_url("https://hooks.example/x", resolve=resolve)
    assert [str(a) for a in got] == ["93.184.216.34", "2606:2800:220:1::1"]


def test_the_operator_can_allow_private_addresses_or_some_hosts() -> None:
    assert [str(a) for a in check_webhook_url("http://127.0.0.1:8080/h", allow_private=True)] == ["127.0.0.1"]
    allowed = AllowList.parse(" hooks.internal , 10.1.0.0/16, fd00::5 ")
    resolve = fake_dns({"hooks.internal": ["10.9.9.9"], "other.internal": ["10.9.9.9"]})
    check_webhook_url("http://hooks.internal/h", allowed=allowed, resolve=resolve)
    check_webhook_url("http://10.1.200.3/h", allowed=allowed, resolve=no_dns)
    check_webhook_url("http://[fd00::5]/h", allowed=allowed, resolve=no_dns)
    with pytest.raises(WebhookURLError, match="private"):
        check_webhook_url("http://other.internal/h", allowed=allowed, resolve=resolve)
    with pytest.raises(WebhookURLError, match="private"):
        check_webhook_url("http://10.2.0.1/h", allowed=allowed, resolve=no_dns)
    with pytest.raises(ValueError, match="not a host name"):
        AllowList.parse("hooks.internal:8080")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://93.184.216.34/x", "http:// or https:// URL, got scheme 'ftp'"),
        ("93.184.216.34/hook", "got scheme 'none'"),
        ("http:///hook", "no host"),
        ("http://93.184.216.34:99999/", "not a valid URL"),
        ("http://93.184.216.34/a b", "whitespace"),
        ("http://x.example/" + "a" * 2048, "at most 2048 characters"),
    ],
)
def test_malformed_urls_name_the_problem(url: str, error: str) -> None:
    with pytest.raises(WebhookURLError, match=error):
        check_webhook_url(url, resolve=no_dns)


def test_a_name_that_does_not_resolve_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def nxdomain(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    with pytest.raises(WebhookURLError, match=r"'hooks\.example' does not resolve"):
        check_webhook_url("http://hooks.example/hook")
