"""What a drill's clients were told, and the end state checked against it: from Redis, from the API, from the image
files and from the webhook receiver.

The end state every drill asks for, whatever it broke:
- every answer was one the API documents (202, or 503/429 with Retry-After; no other 5xx), and every job a client
  was given ended: succeeded exactly once (one successful RQ result), or failed when the drill expects that job to
  fail for its own reason;
- a succeeded job has exactly ``n`` image files in storage, the ones the API lists;
- its event log holds exactly one terminal event, the job's outcome, and the receiver got its signed ``completed``
  webhook (at least once, never with another outcome);
- no job exists in Redis that no client holds (a retried submission made one job, not two);
- no process died that the drill did not kill, and every live worker is registered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from rq.job import Job
from rq.results import Result

from tests.chaos.clients import Submission
from tests.chaos.cluster import SECRET, Cluster, Proc, wait_until
from tests.webhook_receiver import verified_json

log = logging.getLogger(__name__)

RQ_TERMINAL = {b"finished", b"failed", b"canceled", b"stopped"}
TERMINAL_EVENTS = {"succeeded", "failed", "canceled"}
OWNER_INDEX = "sdq:owner:-:jobs"  # jobs submitted with auth off


@dataclass
class Figure:
    """One drill's line for the benchmark report."""

    drill: str
    jobs: int
    outcomes: Counter[str]
    drain_s: float  # the longest time from a fault to the last of the jobs ending
    job_retries: int  # RQ retries spent (re-runs after a worker died)
    client_retries: int  # submissions sent again (same Idempotency-Key)
    faults: int
    seconds: float  # the whole drill
    note: str = ""

    def line(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.drill}: {self.jobs} jobs ({outcomes}), {self.faults} faults, drained {self.drain_s:.1f} s "
                f"after a fault, {self.job_retries} job retries, {self.client_retries} client retries, "
                f"{self.seconds:.0f} s in all" + (f"; {self.note}" if self.note else ""))


