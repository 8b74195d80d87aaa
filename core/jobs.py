"""The job contract shared by the API and the worker: requests, public job view, statuses. No torch here."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core import loras as lora_names
from core import rules
from core.loras import LoraRequest
from core.rules import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORAS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    MODEL_NAME_PATTERN,
    Sampler,
)
from core.webhooks import split_webhook_url

MAX_PROMPT_CHARS = 4000
MAX_OUTPAINT = 1024
MAX_WEBHOOK_CHARS = 2048


class Status(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (Status.succeeded, Status.failed, Status.canceled)


class Priority(str, Enum):
    high = "high"
    normal = "normal"
    low = "low"


TaskKind = Literal["txt2img", "img2img", "inpaint"]
OutputFormat = Literal["png", "jpeg", "webp"]
ResizeMode = Literal["resize", "crop"]
WebhookEvent = Literal["start", "progress", "completed"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "completed")


class RefinerRequest(BaseModel):
    """SDXL's refiner as the last part of the schedule (diffusers' base + refiner "ensemble of experts")."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, examples=["sd_xl_refiner_1.0"],
                       description="The refiner a worker of the job's model holds (`GET /v1/models`: refiner).")
    switch_at: float = Field(
        0.8, ge=rules.MIN_REFINER_SWITCH, le=rules.MAX_REFINER_SWITCH, allow_inf_nan=False,
        description="Share of the schedule the base model runs; the refiner runs the rest (the low-noise steps).",
    )


class GenerationParams(BaseModel):
    """Fields every task shares, named as diffusers names them (`guidance_scale`, `negative_prompt`, ...)."""

    model_config = ConfigDict(extra="forbid")

    # An image task's prompt may be empty: the image conditions it, and "" is encoded as diffusers encodes it (BOS,
    # EOS, padding). A txt2img request has nothing else to draw from, so it must have text (`Txt2ImgRequest`).
    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS, examples=["a photo of a cat"],
        description="May be empty for img2img and inpaint: the image alone then steers the result.",
    )
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN, examples=["v1-5-pruned-emaonly"],
        description="A model from `GET /v1/models`. Left out: the deployment's default (SDQ_DEFAULT_MODEL), else the "
        "one model served; with several models served and no default it is required.",
    )
    width: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    height: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    steps: int = Field(30, ge=1, le=MAX_STEPS)
    # allow_inf_nan=False: a NaN would otherwise fail the range check with a misleading "should be <= 50".
    guidance_scale: float = Field(
        7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance; 1 or less = off."
    )
    sampler: Sampler = Sampler.euler_a
    karras: bool = Field(False, description="Karras sigmas (euler, euler_a, dpmpp_2m).")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM eta, TCD gamma (0 = deterministic).")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="null or -1 = random; image i uses seed+i.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to generate.")
    loras: list[LoraRequest] = Field(
        default_factory=list, max_length=MAX_LORAS,
        description="LoRAs to apply (names from `GET /v1/loras`). `<lora:name:weight>` tags in the prompt are "
        "taken out of it and added here, as AUTOMATIC1111 reads them. Jobs with different LoRAs share batches.",
    )
    vae: Literal["full", "tiny"] = Field(
        "full", description="tiny: decode (and encode an input image) with the tiny VAE TAESD, much faster and a "
        "little less detailed; needs a worker with one (`GET /v1/models`: tiny_vae). Jobs of either share batches.",
    )
    original_size: tuple[int, int] | None = Field(
        None, description="SDXL only: [height, width] the model is told the source image had (its size "
        "conditioning; larger values tend to more detail). Left out: the image size. Other models ignore it.",
        examples=[[1024, 1024]],
    )
    crops_coords_top_left: tuple[int, int] = Field(
        (0, 0), description="SDXL only: [top, left] of the crop the model is told it sees; (0, 0) = uncropped, "
        "centred subjects. Other models ignore it.",
    )
    target_size: tuple[int, int] | None = Field(
        None, description="SDXL only: [height, width] of the target size conditioning. Left out: the image size.",
    )
    refiner: RefinerRequest | None = Field(
        None, description="SDXL: finish the image with a refiner (`{\"model\": ..., \"switch_at\": 0.8}`); jobs "
        "with the same refiner and switch share batches.",
    )
    priority: Priority = Priority.normal
    preview_every: int = Field(
        0, ge=0, le=1000, description="Send a small preview image on the events stream every k steps (0 = off)."
    )
    output_format: OutputFormat = Field(
        "png", description="Result file format; PNG carries the generation parameters as AUTOMATIC1111 writes them."
    )
    output_quality: int = Field(90, ge=1, le=100, description="JPEG / WebP quality (PNG is lossless).")
    webhook: str | None = Field(
        None,
        max_length=MAX_WEBHOOK_CHARS,
        description="http(s) URL that receives the job as JSON on the events below, signed as Standard Webhooks "
        "specifies (webhook-id, webhook-timestamp, webhook-signature). Must reach a public address.",
        examples=["https://example.com/hooks/sdqueue"],
    )
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS),
        min_length=1,
        max_length=3,
        description="start: the job runs; progress: at most once a second while it runs; completed: it succeeded, "
        "failed or was canceled.",
    )

    @field_validator("original_size", "target_size", "crops_coords_top_left")
    @classmethod
    def _size_conditioning(cls, v: tuple[int, int] | None, info: Any) -> tuple[int, int] | None:
        if v is not None:
            rules.check_size_conditioning(str(info.field_name), v, crop=info.field_name == "crops_coords_top_left")
        return v

    @field_validator("width", "height")
    @classmethod
    def _check_side(cls, v: int | None, info: Any) -> int | None:
        if v is not None:  # None: the input image's size (img2img)
            rules.check_side(info.field_name, v)
        return v

    @field_validator("karras", "eta")
    @classmethod
    def _sampler_takes(cls, v: bool | float, info: Any) -> bool | float:
        sampler = info.data.get("sampler")  # absent when the sampler itself was invalid
        if sampler is not None:
            karras, eta = (bool(v), 0.0) if info.field_name == "karras" else (False, float(v))
            rules.check_sampler_options(sampler.value, karras=karras, eta=eta)
        return v

    @field_validator("sampler")
    @classmethod
    def _steps_fit_sampler(cls, v: Sampler, info: Any) -> Sampler:
        steps = info.data.get("steps")  # absent when steps itself was invalid
        if steps is not None:
            rules.check_steps(v.value, steps)
        return v

    @model_validator(mode="after")
    def _prompt_loras(self) -> GenerationParams:
        prompt, loras = lora_names.merged(self.loras, self.prompt)
        if len(loras) > MAX_LORAS:
            raise ValueError(f"at most {MAX_LORAS} loras per request (with the prompt's <lora:...> tags), "
                             f"got {len(loras)}")
        if prompt != self.prompt:
            self.prompt, self.loras = prompt, loras
        return self

    @field_validator("webhook")
    @classmethod
    def _webhook_syntax(cls, v: str | None) -> str | None:
        # Only the form here; whether its host is allowed needs the operator's settings and DNS (checked at submit).
        if v is not None:
            split_webhook_url(v)
        return v


