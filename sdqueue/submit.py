"""`sdqueue submit`: send a job to a running API, show its place in the queue and then its progress, write its
images. The generation options are `sdqueue generate`'s; left unset, the server's defaults apply.

Exit codes: 0 the images are written (or, with --no-wait, the job is queued); 1 the job failed or was canceled, or
the server could not be reached or could not take the job; 2 the API refused the request (its message says why);
130 interrupted (Ctrl-C), whether or not the job was canceled.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from core.imagefile import EXTENSIONS
from core.jobs import JobPublic, Priority, Status
from sdqueue.client import APIError, Client, JobFailedError, SdqueueError
from sdqueue.generate import add_generation_options, given_options, output_paths
from sdqueue.progress import StepBar

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_generation_options(p)
    p.add_argument("--server", default=None, help="the API's URL (default: $SDQ_SERVER, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key, when the server requires one (default: $SDQ_API_KEY)")
    p.add_argument("--priority", choices=[priority.value for priority in Priority], default=None,
                   help="default normal")
    p.add_argument("--model", default=None,
                   help="a model the server lists in GET /v1/models (default: the deployment's default model)")
    p.add_argument("--output-format", choices=sorted(EXTENSIONS), default=None, help="default png")
    p.add_argument("--no-wait", action="store_true", help="print the job's id once it is queued, and exit")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job without asking")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop waiting after this many seconds (exit 1; the job goes on)")


def run(args: argparse.Namespace) -> int:
    # Set explicitly, as `sdqueue dev` does: a process started in the background by a shell or a CI runner inherits
    # SIGINT ignored, and then Ctrl-C (or a supervisor's SIGINT) would never reach the questions below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.mask is not None and args.init_image is None:
        return _fail("--mask needs --init-image", EXIT_REFUSED)
    with Client(args.server, args.api_key) as client:
        try:
            job = _submit(client, args)
        except APIError as exc:
            return _fail(_describe(exc), EXIT_REFUSED if 400 <= exc.status_code < 500 else EXIT_FAILED)
        except (SdqueueError, OSError) as exc:
            return _fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            return _fail(f"interrupted while submitting; the job may be queued all the same ({client.server}/v1/jobs "
                         "lists your jobs)", EXIT_INTERRUPTED)
        if args.no_wait:
            sys.stdout.write(f"{job.id}\n")
            return 0
        try:
            job = _follow(client, job, args.timeout)
            files = _write(client, job, args.output)
        except KeyboardInterrupt:
            return _interrupted(client, job, args.cancel_on_interrupt)
        except JobFailedError as exc:
            return _fail(_describe_job(exc.job), EXIT_FAILED)
        except (SdqueueError, OSError) as exc:
            return _fail(str(exc), EXIT_FAILED)
    for path, seed in files:
        sys.stdout.write(f"{path}  seed={seed}\n")
    return 0


def _submit(client: Client, args: argparse.Namespace) -> JobPublic:
    options: dict[str, Any] = given_options(args)
    for name in ("priority", "model", "output_format", "strength"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.mask is not None:
        return client.inpaint(args.prompt, args.init_image, args.mask, **options)
    if args.init_image is not None:
        return client.img2img(args.prompt, args.init_image, **options)
    options.pop("strength", None)  # txt2img has none
    return client.txt2img(args.prompt, **options)


def _follow(client: Client, job: JobPublic, timeout: float | None) -> JobPublic:
    """Queue position while the job waits, a progress bar while it runs; the ended job."""
    bar: StepBar | None = None
    shown = job.queue_position
    _say(f"job {job.id} queued{_ahead(shown)}")
    try:
        for event in client.events(job, timeout=timeout):
            if event.terminal:
                return event.job() if "id" in event.data else client.get(job)
            if event.event == "queued":
                position = event.data.get("queue_position")
                if position is not None and position != shown:
                    shown = position
                    _say(f"job {job.id} queued{_ahead(position)}")
            elif event.event in ("running", "progress"):
                if bar is None:
                    bar = StepBar(job.params.steps)
                if event.event == "progress":
                    bar.update(int(event.data["step"]), int(event.data["total"]))
    finally:
        if bar is not None:
            bar.close()
    return client.get(job)


def _write(client: Client, job: JobPublic, output: str | None) -> list[tuple[Path, int]]:
    """Write a succeeded job's images (JobFailedError for one that failed or was canceled)."""
    data = client.image_bytes(job)
    default = Path(f"out.{EXTENSIONS[job.params.output_format]}")
    paths = output_paths(Path(output) if output else default, len(data))
    for path, content in zip(paths, data, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return [(path, record.seed) for path, record in zip(paths, job.images, strict=True)]


def _interrupted(client: Client, job: JobPublic, cancel: bool) -> int:
    if not cancel:
        cancel = _ask(f"\ncancel job {job.id}? [y/N] ")
    if not cancel:
        _say(f"job {job.id} goes on: {client.server}/v1/jobs/{job.id}")
        return EXIT_INTERRUPTED
    try:
        view = client.cancel(job)
    except SdqueueError as exc:
        return _fail(f"could not cancel job {job.id}: {exc}", EXIT_INTERRUPTED)
    state = "canceled" if view.status is Status.canceled else "stops after its current step"
    _say(f"job {job.id} {state}")
    return EXIT_INTERRUPTED


def _ask(question: str) -> bool:
    """Yes or no from the terminal; no when there is no terminal to ask (use --cancel-on-interrupt there)."""
    if not sys.stdin.isatty():
        _say("\nnot asking whether to cancel: no terminal (--cancel-on-interrupt cancels)")
        return False
    try:
        sys.stderr.write(question)
        sys.stderr.flush()
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except (KeyboardInterrupt, EOFError):
        return False


def _ahead(position: int | None) -> str:
    return "" if position is None else f": {position} job{'' if position == 1 else 's'} ahead"


def _describe(exc: APIError) -> str:
    field = f", field {exc.field}" if exc.field else ""
    return f"{exc.message} ({exc.status_code} {exc.type}{field})"


def _describe_job(job: JobPublic) -> str:
    if job.error is not None:
        return f"job {job.id} {job.status.value}: {job.error.message} ({job.error.type})"
    return f"job {job.id} {job.status.value}"


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _fail(message: str, code: int) -> int:
    _say(f"sdqueue submit: {message}")
    return code