@dataclass
class Ledger:
    cluster: Cluster
    drill: str
    submissions: list[Submission] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # job id -> its outcome when not "succeeded"
    faults: int = 0
    drains: list[float] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)
    _fault_at: float | None = None
    _known: set[str] = field(default_factory=set)
    _first: int = 0
    _procs: list[Proc] = field(default_factory=list)  # those running when the drill began, then those it started

    _seen: int = 0  # webhook requests looked at so far
    _completed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # verified bodies by job id
    _bad_webhooks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._seen = len(self.cluster.receiver.received)  # earlier drills' deliveries are theirs
        self._known = {m.decode() for m in self.cluster.redis.zrange(OWNER_INDEX, 0, -1)}
        self._first = len(self.cluster.procs)
        self._procs = [p for p in self.cluster.procs if p.alive()]

    def logs(self) -> str:
        """The logs of the processes that ran during the drill."""
        return self.cluster.logs(procs=self._procs + self.cluster.procs[self._first:])

    def add(self, *subs: Submission) -> None:
        self.submissions.extend(subs)

    def new_jobs(self) -> int:
        """Jobs the API created since the drill began."""
        return int(self.cluster.redis.zcard(OWNER_INDEX)) - len(self._known)

    def job_ids(self) -> list[str]:
        return [s.job_id for s in self.submissions if s.job_id is not None]

    def fault(self) -> None:
        """A fault happens now: the next drain is timed from here."""
        self.faults += 1
        self._fault_at = time.monotonic()

    def wait_ended(self, job_ids: list[str] | None = None, timeout: float = 120, record: bool = True) -> float:
        """Wait until each job (default: all so far) has ended in Redis; returns (and with ``record`` keeps as a
        drain time) the seconds since the last fault."""
        ids = self.job_ids() if job_ids is None else job_ids
        redis = self.cluster.redis

        def ended() -> bool:
            self._collect_webhooks()
            pipe = redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            return all(s in RQ_TERMINAL for s in pipe.execute())

        try:
            wait_until(ended, timeout, f"{len(ids)} jobs of {self.drill} to end", every=0.05)
        except AssertionError:
            raise AssertionError(f"{self.drill}: jobs still not ended after {timeout:.0f} s: "
                                 f"{self._statuses(ids)}\n{self.logs()}") from None
        start = self._fault_at if self._fault_at is not None else self.began
        drain = time.monotonic() - start
        if record:
            self.drains.append(drain)
        return drain

    def _statuses(self, ids: list[str]) -> dict[str, str]:
        out = {}
        for job_id in ids:
            status = self.cluster.redis.hget(f"rq:job:{job_id}", "status")
            if status not in RQ_TERMINAL:
                out[job_id] = status.decode() if status else "missing"
        return out

    # the end state ---------------------------------------------------------------------------------------------
    def check(self, note: str = "", webhook_timeout: float = 60) -> Figure:
        """Every check of the module docstring; raises AssertionError naming each violation."""
        problems: list[str] = []
        for sub in self.submissions:
            problems += [f"submission {sub.key}: {p}" for p in sub.problems]
            if sub.job_id is None and not sub.problems:
                problems.append(f"submission {sub.key}: no job")
        ids = self.job_ids()
        if len(set(ids)) != len(ids):
            problems.append(f"one job id answered for two submissions: {Counter(ids).most_common(3)}")
        if ids:
            self.wait_ended(ids, record=False)
        outcomes: Counter[str] = Counter()
        retries = 0
        http = httpx.Client(base_url=self.cluster.url, timeout=10)
        try:
            views = {job_id: self._api_view(http, job_id, problems) for job_id in ids}
            self._wait_webhooks(ids, views, webhook_timeout)
            for job_id in ids:
                view = views[job_id]
                status = str(view.get("status", "missing"))
                outcomes[status] += 1
                retries += self._check_job(http, job_id, view, problems)
        finally:
            http.close()
        problems += self._bad_webhooks
        problems += self._check_orphans(set(ids))
        problems += self._check_processes()
        if problems:
            shown = "\n  ".join(problems[:25])
            raise AssertionError(f"{self.drill}: {len(problems)} problems:\n  {shown}\n{self.logs()}")
        return Figure(
            drill=self.drill,
            jobs=len(ids),
            outcomes=outcomes,
            drain_s=max(self.drains, default=0.0),
            job_retries=retries,
            client_retries=sum(s.retries for s in self.submissions),
            faults=self.faults,
            seconds=time.monotonic() - self.began,
            note="; ".join(n for n in (note, self._answers()) if n),
        )

    def _answers(self) -> str:
        """The answers the clients got, where a drill's clients retried."""
        answers = Counter(a for s in self.submissions for a in s.answers)
        if not answers or set(answers) <= {"202"}:
            return ""
        return "answers " + ", ".join(f"{k} x{v}" for k, v in sorted(answers.items()))

    def _api_view(self, http: httpx.Client, job_id: str, problems: list[str]) -> dict[str, Any]:
        r = http.get(f"/v1/jobs/{job_id}")
        if r.status_code != 200:
            problems.append(f"job {job_id}: GET /v1/jobs answers {r.status_code} {r.text[:200]}")
            return {}
        return dict(r.json())

    def _collect_webhooks(self) -> None:
        """Verify the deliveries that arrived since the last look, while their timestamps are fresh (a receiver
        refuses one older than 5 minutes), and keep the ``completed`` ones by job id."""
        received = self.cluster.receiver.received
        while self._seen < len(received):
            request = received[self._seen]
            self._seen += 1
            try:
                body = verified_json(SECRET, request)
            except Exception as exc:
                self._bad_webhooks.append(f"a webhook fails verification ({exc!r}): {request.body[:200]!r}")
                continue
            if body.get("status") in TERMINAL_EVENTS:
                self._completed.setdefault(str(body["id"]), []).append(body)

    def _completed_webhooks(self) -> dict[str, list[dict[str, Any]]]:
        self._collect_webhooks()
        return self._completed

    def _wait_webhooks(self, ids: list[str], views: dict[str, dict[str, Any]], timeout: float) -> None:
        wanted = [j for j in ids if views[j].get("params", {}).get("webhook")]
        with contextlib.suppress(AssertionError):  # each missing one is reported by _check_job
            wait_until(lambda: all(j in self._completed_webhooks() for j in wanted), timeout,
                       "the completed webhooks", every=0.2)

    def _check_job(self, http: httpx.Client, job_id: str, view: dict[str, Any], problems: list[str]) -> int:
        """Appends this job's violations; returns the RQ retries it spent."""
        if not view:
            return 0
        want = self.expected.get(job_id, "succeeded")
        status = view["status"]
        where = f"job {job_id}"
        if status != want:
            problems.append(f"{where}: {status} (error {view.get('error')}), expected {want}")
        job = Job.fetch(job_id, connection=self.cluster.redis)
        results = [r.type for r in job.results()]
        successes = results.count(Result.Type.SUCCESSFUL)
        if successes != (1 if status == "succeeded" else 0):
            problems.append(f"{where}: {successes} successful results in Redis ({status}; results {results})")
        n = int(view["params"]["n"])
        if status == "succeeded":
            keys = [img["key"] for img in view["images"]]
            files = sorted(p.name for p in (self.cluster.data_dir / "images" / job_id).glob("*")
                           if not p.name.startswith("."))
            if len(keys) != n or sorted(k.split("/", 1)[1] for k in keys) != files or len(files) != n:
                problems.append(f"{where}: {n} images asked, API lists {keys}, storage holds {files}")
            elif http.head(f"/v1/images/{keys[-1]}").status_code != 200:
                problems.append(f"{where}: the API does not serve {keys[-1]}")
        events = [json.loads(fields[b"message"])["event"]
                  for _, fields in self.cluster.redis.xrange(f"sdq:event-log:{job_id}")]
        terminal = [e for e in events if e in TERMINAL_EVENTS]
        if terminal != [status]:
            problems.append(f"{where}: {status}, terminal events in its log {terminal} (all: {events[-6:]})")
        if view["params"].get("webhook"):
            bodies = self._completed_webhooks().get(job_id, [])
            if not bodies:
                problems.append(f"{where}: {status}, no completed webhook")
            elif {b["status"] for b in bodies} != {status}:
                problems.append(f"{where}: {status}, completed webhooks say {[b['status'] for b in bodies]}")
        if job.retries_left is None:
            return 0
        return self.cluster.config.job_retries - int(job.retries_left)

    def _check_orphans(self, ids: set[str]) -> list[str]:
        """Jobs created during the drill that exist in Redis and that no client was given."""
        redis = self.cluster.redis
        new = {m.decode() for m in redis.zrange(OWNER_INDEX, 0, -1)} - self._known - ids
        orphans = sorted(j for j in new if redis.exists(f"rq:job:{j}"))
        return [f"job {j} exists but no client was given it (status {redis.hget(f'rq:job:{j}', 'status')!r})"
                for j in orphans]

    def _check_processes(self) -> list[str]:
        problems = [f"{p.role} {p.pid} died (exit {p.popen.returncode}), the drill did not kill it:\n{p.tail(1500)}"
                    for p in self.cluster.unexpected_deaths()]
        if self.cluster.api() is None:
            problems.append("no API process serves the cluster's port")
        if not self.cluster.live("webhooks"):
            problems.append("no webhook sender runs")
        workers = self.cluster.live("worker")
        if len(workers) < self.cluster.config.workers:
            problems.append(f"{len(workers)} live workers, the drill needs {self.cluster.config.workers}")
        try:
            self.cluster.wait_all_registered(timeout=20)
        except AssertionError as exc:
            problems.append(f"a live worker is not registered: {exc}")
        return problems
