"""What the pipeline takes and gives back: plain dataclasses, no torch in the signatures but latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image

from core import rules

if TYPE_CHECKING:
    import torch

Task = Literal["txt2img", "img2img", "inpaint"]
VaeChoice = Literal["full", "tiny"]  # the checkpoint's VAE, or TAESD (model/taesd.py) when the pipeline has one


@dataclass(frozen=True)
class LoraRef:
    """A LoRA a request applies: a file ``path``, or ``name`` = its stem in the pipeline's LoRA directory."""

    name: str
    scale: float = 1.0
    path: Path | None = None


@dataclass
class GenerationRequest:
    """One user request: ``n`` images of one prompt (image seeds: ``core.rules.image_seeds``)."""

    prompt: str  # may be empty (the image tasks): then BOS, EOS and padding, as diffusers encodes ""
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
    loras: list[LoraRef] = field(default_factory=list)  # per request: its rows get their own side paths
    vae: VaeChoice = "full"  # decodes (and encodes the image tasks' inputs); not part of the batch key
    # SDXL's size conditioning, (height, width) and (top, left) in pixels (model/sdxl.py); None: the image size.
    # Ignored by SD 1.x and 2.x; per row, so not part of the batch key.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    # SDXL: hand the steps after this share of the schedule to the pipeline's refiner (model/refiner.py); None = no
    refiner_switch: float | None = None

    @property
    def denoising_strength(self) -> float:
        """The share of the schedule that runs: ``strength`` for img2img / inpaint, 1 for txt2img."""
        return 1.0 if self.task == "txt2img" else self.strength

    def batch_key(self) -> str:
        """Requests with equal keys can share one batch (``core.rules.batch_key``, as the worker groups jobs)."""
        return rules.batch_key(
            task=self.task, width=self.width, height=self.height, sampler=self.sampler, karras=self.karras,
            steps=self.steps, strength=self.denoising_strength, eta=self.eta,
            refiner=None if self.refiner_switch is None else rules.refiner_key("refiner", self.refiner_switch),
        )


@dataclass
class GenerationResult:
    """The images of one request, in seed order, its prompts' token counts and what the prompt encoder had to cut."""

    images: list[Image.Image]
    seeds: list[int]
    prompt_truncated: bool = False  # more than core.rules.MAX_PROMPT_CHUNKS chunks: the rest was dropped
    negative_prompt_truncated: bool = False
    prompt_tokens: int = 0  # CLIP tokens of the prompt (weight syntax, BOS and EOS not counted), before any cut
    negative_prompt_tokens: int = 0
    prompt_chunks: int = 1  # 75-token chunks encoded for the prompt, and for the negative prompt (padded to it)

    def warnings(self) -> list[str]:
        """What the prompt encoder had to cut, in words, for the job's warnings."""
        limit = rules.MAX_PROMPT_CHUNKS
        return [f"{name} has {tokens} CLIP tokens, more than fit in {limit} chunks of 75: only its first {limit} "
                "chunks were used"
                for name, cut, tokens in (("prompt", self.prompt_truncated, self.prompt_tokens),
                                          ("negative prompt", self.negative_prompt_truncated,
                                           self.negative_prompt_tokens))
                if cut]


@dataclass
class StepEvent:
    """Reported after every denoising step of a batch."""

    step: int  # 1-based count of steps done
    total: int  # steps this batch runs
    active: list[int]  # indices (into the requests list) still running
    latents: torch.Tensor = field(repr=False)  # [sum of active n, 4, h, w], rows grouped by request


# Returns the request indices to cancel now (they are dropped from the batch, their result is None).
StepCallback = Callable[[StepEvent], Iterable[int] | None]
