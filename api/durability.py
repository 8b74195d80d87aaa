"""SDQ_DURABLE_SUBMIT: how this Redis can confirm that a job is on disk before the API answers 202.

Found once, from what Redis says about itself:

- Redis >= 7.2 with `appendonly yes`: `WAITAOF 1 0 <timeout>` after the enqueue (`core.commit.confirm_on_disk`);
  the timeout is half of SDQ_REDIS_TIMEOUT_S, so that the wait ends before the socket gives up.
- An older Redis with `appendonly yes` and `appendfsync always`: Redis fsyncs each write before it replies, so the
  reply to the enqueue transaction is the confirmation and nothing more is sent.
- Anything else cannot keep the promise. The API refuses to start then (`DurabilityUnavailable` from the app's
  start-up) rather than accept jobs it was told to keep safe. A Redis that cannot be reached at start is asked
  before the first enqueue instead; until it says yes, submissions get 503 and nothing is queued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from redis import Redis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

Mode = Literal["off", "waitaof", "fsync_always"]
WAITAOF_SINCE = (7, 2)


class DurabilityUnavailable(Exception):
    """SDQ_DURABLE_SUBMIT is on, and this Redis cannot confirm that writes are on disk."""


@dataclass
class Durability:
    enabled: bool
    timeout_ms: int
    mode: Mode | None = None  # None: not asked yet

    @classmethod
    def from_settings(cls, durable_submit: bool, redis_timeout_s: float) -> Durability:
        return cls(durable_submit, max(1, int(redis_timeout_s * 500)), None if durable_submit else "off")

    @property
    def wait_ms(self) -> int | None:
        """WAITAOF's timeout when each enqueue must be followed by one, else None."""
        return self.timeout_ms if self.mode == "waitaof" else None

    def ensure(self, redis: Redis) -> None:
        """Find the mode if not known yet; raises DurabilityUnavailable, or a RedisError when Redis is unreachable."""
        if self.mode is None:
            self.mode = probe(redis)
            log.info("durable submit: %s", "WAITAOF after each enqueue" if self.mode == "waitaof"
                     else "Redis fsyncs every write before replying (appendfsync always)")


def probe(redis: Redis) -> Mode:
    """The way `redis` can confirm writes on disk, or DurabilityUnavailable saying what it lacks."""
    version_text = str(redis.info("server")["redis_version"])
    version = tuple(int(part) for part in version_text.split(".")[:2])
    if not int(redis.info("persistence").get("aof_enabled", 0)):
        raise DurabilityUnavailable(
            f"SDQ_DURABLE_SUBMIT=true needs Redis with append-only persistence (appendonly yes); Redis "
            f"{version_text} has it off. Turn it on, or set SDQ_DURABLE_SUBMIT=false"
        )
    if version >= WAITAOF_SINCE:
        return "waitaof"
    try:
        fsync = _text(redis.config_get("appendfsync").get("appendfsync"))
    except ResponseError:  # CONFIG disabled or renamed (managed Redis)
        fsync = "unknown (CONFIG GET refused)"
    if fsync == "always":
        return "fsync_always"
    raise DurabilityUnavailable(
        f"SDQ_DURABLE_SUBMIT=true needs Redis >= 7.2 (for WAITAOF), or appendfsync always on an older Redis; found "
        f"Redis {version_text} with appendfsync {fsync}. Upgrade Redis, set appendfsync always, or set "
        "SDQ_DURABLE_SUBMIT=false"
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
