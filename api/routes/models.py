"""What the service can run: the checkpoints loaded by live workers, and the samplers."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import KeysDep, RedisDep
from core.catalog import SAMPLERS, ModelList, SamplerList, loaded_models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(redis: RedisDep, keys: KeysDep) -> ModelList:
    """The models the live workers have loaded (name, AUTOMATIC1111 hash, inpainting UNet or not) and which workers
    run each one on which device. Empty while no worker is up."""
    return loaded_models(redis, keys)


@router.get("/samplers")
async def list_samplers() -> SamplerList:
    """The values `sampler` accepts, with AUTOMATIC1111's names and the options each one takes."""
    return SamplerList(samplers=SAMPLERS)
