"""One `Settings` for every process, read from `SDQ_*` environment variables and an optional `.env` file."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """Raised at start-up with one line per wrong variable, named as the user sets it (SDQ_...)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDQ_", env_file=".env", extra="ignore")

    # --- shared ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for queues, jobs and events.")
    data_dir: Path = Field(Path("data"), description="Local state: demo checkpoint, local images, dev Redis.")
    storage: Literal["local", "s3"] = Field("local", description="Where result images are written.")
    public_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL clients reach the API at (used in image URLs)."
    )
    queue_prefix: str = Field("sdq", pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Redis key/queue prefix.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- model / worker ---
    checkpoint: Path | None = Field(None, description="SD 1.x .safetensors file or diffusers folder.")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    allow_pickle: bool = Field(False, description="Allow .ckpt pickles (loaded with weights_only=True).")
    max_batch_images: int = Field(8, ge=1, le=64, description="Images per UNet batch.")
    batch_window_ms: int = Field(30, ge=0, le=10_000, description="How long a worker waits to fill a batch.")
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="Worker /metrics port (0 = off).")
    job_timeout_s: int = Field(1800, ge=10, description="A job running longer than this fails.")
    job_retries: int = Field(3, ge=0, le=20, description="Re-runs of a job whose worker died.")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long finished jobs stay queryable.")
    heartbeat_s: int = Field(5, ge=1, le=300, description="Worker heartbeat; a dead worker is noticed in ~3x.")

    # --- api ---
    max_queued_jobs: int = Field(10_000, ge=1, description="Global queue limit; beyond it submits get 503.")


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's errors into one readable line per `SDQ_` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "SDQ_" + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
