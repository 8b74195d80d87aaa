"""Run-time statistics the workers record in Redis, and the ETA of a queued job computed from them. No torch here.

After every pipeline call a worker folds two samples into moving averages in the ``Keys.stats()`` hash:
``seconds_per_image`` (call wall time / images) and ``images_per_job``. A queued job's position
(``core.jobstore.queue_position``: jobs in higher-priority queues plus those ahead in its own) then gives its ETA.
The averages mix all sizes and step counts and batching makes the position pessimistic (a job ahead may share this
job's batch), so the ETA is a guide for a progress display, not a promise.
"""

from __future__ import annotations

from redis import Redis

from core.queues import Keys

# Weight of the newest sample in the moving averages: roughly the last ten pipeline calls count.
STATS_ALPHA = 0.2


def record_pipeline_call(
    redis: Redis, keys: Keys, seconds: float, images: int, jobs: int, model: str | None = None
) -> None:
    """Fold one pipeline call (``images`` images of ``jobs`` jobs in ``seconds``) into the moving averages of all
    workers and, given ``model``, of that model's workers (models differ in speed).

    Read-modify-write without a transaction: two workers updating at once lose one sample, harmless for an average.
    """
    if images <= 0 or jobs <= 0:
        return
    samples = {"seconds_per_image": seconds / images, "images_per_job": images / jobs}
    for key in dict.fromkeys([keys.stats(), keys.stats(model)]):
        previous = redis.hmget(key, list(samples))
        mapping: dict[str | bytes, float] = {}
        for (name, value), old in zip(samples.items(), previous, strict=True):
            mapping[name] = value if old is None else float(old) + STATS_ALPHA * (value - float(old))
        redis.hset(key, mapping=mapping)


def eta_seconds(
    redis: Redis, keys: Keys, position: int, n_images: int, workers: int, model: str | None = None
) -> float | None:
    """Seconds until a queued job of ``n_images`` images with ``position`` jobs ahead of it is done, shared among
    ``workers`` live workers (of ``model``, at that model's speed); None until such a worker has recorded a pipeline
    call."""
    seconds_per_image, images_per_job = redis.hmget(keys.stats(model), ["seconds_per_image", "images_per_job"])
    if seconds_per_image is None or images_per_job is None:
        return None
    images_ahead = position * float(images_per_job)
    return round((images_ahead / max(1, workers) + n_images) * float(seconds_per_image), 1)