class Txt2ImgRequest(GenerationParams):
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a photo of a cat"], description="Not blank."
    )

    # "before": an empty prompt gets this message too, rather than pydantic's "at least 1 character".
    @field_validator("prompt", mode="before")
    @classmethod
    def _not_blank(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("prompt must contain non-whitespace text (txt2img draws from the prompt alone; "
                             "img2img and inpaint may leave it empty)")
        return v


_IMAGE_DOC = (
    "base64 of a PNG, JPEG or WebP file, or a data: URL (JSON body); the file itself (multipart/form-data). "
    "EXIF orientation is applied; transparent pixels are flattened onto white."
)
_SIZE_DOC = (
    "Output {side} in pixels, a multiple of 8. Default: the image's {side} (after outpaint padding), rounded down to "
    "a multiple of 8 by cropping the {edge} edge (SDQ_IMAGE_SIZE_RULE=strict refuses such images instead). When "
    "width or height is given, the image is scaled to width x height as resize_mode says."
)


class Img2ImgRequest(GenerationParams):
    """img2img: denoise a noised copy of `image` (docs/image-inputs.md)."""

    image: str = Field(min_length=1, description="The source image: " + _IMAGE_DOC)
    # None = the image's size, so these override the txt2img fields' type and default.
    width: int | None = Field(  # type: ignore[assignment]
        None, ge=MIN_SIDE, le=MAX_SIDE, description=_SIZE_DOC.format(side="width", edge="right")
    )
    height: int | None = Field(  # type: ignore[assignment]
        None, ge=MIN_SIDE, le=MAX_SIDE, description=_SIZE_DOC.format(side="height", edge="bottom")
    )
    resize_mode: ResizeMode = Field(
        "resize",
        description="When width x height differs from the image: resize stretches it to fit; crop scales it to "
        "cover width x height and cuts the overflow evenly from both sides.",
    )
    strength: float = Field(
        0.75, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Share of the denoising schedule that runs (its last int(steps * strength) steps): "
        "0 returns the image through the VAE, 1 repaints it from pure noise.",
    )


class Outpaint(BaseModel):
    """Grow the canvas: pixels added on each side are filled by extending the edge pixels, then repainted."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, le=MAX_OUTPAINT)
    right: int = Field(0, ge=0, le=MAX_OUTPAINT)
    top: int = Field(0, ge=0, le=MAX_OUTPAINT)
    bottom: int = Field(0, ge=0, le=MAX_OUTPAINT)
    overlap: int = Field(
        0, ge=0, le=64, description="Pixels of the original image along each grown side that are repainted too, "
        "so the seam is painted over.",
    )

    @model_validator(mode="after")
    def _grows(self) -> Outpaint:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("outpaint must add pixels on at least one side (left, right, top or bottom)")
        return self


class InpaintRequest(Img2ImgRequest):
    """inpaint: repaint the white area of `mask`; with `outpaint`, repaint a grown canvas's new area."""

    mask: str | None = Field(
        None,
        description="White = repaint, black = keep (grey >= 50% repaints; transparent = keep); the image's size. "
        "Same encodings as image. Optional with outpaint.",
    )
    invert_mask: bool = Field(False, description="Repaint the black area instead.")
    mask_blur: int = Field(
        4, ge=0, le=64, description="Gaussian blur radius (pixels) applied to the mask, as AUTOMATIC1111's mask blur: "
        "softens the edge where repainted and kept pixels meet.",
    )
    mask_overlay: bool = Field(
        True, description="Paste the original pixels back outside the mask (blended along a blurred edge), so kept "
        "pixels come back exactly rather than through the VAE.",
    )
    outpaint: Outpaint | None = Field(None, description="Grow the canvas and repaint the new area.")
    strength: float = Field(
        1.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Share of the denoising schedule re-run in the masked area; 1 repaints it from noise.",
    )


class JobSpec(BaseModel):
    """What the worker needs to run a job: the request with its seed resolved. Stored as the RQ job's kwargs."""

    id: str
    task: TaskKind = "txt2img"
    params: GenerationParams
    seed: int  # resolved: image i uses seed + i
    created_at: datetime
    owner: str | None = None
    # img2img / inpaint: the API stores the prepared inputs (image and mask at width x height) before it enqueues;
    # only their storage keys travel through Redis.
    strength: float | None = None
    init_image_key: str | None = None
    mask_key: str | None = None
    mask_overlay: bool = False

    def seeds(self) -> list[int]:
        return rules.image_seeds(self.seed, self.params.n)

    def denoising_strength(self) -> float:
        """The share of the schedule that runs: 1 for txt2img."""
        return 1.0 if self.task == "txt2img" or self.strength is None else self.strength

    def batch_key(self) -> str:
        """Jobs with equal keys can run in one UNet batch (``core.rules.batch_key``)."""
        p = self.params
        key = rules.batch_key(
            task=self.task, width=p.width, height=p.height, sampler=p.sampler.value, karras=p.karras, steps=p.steps,
            strength=self.denoising_strength(), eta=p.eta,
            refiner=None if p.refiner is None else rules.refiner_key(p.refiner.model, p.refiner.switch_at),
        )
        # jobs of different models never meet in a worker's queues; the key says so too
        return key if p.model is None else f"{p.model}|{key}"


class ImageRecord(BaseModel):
    url: str
    key: str
    seed: int
    width: int
    height: int
    content_type: str = "image/png"


class Progress(BaseModel):
    step: int = 0
    total: int = 0
    percent: float = 0.0
    eta_seconds: float | None = None


class Timings(BaseModel):
    queue_seconds: float | None = None
    run_seconds: float | None = None
    total_seconds: float | None = None


class JobError(BaseModel):
    type: str
    message: str


class TokenCounts(BaseModel):
    """How the text encoder saw a job's prompts (docs/prompts.md)."""

    prompt: int = Field(description="CLIP tokens of the prompt, weight syntax, BOS and EOS not counted.")
    negative_prompt: int = Field(description="CLIP tokens of the negative prompt, counted the same way.")
    chunks: int = Field(
        description="75-token chunks encoded for the prompt and for the negative prompt (the shorter one is padded "
        f"with empty chunks); at most {rules.MAX_PROMPT_CHUNKS}, past which the job's warnings say what was cut.",
    )


class JobPublic(BaseModel):
    """A job as clients see it (GET /v1/jobs/{id})."""

    id: str
    status: Status
    task: TaskKind
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(default=0, description="How many times a worker started the job (1 for one that ran once).")
    worker: str | None = Field(default=None, description="The worker that started it last (host.pid.suffix, as "
                               "in `GET /v1/models`); null until one does.")
    queue_position: int | None = Field(None, description="Jobs that run before this one (queued jobs only).")
    progress: Progress = Field(default_factory=Progress)
    timings: Timings = Field(default_factory=Timings)
    params: GenerationParams
    strength: float | None = Field(None, description="img2img / inpaint: the denoising strength.")
    seeds: list[int]
    images: list[ImageRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    tokens: TokenCounts | None = Field(default=None, description="Succeeded jobs: the prompts' CLIP token counts.")
    error: JobError | None = None
