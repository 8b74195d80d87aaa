"""The /metrics listener of a process that has no HTTP server of its own: the worker and the webhook sender.

A port the operator set must be free: a taken one stops the process with one line that names the setting. The
default port is only where the search starts: when it is taken (a second worker on the host, a `make run` already
up), the next free port above it is used, and the log says which, so several processes on one host need no
configuration.
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

PORTS_TRIED = 100  # from the default port upward, when the operator did not choose one


class MetricsPortError(Exception):
    """The metrics listener cannot start where it was told; the message names the setting to change."""


def serve_metrics(registry: CollectorRegistry, *, what: str, host: str, port: int, setting: str, chosen: bool) -> int:
    """Serve `registry` at http://host:port/metrics from a daemon thread; returns the port, 0 when off (port 0).

    `chosen`: the operator set `setting` (then exactly that port, else the first free one from it upward)."""
    if port == 0:
        return 0
    last = port if chosen else min(port + PORTS_TRIED - 1, 65535)
    for candidate in range(port, last + 1):
        try:
            start_http_server(candidate, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            reason = exc.strerror or str(exc)
            raise MetricsPortError(
                f"cannot serve {what} metrics on {host}:{candidate} ({reason}); check SDQ_METRICS_HOST and {setting}"
            ) from None
        if candidate != port:
            log.warning("port %d is in use, so %s metrics use port %d (set %s to choose one)",
                        port, what, candidate, setting)
        log.info("%s metrics on http://%s:%d/metrics", what, host, candidate)
        return candidate
    if chosen:
        raise MetricsPortError(
            f"{setting}={port}: port {port} on {host} is already in use; set a free port, or 0 to turn {what} "
            "metrics off"
        )
    raise MetricsPortError(
        f"ports {port} to {last} on {host} are all in use; set {setting} to a free port, or 0 to turn {what} "
        "metrics off"
    )
