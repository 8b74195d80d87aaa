"""Warming a pipeline up for the shapes it will serve, and padding batches up to a warmed batch size.

A compiled network (``model/compile.py``) compiles, and on CUDA captures its graphs, the first time it sees a
shape; that first call takes seconds to minutes. ``warm_up`` pays for it before the worker takes jobs: one
generation of one denoising step plus the decode per (size, batch size), with classifier-free guidance on, as
almost every job has it (2 UNet rows per image).

``BatchPadding`` rounds a batch up to the nearest warmed batch size of its image size with copies of its first
request, so it reuses warmed graphs instead of compiling anew. The pipeline is batch-invariant (each image draws
from its own generator, nothing mixes rows), so the real requests get the pixels they get alone; the padding rows
never reach results, step callbacks, or previews, and once every real request is cancelled the batch stops.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core import rules
from model.requests import GenerationRequest, GenerationResult, StepCallback, StepEvent

if TYPE_CHECKING:
    from model.pipeline import Pipeline

log = logging.getLogger(__name__)

WARMUP_GUIDANCE = 7.5  # > 1: the UNet runs the unconditional rows too, as for real jobs


@dataclass(frozen=True)
class WarmedShape:
    width: int
    height: int
    batch: int  # images
    seconds: float


def batch_requests(
    width: int, height: int, images: int, like: GenerationRequest | None = None
) -> list[GenerationRequest]:
    """Requests of ``images`` images in total (at most ``rules.MAX_IMAGES`` each), all ``like`` but for ``n``;
    ``like`` None: one-step txt2img dummies of ``width`` x ``height``."""
    template = like or GenerationRequest(prompt="", width=width, height=height, steps=1,
                                         guidance_scale=WARMUP_GUIDANCE, sampler="euler")
    return [replace(template, n=min(rules.MAX_IMAGES, images - start)) for start in range(0, images, rules.MAX_IMAGES)]


def warm_up(pipe: Pipeline, shapes: Iterable[tuple[int, int, int]]) -> list[WarmedShape]:
    """Run each (width, height, images) once: one denoising step and the decode. A shape that fails (out of memory)
    is logged and skipped: it will run like any shape not warmed."""
    warmed = []
    for width, height, images in shapes:
        started = time.monotonic()
        try:
            pipe.generate(batch_requests(width, height, images))
        except Exception as exc:  # a worker that cannot warm a shape can still serve the others
            log.warning("warm-up of %dx%d, %d images failed, left cold: %s", width, height, images, exc)
            continue
        seconds = time.monotonic() - started
        log.info("warmed up %dx%d, %d images, in %.1f s", width, height, images, seconds)
        warmed.append(WarmedShape(width, height, images, seconds))
    return warmed


class BatchPadding:
    """Warmed batch sizes per image size (width, height); ``generate`` pads a batch up to the nearest one."""

    def __init__(self, sizes: Mapping[tuple[int, int], Sequence[int]]) -> None:
        self.sizes = {shape: sorted(set(batches)) for shape, batches in sizes.items()}

    def target(self, width: int, height: int, images: int) -> int:
        """The smallest warmed batch size >= ``images`` of this image size; ``images`` when there is none."""
        batches = self.sizes.get((width, height), [])
        index = bisect.bisect_left(batches, images)
        return batches[index] if index < len(batches) else images

    def generate(
        self, pipe: Pipeline, requests: Sequence[GenerationRequest], callback: StepCallback | None = None
    ) -> list[GenerationResult | None] | None:
        """``pipe.generate`` of ``requests`` padded up to a warmed batch size; None when no padding applies."""
        first = requests[0]
        images = sum(r.n for r in requests)
        extra = self.target(first.width, first.height, images) - images
        if extra <= 0:
            return None
        real = len(requests)
        padded = [*requests, *batch_requests(first.width, first.height, extra, like=first)]
        log.debug("batch of %d images padded with %d", images, extra)
        results = pipe.generate(padded, _real_rows_only(padded, real, callback))
        return results[:real]


def _real_rows_only(requests: Sequence[GenerationRequest], real: int, user: StepCallback | None) -> StepCallback:
    """The step callback of a padded batch: ``user`` sees only the first ``real`` requests and their latent rows;
    when none of them is left, every request is cancelled, which stops the batch."""

    def on_step(event: StepEvent) -> Iterable[int] | None:
        active = [k for k in event.active if k < real]
        cancelled = set()
        if user is not None:
            rows = sum(requests[k].n for k in active)  # padding comes last, so the real rows come first
            cancelled = set(user(replace(event, active=active, latents=event.latents[:rows])) or ())
        if not set(active) - cancelled:
            return list(event.active)
        return cancelled

    return on_step
