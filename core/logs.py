"""Where every process's logging is configured: plain lines (the default) or one JSON object per line
(`SDQ_LOG_FORMAT=json`), each carrying the request id and job id of the work it belongs to, where known.

`dict_config()` is the one configuration; `configure()` applies it in a process, and `sdqueue api` hands the same
dict to uvicorn, which applies it again in each of its worker processes. Code that knows which request or job it
serves sets `request_id` / `job_id` (the API's request id middleware does, for each request); a record may also
name its job itself with `extra={"job_id": ...}`.
"""

from __future__ import annotations

import json
import logging
import logging.config
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal

LogFormat = Literal["plain", "json"]
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("sdq_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("sdq_job_id", default=None)
job_ids: ContextVar[list[str] | None] = ContextVar("sdq_job_ids", default=None)  # the jobs of a worker's batch
_CONTEXT: dict[str, ContextVar[str | None] | ContextVar[list[str] | None]] = {
    "request_id": request_id, "job_id": job_id, "job_ids": job_ids,
}
# LogRecord attributes that are not `extra=` fields, so that the JSON lines carry only what code added on purpose
# (and not uvicorn's `color_message`, its message with terminal colour codes).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                   "color_message"}


@contextmanager
def jobs(ids: Sequence[str]) -> Iterator[None]:
    """Lines logged inside name these jobs: ``job_id`` for one job, ``job_ids`` (the list) for a batch of several."""
    one = job_id.set(ids[0] if len(ids) == 1 else None)
    many = job_ids.set(list(ids) if len(ids) > 1 else None)
    try:
        yield
    finally:
        job_id.reset(one)
        job_ids.reset(many)


class ContextFilter(logging.Filter):
    """Copies the bound request id and job id(s) onto each record (a record's own `extra=` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then request_id, job_id, any other
    `extra=` fields, and the traceback as `exc_info` text; keys without a value are left out."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value is not None:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def dict_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """The logging configuration (`logging.config.dictConfig` form) of every sdqueue process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"plain": {"format": PLAIN_FORMAT}, "json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": log_format, "filters": ["context"]}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "httpx": {"level": "WARNING"},  # one line per HTTP call (dev's readiness probe, the client) is noise
            # uvicorn's loggers go through the root handler, so that its lines have the same format.
            **{name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
        },
    }


def configure(level: str, log_format: LogFormat) -> None:
    logging.config.dictConfig(dict_config(level, log_format))

