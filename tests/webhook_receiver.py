"""A webhook receiver for tests: an HTTP server on a free loopback port that records every request and answers with
the status codes it was given, in order (the last one repeats). `verified_json` checks a request's signature the way
a receiver would, with the Standard Webhooks reference library, independently of `core.webhooks`."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


def verified_json(secret: str, request: Received) -> Any:
    """The request's JSON body, once `standardwebhooks` has verified its headers and signature against ``secret``
    (a ``whsec_...`` secret) and its timestamp against this clock; raises its WebhookVerificationError otherwise."""
    return Webhook(secret).verify(request.body, request.headers)


class WebhookReceiver:
    def __init__(
        self, statuses: tuple[int, ...] = (204,), retry_after: str | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.statuses = list(statuses)
        self.retry_after = retry_after
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                if receiver.retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # quiet: the test reads `received`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        """The first `count` requests, once they have arrived."""
        return self.wait_until(lambda got: len(got) >= count, timeout, f"{count} webhook requests")[:count]

    def wait_until(self, done: Callable[[list[Received]], bool], timeout: float, what: str) -> list[Received]:
        """All requests so far, once `done` says they are enough."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self.received)
            if done(got):
                return got
            assert time.monotonic() < deadline, f"no {what} after {timeout} s; got {len(got)} requests"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
