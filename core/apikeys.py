"""API keys, kept only as SHA-256 digests: in `SDQ_API_KEYS` and/or in the Redis hash `Keys.api_keys()`.

An entry is ``NAME:SHA256HEX[:MAX_PRIORITY]``: the name is the owner of the jobs the key submits, and the highest
priority it may ask for (default ``normal``). In Redis the field is NAME and the value ``SHA256HEX[:MAX_PRIORITY]``,
so keys can be added and revoked without restarting the API (`sdqueue apikey`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis

from core.jobs import Priority
from core.queues import PRIORITY_ORDER, Keys

log = logging.getLogger(__name__)

KEY_PREFIX = "sdq_"
DEFAULT_MAX_PRIORITY = Priority.normal
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FORMAT = "NAME:SHA256HEX[:MAX_PRIORITY]"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str  # hex SHA-256 of the key itself
    max_priority: Priority = DEFAULT_MAX_PRIORITY

    def allows(self, priority: Priority) -> bool:
        return PRIORITY_ORDER.index(priority) >= PRIORITY_ORDER.index(self.max_priority)

    def entry(self) -> str:
        """The line for SDQ_API_KEYS."""
        return f"{self.name}:{self.digest}:{self.max_priority.value}"


def generate() -> str:
    """A new random key (256 bits), recognisable by its prefix in logs and secret scanners."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_entry(entry: str) -> ApiKey:
    """``NAME:SHA256HEX[:MAX_PRIORITY]`` -> ApiKey; ValueError says what is wrong (never echoing the digest)."""
    name, _, rest = entry.strip().partition(":")
    return parse_stored(name, rest)


def parse_stored(name: str, value: str) -> ApiKey:
    """A key from its name and ``SHA256HEX[:MAX_PRIORITY]`` (the Redis hash's field and value)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"API key name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (entry: {_FORMAT})")
    hexdigest, _, priority = value.strip().partition(":")
    if not _DIGEST.fullmatch(hexdigest):
        raise ValueError(f"API key {name!r}: the hash must be 64 lowercase hex digits (entry: {_FORMAT})")
    if priority and priority not in Priority.__members__:
        allowed = ", ".join(p.value for p in PRIORITY_ORDER)
        raise ValueError(f"API key {name!r}: max priority must be one of {allowed}, got {priority!r}")
    return ApiKey(name, hexdigest, Priority(priority) if priority else DEFAULT_MAX_PRIORITY)


def parse_list(text: str) -> dict[str, ApiKey]:
    """SDQ_API_KEYS (comma-separated entries) -> keys by digest; a name or key listed twice is an error."""
    by_digest: dict[str, ApiKey] = {}
    names: set[str] = set()
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key = parse_entry(entry)
        if key.name in names or key.digest in by_digest:
            raise ValueError(f"API key {key.name!r} is listed twice (each name and each key may appear once)")
        names.add(key.name)
        by_digest[key.digest] = key
    return by_digest


def stored(redis: Redis, keys: Keys) -> list[ApiKey]:
    return parse_hash(redis.hgetall(keys.api_keys()))


def parse_hash(mapping: Mapping[bytes, bytes]) -> list[ApiKey]:
    """The keys in the Redis hash's contents, by name; a malformed entry is logged and skipped (it cannot sign in)."""
    found = []
    for name, value in mapping.items():
        try:
            found.append(parse_stored(name.decode(), value.decode()))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("ignoring API key %r stored in Redis: %s", name, exc)
    return sorted(found, key=lambda k: k.name)


def store(redis: Redis, keys: Keys, key: ApiKey) -> None:
    redis.hset(keys.api_keys(), key.name, f"{key.digest}:{key.max_priority.value}")


def revoke(redis: Redis, keys: Keys, name: str) -> bool:
    """Remove a key stored in Redis; False when there is none by that name."""
    return bool(redis.hdel(keys.api_keys(), name))
