"""The job contract shared by the API and the worker: requests, public job view, statuses. No torch here."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 4000
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1


class Status(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (Status.succeeded, Status.failed, Status.canceled)


class Sampler(str, Enum):
    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"


class Priority(str, Enum):
    high = "high"
    normal = "normal"
    low = "low"


TaskKind = Literal["txt2img", "img2img", "inpaint"]
OutputFormat = Literal["png", "jpeg", "webp"]


def _multiple_of_8(name: str, value: int) -> int:
    if value % 8:
        raise ValueError(f"{name} must be a multiple of 8, got {value}")
    return value


class GenerationParams(BaseModel):
    """Fields every task shares. Names follow AUTOMATIC1111 / diffusers."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a photo of a cat"])
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int = Field(512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    height: int = Field(512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    steps: int = Field(30, ge=1, le=MAX_STEPS)
    # allow_inf_nan=False: a NaN would otherwise fail the range check with a misleading "should be <= 50".
    guidance_scale: float = Field(
        7.5, ge=0.0, le=50.0, allow_inf_nan=False, description="Classifier-free guidance; 1 or less = off."
    )
    sampler: Sampler = Sampler.euler_a
    karras: bool = Field(False, description="Karras sigmas (euler, euler_a, dpmpp_2m).")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM eta (0 = deterministic).")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="null or -1 = random; image i uses seed+i.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to generate.")
    priority: Priority = Priority.normal
    preview_every: int = Field(
        0, ge=0, le=1000, description="Send a small preview image on the events stream every k steps (0 = off)."
    )
    output_format: OutputFormat = Field(
        "png", description="Result file format; PNG carries the generation parameters as AUTOMATIC1111 writes them."
    )
    output_quality: int = Field(90, ge=1, le=100, description="JPEG / WebP quality (PNG is lossless).")

    @field_validator("width", "height")
    @classmethod
    def _check_multiple(cls, v: int, info: Any) -> int:
        return _multiple_of_8(info.field_name, v)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return v


class Txt2ImgRequest(GenerationParams):
    pass


class JobSpec(BaseModel):
    """What the worker needs to run a job: the request with its seed resolved. Stored as the RQ job's kwargs."""

    id: str
    task: TaskKind = "txt2img"
    params: GenerationParams
    seed: int  # resolved: image i uses seed + i
    created_at: datetime
    owner: str | None = None

    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.params.n)]

    def batch_key(self) -> str:
        """Jobs with equal keys can run in one UNet batch (same task, size, sampler and schedule)."""
        p = self.params
        return f"{self.task}:{p.width}x{p.height}:{p.sampler.value}:{int(p.karras)}:{p.steps}"


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


class JobPublic(BaseModel):
    """A job as clients see it (GET /v1/jobs/{id})."""

    id: str
    status: Status
    task: TaskKind
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = Field(None, description="Jobs that run before this one (queued jobs only).")
    progress: Progress = Field(default_factory=Progress)
    timings: Timings = Field(default_factory=Timings)
    params: GenerationParams
    seeds: list[int]
    images: list[ImageRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: JobError | None = None
