"""What the service can run: the samplers (fixed), and the models the live workers have loaded (from Redis).

A worker describes its model in a field of its own RQ worker hash (``rq:worker:{name}``), written right after RQ
registers it. That hash expires with the worker's heartbeats and leaves RQ's registry when the worker exits, so the
list of models follows the live workers with no key or TTL of its own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError
from redis import Redis
from rq import Queue, Worker, worker_registration

from core.loras import LoraList, available
from core.queues import Keys
from core.rules import SAMPLERS as SAMPLER_TABLE
from core.rules import Sampler

MODEL_FIELD = "sdq_model"


class SamplerInfo(BaseModel):
    name: Sampler = Field(description="The value of the `sampler` field.")
    display_name: str = Field(description="The name AUTOMATIC1111 shows (and writes into image metadata).")
    karras: bool = Field(description="Accepts `karras: true` (Karras sigma spacing).")
    eta: bool = Field(description="Accepts a non-zero `eta` (stochastic DDIM).")


class SamplerList(BaseModel):
    samplers: list[SamplerInfo]


SAMPLERS: list[SamplerInfo] = [
    SamplerInfo(name=s, display_name=traits.a1111_name, karras=traits.karras, eta=traits.eta)
    for s, traits in SAMPLER_TABLE.items()
]


class LoadedModel(BaseModel):
    """One worker's model, as it reports it at start."""

    name: str = Field(description="Checkpoint file or folder name without extension.")
    hash: str | None = Field(None, description="AUTOMATIC1111's short hash (first 10 hex digits of the SHA-256).")
    sha256: str | None = Field(None, description="SHA-256 of the file (or of a diffusers folder's weight manifest).")
    inpainting_unet: bool = Field(
        description="A 9-channel inpainting UNet (like sd-v1-5-inpainting); other models inpaint by latent blending."
    )
    device: str = Field(examples=["cuda:0"])
    dtype: str = Field(examples=["float16"])
    loras: list[str] = Field(default_factory=list, description="The LoRA names it can load (its SDQ_LORA_DIR).")
    tiny_vae: bool = Field(False, description="It holds a tiny VAE (SDQ_TINY_VAE) for `vae: tiny`.")
    refiner: str | None = Field(
        None, description="The SDXL refiner it holds beside the model (SDQ_REFINER_CHECKPOINT).")
    default_size: int = Field(
        512, description="Its native image side: txt2img jobs for it that give neither width nor height get "
        "default_size x default_size (SDXL 1024, SD 2.x v-prediction 768, else 512).",
    )


class ModelWorker(BaseModel):
    name: str = Field(description="The worker's name (host.pid.suffix).")
    device: str
    dtype: str


class ModelInfo(BaseModel):
    name: str
    hash: str | None = None
    sha256: str | None = None
    inpainting_unet: bool
    tiny_vae: bool = Field(False, description="A live worker of this model holds a tiny VAE: `vae: tiny` runs.")
    default_size: int = Field(512, description="The side of its txt2img images when a job gives no size.")
    refiners: list[str] = Field(default_factory=list, description="SDXL refiners its live workers hold.")
    workers: list[ModelWorker] = Field(description="Live workers with this model loaded.")
    queued: int = Field(0, description="Jobs waiting on this model's queues (jobs that name no model not counted).")


class ModelList(BaseModel):
    models: list[ModelInfo]


def publish_model(redis: Redis, worker_key: str, model: LoadedModel) -> None:
    """Record ``model`` in the RQ worker hash ``worker_key`` (call after RQ registered the worker)."""
    redis.hset(worker_key, MODEL_FIELD, model.model_dump_json())


def _live_models(redis: Redis, keys: Keys) -> list[tuple[str, LoadedModel]]:
    """(worker name, its model) of each live worker on sdqueue's queues that reports one."""
    worker_keys: set[str] = set()
    for name in keys.queues():
        worker_keys |= worker_registration.get_keys(Queue(name, connection=redis))
    ordered = sorted(worker_keys)
    pipe = redis.pipeline(transaction=False)
    for key in ordered:
        pipe.hget(key, MODEL_FIELD)
    out = []
    for key, raw in zip(ordered, pipe.execute(), strict=True):
        if raw is None:  # expired (a dead worker), or not an sdqueue worker
            continue
        try:
            loaded = LoadedModel.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            continue
        out.append((key.removeprefix(Worker.redis_worker_namespace_prefix), loaded))
    return out


