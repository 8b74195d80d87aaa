"""What the pipeline takes and gives back: plain dataclasses, no torch in the signatures but latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    import torch

Task = Literal["txt2img", "img2img", "inpaint"]


@dataclass
class GenerationRequest:
    """One user request: ``n`` images of one prompt. Image ``i`` uses seed ``seed + i``."""

    prompt: str
    negative_prompt: str = ""
    task: Task = "txt2img"
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler_a"
    karras: bool = False
    eta: float = 0.0
    seed: int = 0
    n: int = 1
    strength: float = 0.75  # img2img / inpaint only: fraction of the schedule that is re-run
    init_image: Image.Image | None = None  # img2img / inpaint source, RGB, width x height
    mask: Image.Image | None = None  # inpaint: white = repaint, black = keep; width x height

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one batch (see ``Pipeline.generate``)."""
        return (self.task, self.width, self.height, self.steps, self.sampler, self.karras, self.start_step())

    def start_step(self) -> int:
        """Index of the first denoising step that runs (0 for txt2img), as diffusers computes it."""
        if self.task == "txt2img":
            return 0
        init_timestep = min(int(self.steps * self.strength), self.steps)
        return max(self.steps - init_timestep, 0)


@dataclass
class GenerationResult:
    """The images of one request, in seed order, and what the prompt encoder had to cut."""

    images: list[Image.Image]
    seeds: list[int]
    prompt_truncated: bool = False
    negative_prompt_truncated: bool = False


@dataclass
class StepEvent:
    """Reported after every denoising step of a batch."""

    step: int  # 1-based count of steps done
    total: int  # steps this batch runs
    active: list[int]  # indices (into the requests list) still running
    latents: torch.Tensor = field(repr=False)  # [sum of active n, 4, h, w], rows grouped by request


# Returns the request indices to cancel now (they are dropped from the batch, their result is None).
StepCallback = Callable[[StepEvent], Iterable[int] | None]
