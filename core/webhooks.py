"""Webhook signing (the Standard Webhooks scheme) and the rule for which URLs a webhook may reach.

Signing, as https://www.standardwebhooks.com specifies it: every delivery carries three headers,

    webhook-id:        a unique message id, the same on every retry of one message (``msg_<32 hex>``)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: ``v1,<base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}"))>``

where ``body`` is the raw request body (bytes, before any JSON parsing) and ``key`` the secret's bytes: the base64
decoding of what follows ``whsec_`` in a ``whsec_...`` secret, else the secret's UTF-8 bytes. ``verify`` is the check
a receiver runs; it is also what the tests use.

URL rule: a webhook may only reach public addresses. Every address its host resolves to must be global unicast;
loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata address,
fe80::/10), shared (100.64/10), unspecified, multicast and reserved addresses are refused, also when written as
IPv4-mapped, 6to4 or NAT64 IPv6 addresses, unless the operator allows them. Nothing here imports the settings, so
the module stands alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[Address]]

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16
TOLERANCE_S = 5 * 60  # receivers refuse messages whose timestamp is further than this from their clock
MAX_URL_CHARS = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


# --- signing ------------------------------------------------------------------------------------------------------


class WebhookVerificationError(ValueError):
    """A delivery whose headers or signature do not check out."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: ``whsec_<base64>`` (the Standard Webhooks form) or any other string as UTF-8."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except binascii.Error:
            raise ValueError(f"the part after {SECRET_PREFIX} must be base64") from None
    else:
        key = secret.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"the key must have at least {MIN_KEY_BYTES} bytes, got {len(key)}; "
            f"e.g. {SECRET_PREFIX} followed by the base64 of 32 random bytes"
        )
    return key


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one attempt."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received delivery; raises WebhookVerificationError saying what is wrong.

    ``secret`` is the ``whsec_...`` string (or the raw key bytes); ``headers`` may use any letter case.
    """
    key = secret if isinstance(secret, bytes) else signing_key(secret)
    lower = {name.lower(): value for name, value in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lower.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    try:
        timestamp = int(lower["webhook-timestamp"])
    except ValueError:
        raise WebhookVerificationError(
            f"webhook-timestamp must be unix seconds, got {lower['webhook-timestamp']!r}"
        ) from None
    skew = (time.time() if now is None else now) - timestamp
    if abs(skew) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is {skew:+.0f} s off this clock (tolerance {tolerance_s} s)")
    expected = sign(key, lower["webhook-id"], timestamp, body)
    # The header may list several space-separated signatures (during a secret rotation); one match is enough.
    if not any(hmac.compare_digest(expected, candidate) for candidate in lower["webhook-signature"].split()):
        raise WebhookVerificationError("no webhook-signature matches the body")


# --- URL rule -----------------------------------------------------------------------------------------------------


class WebhookURLError(ValueError):
    """A webhook URL that is malformed, does not resolve, or reaches an address the operator has not allowed."""


@dataclass(frozen=True)
class AllowList:
    """Hosts the operator lets webhooks reach although they are not public: names, addresses or networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """From a comma-separated list such as ``hooks.internal, 10.1.0.0/16, fd00::5``."""
        names, networks = set(), []
        for entry in (e.strip().lower().rstrip(".") for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if "/" in entry or ":" in entry or not all(part for part in entry.split(".")):
                    raise ValueError(f"not a host name, address or network: {entry!r}") from None
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, address: Address) -> bool:
        return host.lower().rstrip(".") in self.names or any(address in n for n in self.networks)


def split_webhook_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL; ValueError naming what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"webhook must be at most {MAX_URL_CHARS} characters, got {len(url)}")
    if any(c.isspace() for c in url):
        raise ValueError("webhook must not contain whitespace")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"webhook is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"webhook must be an http:// or https:// URL, got scheme {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError("webhook URL has no host")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve_host(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookURLError(f"webhook host {host!r} does not resolve ({exc})") from None
    addresses: list[Address] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
        if address not in addresses:
            addresses.append(address)
    return addresses


def non_public_kind(address: Address) -> str | None:
    """Why `address` is not a public unicast address ("loopback", "private", ...), or None when it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:  # these reach the IPv4 address inside them
            return non_public_kind(embedded)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", not address.is_global),  # e.g. shared address space 100.64/10
    )
    return next((kind for kind, hit in checks if hit), None)


def check_webhook_url(
    url: str,
    *,
    allow_private: bool = False,
    allowed: AllowList | None = None,
    resolve: Resolver = resolve_host,
) -> list[Address]:
    """The addresses a delivery to `url` may connect to: every address its host resolves to, all checked.

    Raises WebhookURLError naming the host, the address and the rule. An IP literal needs no DNS.
    """
    try:
        _, host, port = split_webhook_url(url)
    except ValueError as exc:
        raise WebhookURLError(str(exc)) from None
    try:
        addresses: list[Address] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise WebhookURLError(f"webhook host {host!r} resolves to no address")
    if allow_private:
        return addresses
    for address in addresses:
        kind = non_public_kind(address)
        if kind is not None and not (allowed and allowed.allows(host, address)):
            where = f"is a {kind} address" if str(address) == host else f"resolves to {address}, a {kind} address"
            raise WebhookURLError(
                f"webhook host {host!r} {where}; webhooks may only reach public addresses unless the operator "
                "allows more (SDQ_WEBHOOK_ALLOW_PRIVATE, SDQ_WEBHOOK_ALLOWED_HOSTS)"
            )
    return addresses