def loaded_models(redis: Redis, keys: Keys) -> ModelList:
    """The models of the live workers on sdqueue's queues, one entry per distinct checkpoint."""
    models: dict[tuple[str, str | None], ModelInfo] = {}
    for worker, loaded in _live_models(redis, keys):
        entry = models.setdefault((loaded.name, loaded.sha256), ModelInfo(
            name=loaded.name, hash=loaded.hash, sha256=loaded.sha256, inpainting_unet=loaded.inpainting_unet,
            tiny_vae=False, workers=[], queued=0, default_size=loaded.default_size,
        ))
        entry.workers.append(ModelWorker(name=worker, device=loaded.device, dtype=loaded.dtype))
        entry.tiny_vae = entry.tiny_vae or loaded.tiny_vae
        if loaded.refiner and loaded.refiner not in entry.refiners:
            entry.refiners = sorted([*entry.refiners, loaded.refiner])
    listed = sorted(models.values(), key=lambda m: (m.name, m.sha256 or ""))
    pipe = redis.pipeline(transaction=False)
    for entry in listed:
        for name in keys.queues(entry.name):
            pipe.llen(Queue(name, connection=redis).key)
    lengths = iter(int(n) for n in pipe.execute()) if listed else iter(())
    for entry in listed:
        entry.queued = sum(next(lengths) for _ in keys.queues(entry.name))
    return ModelList(models=listed)


@dataclass(frozen=True)
class LiveModels:
    """The live workers' models as read once (``live_models``): what one submit checks its job against."""

    workers: list[tuple[str, LoadedModel]]

    def served(self) -> list[str]:
        """The names of the models the live workers hold, sorted."""
        return sorted({loaded.name for _, loaded in self.workers})

    def refiners_of(self, model: str | None) -> list[str]:
        """The refiners the live workers of ``model`` hold (of every live worker, for None), sorted."""
        return sorted({loaded.refiner for _, loaded in self.workers
                       if loaded.refiner and (model is None or loaded.name == model)})

    def default_size(self, model: str) -> int | None:
        """The native image side a live worker of ``model`` announces; None when no live worker holds it."""
        sides = [loaded.default_size for _, loaded in self.workers if loaded.name == model]
        return max(sides) if sides else None

    def tiny_vae(self) -> bool:
        """Whether a live worker holds a tiny VAE, so a `vae: tiny` job can run."""
        return any(loaded.tiny_vae for _, loaded in self.workers)

    def loras(self) -> LoraList:
        """The LoRA names the live workers announce, with the workers that can load each (``GET /v1/loras``)."""
        return available({worker: loaded.loras for worker, loaded in self.workers})


def live_models(redis: Redis, keys: Keys) -> LiveModels:
    """The live workers' models, read from Redis now."""
    return LiveModels(_live_models(redis, keys))


def served_models(redis: Redis, keys: Keys) -> list[str]:
    """The names of the models the live workers hold, sorted."""
    return live_models(redis, keys).served()


class ModelLoad(BaseModel):
    workers: int = Field(description="Live workers holding the model.")
    queued: int = Field(description="Jobs waiting on the model's queues (jobs that name no model not counted).")


def model_loads(redis: Redis, keys: Keys) -> dict[str, ModelLoad]:
    """Live workers and waiting jobs per model, by name: the models live workers hold, and those whose queues hold
    jobs that no live worker can run."""
    workers = Counter(loaded.name for _, loaded in _live_models(redis, keys))
    named = [(parsed[0], name) for name in keys.all_queues(redis)
             if (parsed := keys.parse(name)) is not None and parsed[0] is not None]
    pipe = redis.pipeline(transaction=False)
    for _, name in named:
        pipe.llen(Queue(name, connection=redis).key)
    queued: Counter[str] = Counter()
    for (model, _), n in zip(named, pipe.execute() if named else [], strict=True):
        queued[model] += int(n)
    names = sorted(set(workers) | {model for model, n in queued.items() if n})
    return {name: ModelLoad(workers=workers[name], queued=queued[name]) for name in names}


def mark_served(redis: Redis, keys: Keys, name: str, at: float, forget_after_s: float) -> None:
    """Record that a live worker holds ``name`` at ``at`` (unix seconds; workers call it every heartbeat), and drop
    the models nobody held for ``forget_after_s``."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.models_seen(), {name: at})
        pipe.zremrangebyscore(keys.models_seen(), "-inf", f"({at - forget_after_s}")
        pipe.execute()


def recently_served(redis: Redis, keys: Keys, now: float, within_s: float) -> list[str]:
    """The models some live worker held in the last ``within_s`` seconds before ``now``, sorted by name."""
    if within_s <= 0:
        return []
    names = redis.zrangebyscore(keys.models_seen(), now - within_s, "+inf")
    return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def live_loras(redis: Redis, keys: Keys) -> LoraList:
    """The LoRA names the live workers announce, with the workers that can load each (``GET /v1/loras``)."""
    return live_models(redis, keys).loras()
