"""`sdqueue apikey`: make API keys, and manage the ones kept in Redis.

`create NAME` prints a new random key (once: only its SHA-256 is kept anywhere) and the `SDQ_API_KEYS` entry for
it; with `--store` it also goes into the Redis hash the API reads on each request, so it works without a restart
(that needs SDQ_AUTH=on, or at least one key in SDQ_API_KEYS). `list` and `revoke NAME` act on the Redis hash.
"""

from __future__ import annotations

import argparse

from core import apikeys
from core.jobs import Priority
from core.queues import Keys, connect
from core.settings import Settings


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="apikey_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="make a key; print it and its SDQ_API_KEYS entry")
    create.add_argument("name", help="owner of the jobs the key submits (letters, digits, '_', '.', '-')")
    create.add_argument("--max-priority", choices=[p.value for p in Priority],
                        default=apikeys.DEFAULT_MAX_PRIORITY.value,
                        help="highest job priority the key may ask for (default %(default)s)")
    create.add_argument("--store", action="store_true", help="also add it to Redis (replaces a key of that name)")
    sub.add_parser("list", help="keys stored in Redis (names and priorities; keys themselves are never stored)")
    revoke = sub.add_parser("revoke", help="remove a key from Redis; it stops working at once")
    revoke.add_argument("name")


def run(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys(settings.queue_prefix)
    if args.apikey_command == "create":
        key = apikeys.generate()
        try:
            entry = apikeys.parse_entry(f"{args.name}:{apikeys.digest(key)}:{args.max_priority}")
        except ValueError as exc:
            print(f"sdqueue apikey: {exc}")
            return 2
        print(f"key:   {key}")
        print(f"entry: {entry.entry()}")
        if args.store:
            apikeys.store(connect(settings.redis_url), keys, entry)
            print(f"stored in Redis ({keys.api_keys()}); it works now if SDQ_AUTH=on or SDQ_API_KEYS lists a key")
        else:
            print("add the entry to SDQ_API_KEYS (comma-separated) and restart the API; give the key to its user")
        return 0
    redis = connect(settings.redis_url)
    if args.apikey_command == "list":
        for stored in apikeys.stored(redis, keys):
            print(f"{stored.name}\tmax priority {stored.max_priority.value}")
        return 0
    if apikeys.revoke(redis, keys, args.name):
        print(f"revoked {args.name!r}")
        return 0
    print(f"sdqueue apikey: no key named {args.name!r} in Redis ({keys.api_keys()}); keys in SDQ_API_KEYS are "
          "revoked by removing their entry there")
    return 1
