"""A job's events, appended to a short Redis Stream per job (its event log).

A stream, not pub/sub: pub/sub drops every message nobody listens to at that instant, so a client that connects late
or reconnects would miss the end of its job. The stream keeps the last ones with Redis ids, which are the SSE event
ids: a client that reconnects with `Last-Event-ID` reads on from exactly there (`XREAD`), and `Prefer: wait` blocks
on it too.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from redis.client import Pipeline

from core.queues import Keys

# Progress is throttled to about 4 messages a second, so 100 entries (Redis trims lazily, ~ means "at least") hold
# the last half minute of a run and its end; a reader that falls further behind skips progress, never the end.
EVENT_LOG_MAXLEN = 100
# Counted from the latest event. Later, readers learn the outcome from the job itself (see api/routes/events.py).
EVENT_LOG_TTL_S = 3600
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})
# The longest one blocking read of a log (XREAD BLOCK) waits; readers loop. Clients reading logs must have a socket
# timeout above it (redis-py's default is 5 s).
READ_BLOCK_S = 5.0


def message(event: str, job_id: str, data: dict[str, Any] | None = None) -> str:
    """The wire format: ``{"event": ..., "job_id": ..., "data": {...}}``."""
    return json.dumps({"event": event, "job_id": job_id, "data": data or {}})


def record(conn: Redis | Pipeline, keys: Keys, job_id: str, text: str) -> None:
    """Append ``text`` (a `message`) to the job's event log; pass a pipeline to make it one trip."""
    log_key = keys.event_log(job_id)
    conn.xadd(log_key, {"message": text}, maxlen=EVENT_LOG_MAXLEN, approximate=True)
    conn.expire(log_key, EVENT_LOG_TTL_S)
