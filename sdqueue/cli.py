"""The `sdqueue` command: `api`, `worker`, `webhooks`, `dev`, `generate`, `submit`, `info`, `cleanup` and `apikey`
sub-commands sharing one validated `Settings`, and `--version`.

Each sub-command imports what it needs when it runs, so `sdqueue api` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from core import logs
from core.settings import Settings, SettingsError, load_settings, unknown_variables
from core.version import __version__

log = logging.getLogger("sdqueue")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdqueue",
        description="Self-hosted Stable Diffusion 1.x service. Configuration comes from SDQ_* environment variables "
        "(or a .env file); see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all; default %(default)s)")
    api.add_argument("--port", type=int, default=8000, help="default %(default)s")
    api.add_argument("--workers", type=int, default=1, help="API processes (they share nothing but Redis)")
    api.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts them)")

    sub.add_parser("worker", help="run a GPU/CPU worker: loads SDQ_CHECKPOINT once and takes jobs from Redis")
    sub.add_parser("webhooks", help="send queued webhooks (signed, retried); no GPU needed")

    dev = sub.add_parser("dev", help="everything on this machine: Redis, the API and one worker (what `make run` runs)")
    dev.add_argument("--port", type=int, default=8000, help="API port on 127.0.0.1 (default %(default)s)")

    from sdqueue import apikey, maintenance
    from sdqueue import info as info_cmd

    info_cmd.configure_parser(sub.add_parser("info", help="print the generation parameters stored in an image file"))
    maintenance.configure_parser(
        sub.add_parser("cleanup", help="delete result images older than SDQ_RESULT_RETENTION_S")
    )
    apikey.configure_parser(sub.add_parser("apikey", help="create API keys; list and revoke those stored in Redis"))

    generate = sub.add_parser("generate", help="generate images locally, without a server")
    submit_parser = sub.add_parser("submit", help="send a job to a running API, follow it, write its images")
    # Configured only when chosen: the generator's options come from a module that is cheap to skip otherwise.
    if argv[:1] == ["generate"]:
        from sdqueue import generate as generate_cmd

        generate_cmd.configure_parser(generate)
    if argv[:1] == ["submit"]:
        from sdqueue import submit as submit_cmd

        submit_cmd.configure_parser(submit_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"sdqueue: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        log.warning("%s", warning)
    if args.command == "api":
        return run_api(settings, args)
    if args.command == "worker":
        from worker.main import main as worker_main

        return worker_main(settings)
    if args.command == "webhooks":
        from sdqueue.webhooks import run as run_webhooks

        return run_webhooks(settings)
    if args.command == "info":
        from sdqueue import info as info_cmd

        return info_cmd.run(args)
    if args.command == "apikey":
        from sdqueue import apikey

        return apikey.run(args, settings)
    if args.command == "cleanup":
        from sdqueue import maintenance

        return maintenance.run(args, settings)
    if args.command == "submit":
        from sdqueue import submit as submit_cmd

        return submit_cmd.run(args)
    if args.command == "dev":
        from sdqueue.dev import run_dev

        return run_dev(settings, port=args.port)
    from sdqueue import generate as generate_cmd

    return generate_cmd.run(args)


def run_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn
    from redis.exceptions import RedisError

    from api.durability import DurabilityUnavailable, probe
    from api.main import create_app
    from core.queues import connect

    if settings.durable_submit:  # refuse now, in one line, rather than from inside uvicorn's start-up
        try:
            probe(connect(settings.redis_url, socket_timeout=settings.redis_timeout_s))
        except DurabilityUnavailable as exc:
            log.error("%s", exc)
            return 2
        except RedisError:
            pass  # asked again before the first enqueue

    several = args.workers > 1
    # Several processes need an import string; each then builds its app from the same environment.
    uvicorn.run(
        "api.main:create_app" if several else create_app(settings),
        factory=several,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        log_config=logs.dict_config(settings.log_level, settings.log_format),  # applied again in each process
        access_log=args.access_log,
    )
    return 0
