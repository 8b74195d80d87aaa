"""The worker's description of its resident model, published for ``GET /v1/models`` (see ``core.catalog``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from core.catalog import LoadedModel
from core.loras import directory_names
from worker.modelhash import SHORT, sha256_of

if TYPE_CHECKING:
    from model.pipeline import Pipeline

log = logging.getLogger(__name__)


def describe_model(pipe: Pipeline, checkpoint: Path | None) -> LoadedModel:
    """Name, hashes, inpainting UNet or not, device and UNet dtype of ``pipe`` (hashing reads the checkpoint once;
    a ``.sha256`` file next to it spares that)."""
    sha256 = None
    if checkpoint is not None:
        try:
            sha256 = sha256_of(checkpoint)
        except OSError as exc:
            log.warning("cannot hash %s for GET /v1/models: %s", checkpoint, exc)
    return LoadedModel(
        name=pipe.name,
        hash=sha256[:SHORT] if sha256 else None,
        sha256=sha256,
        inpainting_unet=pipe.is_inpaint,
        device=str(pipe.device),
        dtype=str(pipe.precision.unet).removeprefix("torch."),
        loras=directory_names(pipe.loras.directory),
        tiny_vae=pipe.tiny_vae is not None,
        default_size=pipe.default_size,
        refiner=pipe.refiner.name if pipe.refiner is not None else None,
    )
