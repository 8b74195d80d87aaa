"""Which model a job runs on: the rule the API applies at submit (a deployment may serve several models).

Workers announce the model they hold (``core.catalog``); each model has its own queues, and jobs that name no model
wait on the queues every worker serves (``core.queues.Keys``). A submitted job's model is:

1. the one it names (``model``), else the deployment's default (``SDQ_DEFAULT_MODEL``), if set. A model no live
   worker holds is refused, unless it is the configured default (its workers may still be starting) or a live
   worker held it in the last ``SDQ_MODEL_SEEN_TTL_S`` (its workers restart, roll out, or an autoscaler took them
   to zero and waits for a queued job to bring them back): such jobs wait for a worker, as any job does;
2. else, when the live workers hold exactly one model, that one;
3. else, with no live worker at all (the API started first), none: the job waits on the shared queues and the first
   worker to come up runs it;
4. with several models served, no default and no ``model``, the job is refused: which model would be a guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis

from core.catalog import LiveModels, live_models, recently_served
from core.queues import Keys


class ModelRefused(ValueError):
    """The job cannot be routed; the message says why and lists the models served."""


def _listing(served: list[str]) -> str:
    return ", ".join(served) if served else "none yet (no live worker)"


def choose_model(served: list[str], requested: str | None, default: str | None,
                 recent: Callable[[], list[str]] = list) -> str | None:
    """The model a job runs on (None: any worker's), by the rule above; ModelRefused when none can be chosen.
    ``recent()``: the models a live worker held lately, asked only for a name no live worker holds."""
    wanted = requested or default
    if wanted is not None:
        if wanted in served or wanted == default:
            return wanted
        waiting = [name for name in recent() if name not in served]
        if wanted in waiting:
            return wanted
        also = f"; with no live worker now, jobs still wait for: {', '.join(waiting)}" if waiting else ""
        raise ModelRefused(f"model {wanted!r} is not served; the live workers hold: {_listing(served)}{also}")
    if len(served) == 1:
        return served[0]
    if not served:
        return None
    raise ModelRefused(f"model is required: this deployment serves several models ({_listing(served)}) and sets "
                       "no default (SDQ_DEFAULT_MODEL)")


def route(redis: Redis, keys: Keys, requested: str | None, default: str | None, seen_ttl_s: float,
          live: LiveModels | None = None) -> str | None:
    """``choose_model`` against the models the live workers announce (``live``, else read now), and those seen
    within ``seen_ttl_s``."""
    served = (live or live_models(redis, keys)).served()
    return choose_model(served, requested, default,
                        lambda: recently_served(redis, keys, time.time(), seen_ttl_s))
