"""Limits on what one client may ask: request body size, submissions per minute and queued jobs per API key.

The per-key limits are Lua scripts, so each check-and-update is atomic across every API process sharing the Redis
and costs one round trip; they read Redis' clock (TIME), so API hosts need not agree on the time.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from core.queues import Keys
from core.settings import Settings

# Token bucket: `burst` tokens at most, refilled at `rate` per second; a submission takes one.
# Returns {1, 0} when allowed, else {0, milliseconds until a token is there}.
_TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, wait_ms}
"""

# Queued-jobs slot: KEYS[1] is the key's sorted set of jobs that may still wait (score = when added). Members whose
# RQ job has left the waiting states are dropped; a member with no job hash yet is a submission in flight, unless
# it is older than ARGV[4] seconds (its API process died before enqueueing). Adds ARGV[1] if fewer than ARGV[2] wait.
_QUEUED_SLOT = """
local job_id, limit, job_prefix, stale = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = tonumber(redis.call('TIME')[1])
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local waiting = 0
for i = 1, #entries, 2 do
  local id, added = entries[i], tonumber(entries[i + 1])
  local status = redis.call('HGET', job_prefix .. id, 'status')
  if status == 'queued' or status == 'deferred' or status == 'scheduled' or status == 'created'
     or (not status and now - added < stale) then
    waiting = waiting + 1
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
if waiting >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now, job_id)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_IN_FLIGHT_STALE_S = 60
_QUEUED_RETRY_AFTER_S = 5


class KeyLimits:
    """SDQ_RATE_LIMIT_PER_MIN / SDQ_RATE_LIMIT_BURST and SDQ_MAX_QUEUED_PER_KEY for one API key."""

    def __init__(self, aredis: AsyncRedis, keys: Keys, settings: Settings) -> None:
        self.aredis = aredis
        self.keys = keys
        self.settings = settings
        self._bucket = aredis.register_script(_TOKEN_BUCKET)
        self._slot = aredis.register_script(_QUEUED_SLOT)

    async def take_submission(self, owner: str) -> None:
        """Spend one of `owner`'s submission tokens, or raise 429 `rate_limited` with Retry-After."""
        per_min = self.settings.rate_limit_per_min
        if not per_min:
            return
        allowed, wait_ms = await self._bucket(
            keys=[self.keys.rate_bucket(owner)], args=[per_min / 60.0, self.settings.rate_limit_burst]
        )
        if not int(allowed):
            retry = max(1, math.ceil(int(wait_ms) / 1000))
            raise ApiError(
                429, "rate_limited",
                f"API key {owner!r} may submit {per_min} jobs per minute (SDQ_RATE_LIMIT_PER_MIN); retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )

    async def reserve_queued(self, owner: str, job_id: str) -> None:
        """Count `job_id` among `owner`'s waiting jobs, or raise 429 `too_many_queued` if it already has the most."""
        limit = self.settings.max_queued_per_key
        if not limit:
            return
        ok = await self._slot(
            keys=[self.keys.owner_queued(owner)],
            args=[job_id, limit, Job.redis_job_namespace_prefix, _IN_FLIGHT_STALE_S, self.settings.result_ttl_s],
        )
        if not int(ok):
            raise ApiError(
                429, "too_many_queued",
                f"API key {owner!r} already has {limit} jobs waiting (SDQ_MAX_QUEUED_PER_KEY); retry when some have "
                "started",
                headers={"Retry-After": str(_QUEUED_RETRY_AFTER_S)},
            )

    async def release_queued(self, owner: str, job_id: str) -> None:
        """Give the slot back: the job was not queued after all."""
        if self.settings.max_queued_per_key:
            await self.aredis.zrem(self.keys.owner_queued(owner), job_id)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        # The client may still be sending: the connection is not reused.
        super().__init__(413, f"request body exceeds {limit} bytes (SDQ_MAX_BODY_BYTES)", {"Connection": "close"})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, when the route starts reading it: at once from Content-Length (nothing is
    read), else as soon as a chunked body has brought more.

    The check sits in `receive`, so it comes after what runs before the body is read, authentication above all
    (`api.auth.AuthenticatedRoute`): a caller without a valid key gets 401 whatever its body. The HTTPException
    raised from `receive` passes through FastAPI's body parsing (JSON or multipart) to the error handlers, so the
    answer has the common error shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None
