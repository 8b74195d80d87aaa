"""What the service can run: the checkpoints loaded by live workers, and the samplers."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import KeysDep, RedisDep
from core.catalog import SAMPLERS, ModelList, SamplerList, live_loras, loaded_models
from core.loras import LoraList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(redis: RedisDep, keys: KeysDep) -> ModelList:
    """The models the live workers have loaded (name, AUTOMATIC1111 hash, inpainting UNet or not) and which workers
    run each one on which device. Empty while no worker is up."""
    return loaded_models(redis, keys)


@router.get("/loras")
def list_loras(redis: RedisDep, keys: KeysDep) -> LoraList:
    """The LoRA names the live workers can load (each worker's SDQ_LORA_DIR, read when it started), for `loras` and
    `<lora:name:weight>` prompt tags. Empty while no worker is up."""
    return live_loras(redis, keys)


@router.get("/samplers")
async def list_samplers() -> SamplerList:
    """The values `sampler` accepts, with AUTOMATIC1111's names and the options each one takes."""
    return SamplerList(samplers=SAMPLERS)
