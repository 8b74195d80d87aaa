"""Clients as the drills' users run them: one that retries a submission with the same Idempotency-Key until it gets
an answer, and a burst of raw HTTP/1.1 requests on keep-alive connections (httpx would spend more CPU per request
than the API on a small machine)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

# Answers a client may get and retry after: limits, a full queue or Redis away (with Retry-After), and 409 while the
# key's first request is still being handled (or its API process died holding it).
DOCUMENTED = frozenset({"429", "503", "409"})
# ... and no answer at all, where the drill kills the API process.
RETRYABLE = DOCUMENTED | {"conn"}


@dataclass
class Submission:
    """One job a client wanted queued: every answer it got, and the job id once an answer gave one."""

    params: dict[str, Any]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    answers: list[str] = field(default_factory=list)  # "202", "503", "conn", ...
    job_id: str | None = None
    problems: list[str] = field(default_factory=list)  # answers outside the documented ones

    @property
    def retries(self) -> int:
        return max(0, len(self.answers) - 1)


def submit(http: httpx.Client, params: dict[str, Any], deadline_s: float = 120,
           allowed: frozenset[str] = DOCUMENTED) -> Submission:
    """POST /v1/txt2img with an Idempotency-Key, retried with the same key until an answer names the job."""
    sub = Submission(params)
    deadline = time.monotonic() + deadline_s
    refusals: dict[str, str] = {}  # the first and the last refusal's text, for a drill's report
    while time.monotonic() < deadline:
        try:
            r = http.post("/v1/txt2img", json=params, headers={"Idempotency-Key": sub.key})
        except httpx.TransportError as exc:
            sub.answers.append("conn")
            if "conn" not in allowed:
                sub.problems.append(f"no answer: {exc!r}")
            time.sleep(0.2)
            continue
        answer = str(r.status_code)
        sub.answers.append(answer)
        if r.status_code >= 400:
            refusals.setdefault("first", f"{answer} {r.text[:200]}")
            refusals["last"] = f"{answer} {r.text[:200]}"
        if r.status_code in (200, 202):
            sub.job_id = str(r.json()["id"])
            if r.headers.get("location") != f"/v1/jobs/{sub.job_id}":
                sub.problems.append(f"{answer} without the job's Location: {r.headers.get('location')!r}")
            return sub
        if answer not in allowed or (answer == "409" and _error_type(r) != "idempotency_conflict"):
            sub.problems.append(f"{answer}: {r.text[:300]}")
            return sub
        if r.status_code in (429, 503):
            retry_after = r.headers.get("retry-after")
            if retry_after is None:
                sub.problems.append(f"{answer} without Retry-After: {r.text[:300]}")
                return sub
            # Sooner than asked: a drill's outage is short, and the retries are what it counts.
            time.sleep(min(float(retry_after), 0.5))
        else:
            time.sleep(0.5)
    sub.problems.append(f"no job after {deadline_s:.0f} s; answers {Counter(sub.answers)}; refusals {refusals}")
    return sub


def _error_type(r: httpx.Response) -> str | None:
    try:
        return str(r.json()["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class RawAnswer:
    status: int  # 0: the connection failed
    headers: dict[str, str]
    body: bytes


async def _read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawAnswer(status, headers, body)


async def _burst(host: str, port: int, bodies: list[bytes], connections: int) -> list[RawAnswer]:
    answers: list[RawAnswer | None] = [None] * len(bodies)
    todo = iter(range(len(bodies)))

    async def one_connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for i in todo:
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"POST /v1/txt2img HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(bodies[i])}\r\n\r\n".encode() + bodies[i]
                )
                answer = await asyncio.wait_for(_read_answer(reader), 60)
                if answer.headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                answer = RawAnswer(0, {}, repr(exc).encode())
                if writer is not None:
                    writer.close()
                reader = writer = None
            answers[i] = answer
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return [a if a is not None else RawAnswer(0, {}, b"not sent") for a in answers]


def burst(url: str, params: list[dict[str, Any]], connections: int = 50) -> list[RawAnswer]:
    """POST every one of ``params`` to ``url``'s /v1/txt2img at once over ``connections`` keep-alive connections;
    the answers in the order of ``params``."""
    parsed = httpx.URL(url)
    bodies = [json.dumps(p).encode() for p in params]
    return asyncio.run(_burst(parsed.host, int(parsed.port or 80), bodies, connections))
