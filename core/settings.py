"""One `Settings` for every process, read from `SDQ_*` environment variables and an optional `.env` file."""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import apikeys, rules
from core.webhooks import AllowList, signing_key

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
    log_format: Literal["plain", "json"] = Field(
        "plain", description="Log lines as text, or one JSON object per line with request_id and job_id where known."
    )

    # --- model / worker ---
    checkpoint: Path | None = Field(None, description="SD 1.x .safetensors file or diffusers folder.")
    model_name: str | None = Field(
        None, pattern=rules.MODEL_NAME_PATTERN,
        description="The name this worker's model is served as (jobs' `model`; default: the checkpoint's file or "
        "folder name without extension, other characters than letters, digits and ._+- replaced by -).",
    )
    default_model: str | None = Field(
        None, pattern=rules.MODEL_NAME_PATTERN,
        description="The model of jobs that name none (API). Unset: the one model served; with several served, "
        "jobs must name theirs.",
    )
    model_seen_ttl_s: int = Field(
        24 * 3600, ge=0, le=365 * 24 * 3600,
        description="How long after its last live worker a model still takes jobs, which wait for a worker of it "
        "(a restart, a rollout, an autoscaler at zero); 0 = only models with a live worker.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    allow_pickle: bool = Field(False, description="Allow .ckpt pickles (loaded with weights_only=True).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the UNet predicts. auto: a diffusers folder's scheduler config; for a single file, "
        "epsilon for SD 1.x, and for SD 2.x one UNet call on seeded noise decides.",
    )
    lora_dir: Path | None = Field(
        None, description="Folder of LoRA .safetensors files (kohya / A1111 or diffusers / PEFT); a request names "
        "one by its file stem. Read when the worker starts.",
    )
    lora_cache_mb: int = Field(
        1024, ge=0, description="Memory the worker's loaded LoRAs may hold; the least recently used go first.",
    )
    refiner_checkpoint: Path | None = Field(
        None, description="SDXL refiner (sd_xl_refiner_1.0 .safetensors or diffusers folder) this worker holds beside "
        "its SDXL model, for jobs with `refiner`; announced under its file or folder name.",
    )
    tiny_vae: Path | None = Field(
        None, description="TAESD for `\"vae\": \"tiny\"` requests and live previews: a diffusers AutoencoderTiny "
        "folder, or taesd_encoder.safetensors and taesd_decoder.safetensors (their folder, or either file).",
    )
    cpu_choices: str = Field(
        "", description="File where CPU workers keep the start-up self-check's choices (packed or plain layers, per "
        "CPU, PyTorch build, network, dtype and shape), so later starts skip measuring; empty = "
        "$XDG_CACHE_HOME/sdqueue/cpu-choices.json (~/.cache when unset), `off` = measure on every start.",
    )
    max_batch_images: int = Field(8, ge=1, le=64, description="Images per UNet batch.")
    compile: Literal["off", "default", "max"] = Field(
        "off", description="torch.compile the UNet and the VAE decoder (whole graphs): default = inductor kernels, "
        "max = the same plus CUDA graphs (on CUDA). Off by default: the CUDA default awaits measurement.",
    )
    warmup_shapes: str = Field(
        "", description="Shapes the worker runs once before it registers, e.g. `512x512:1,2,4,8 768x768:1` "
        "(WIDTHxHEIGHT:BATCH_SIZES, space-separated); other shapes still work.",
    )
    pad_to_warmed: bool = Field(
        False, description="On CUDA, pad a batch with throwaway rows up to the nearest warmed batch size of its "
        "shape (SDQ_WARMUP_SHAPES), so it reuses that shape's compiled graphs.",
    )
    # 0: a batch takes the compatible jobs already waiting. Under load jobs pile up while a batch runs, so the next
    # batch fills anyway; a window would only delay a lone job (measured: +30 ms p50 for 30 ms).
    batch_window_ms: int = Field(
        0, ge=0, le=10_000, description="Extra time a worker waits for more compatible jobs to fill a batch."
    )
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="Interface the worker's and the webhook sender's /metrics listen on "
        "(0.0.0.0: every interface, for a Prometheus on another host or in another container).",
    )
    worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Worker /metrics port (0 = off). When it is taken: the next free port if "
        "this is the default, an error if you set it.",
    )
    job_timeout_s: int = Field(1800, ge=10, description="A job running longer than this fails.")
    job_retries: int = Field(3, ge=0, le=20, description="Re-runs of a job whose worker died.")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long finished jobs stay queryable.")
    heartbeat_s: int = Field(5, ge=1, le=300, description="Worker heartbeat; a dead worker is noticed in ~3x.")

    # --- api ---
    max_queued_jobs: int = Field(10_000, ge=1, description="Global queue limit; beyond it submits get 503.")
    redis_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Longest wait of the API for one Redis command (a stalled Redis: 503 after it)."
    )
    durable_submit: bool = Field(
        False, description="Answer 202 only once the job is on disk (Redis AOF). Needs Redis >= 7.2 with appendonly "
        "yes, or an older Redis with appendfsync always; otherwise the API refuses to start.",
    )
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys required? auto: when SDQ_API_KEYS lists one; on: always (keys may live in Redis)."
    )
    api_keys: str = Field(
        "", description="Comma-separated NAME:SHA256HEX[:MAX_PRIORITY] entries (`sdqueue apikey create` makes one)."
    )
    rate_limit_per_min: int = Field(60, ge=0, description="Job submissions per minute per API key (0 = no limit).")
    rate_limit_burst: int = Field(10, ge=1, description="Submissions an idle API key may make at once.")
    max_queued_per_key: int = Field(
        100, ge=0, description="Jobs one API key may have waiting; beyond it submits get 429 (0 = no limit)."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body (images come base64); beyond it 413."
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins (https://app.example.com, or * for any) whose browser pages may call "
        "the API; empty = no cross-origin access."
    )

    # --- image inputs of img2img / inpaint (docs/image-inputs.md) ---
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest input image or mask file (decoded bytes); beyond it 413."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Most pixels an input image may declare; checked before decoding (422)."
    )
    image_size_rule: Literal["round_down", "strict"] = Field(
        "round_down", description="Input sides that are not multiples of 8: round_down crops the right and bottom "
        "edges to the multiple of 8 below; strict refuses the image (422)."
    )

    # --- s3 storage ---
    # Used when SDQ_STORAGE=s3. Credentials left unset fall back to boto3's usual chain (AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY, ~/.aws, an instance or pod role), and the region to AWS_REGION / AWS_DEFAULT_REGION.
    s3_bucket: str = Field("", description="Bucket for result images (required with SDQ_STORAGE=s3).")
    s3_prefix: str = Field(
        "", pattern=r"^([A-Za-z0-9!_.*'()-]+/)*([A-Za-z0-9!_.*'()-]+/?)?$",
        description="Key prefix inside the bucket, e.g. 'sdqueue/' ('/' is added when missing).",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, Ceph); unset = AWS.")
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint clients reach, used in presigned URLs (default: SDQ_S3_ENDPOINT_URL)."
    )
    s3_region: str | None = Field(None, description="Bucket region (default: AWS_REGION / AWS_DEFAULT_REGION).")
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = Field(False, description="Path-style URLs (endpoint/bucket/key), as MinIO needs.")
    # SigV4 presigned URLs cannot be valid for longer than 7 days.
    s3_url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned image URLs.")
    # Result image lifetime for both backends; on S3 a bucket lifecycle rule can do the same (docs/deploy.md).
    result_retention_s: int = Field(
        7 * 24 * 3600, ge=0, description="`sdqueue cleanup` deletes result images older than this (0 = keep)."
    )

    # --- webhooks (docs/webhooks.md) ---
    webhook_secret: SecretStr | None = Field(
        None, description="Signs webhooks: whsec_<base64 key> or a string of 16+ bytes. Unset: webhooks are refused."
    )
    webhook_allow_private: bool = Field(
        False, description="Let webhooks reach loopback, private and link-local addresses."
    )
    webhook_allowed_hosts: str = Field(
        "", description="Comma-separated host names, addresses or networks webhooks may reach although not public."
    )
    webhook_retry_base_s: float = Field(
        1.0, ge=0, le=300, description="Delay before a failed delivery's first retry; doubles for each of 6 retries."
    )
    webhook_metrics_port: int = Field(
        9102, ge=0, le=65535, description="Webhook sender /metrics port (0 = off). When it is taken: the next free "
        "port if this is the default, an error if you set it.",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None  # an empty variable means unset
        signing_key(v.get_secret_value())
        return v

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: str) -> str:
        AllowList.parse(v)
        return v

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, v: str) -> str:
        for origin in _split(v):
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port], no path (or *)")
        return v

    @field_validator("warmup_shapes")
    @classmethod
    def _check_warmup_shapes(cls, v: str) -> str:
        parse_warmup_shapes(v)
        return v

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, v: str) -> str:
        apikeys.parse_list(v)
        return v

    def auth_enabled(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and bool(apikeys.parse_list(self.api_keys)))

    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)


@dataclass(frozen=True)
class WarmupShape:
    """One image size and the batch sizes (images per UNet batch) the worker warms up for it."""

    width: int
    height: int
    batch_sizes: tuple[int, ...]


_WARMUP_SHAPE = re.compile(r"(\d+)x(\d+):(\d+(?:,\d+)*)")
MAX_WARMUP_BATCH = 64  # the largest SDQ_MAX_BATCH_IMAGES


def parse_warmup_shapes(value: str) -> list[WarmupShape]:
    """``512x512:1,2,4 768x768:1`` -> shapes; ValueError saying what is wrong with which entry."""
    shapes = []
    for entry in value.replace(";", " ").split():
        match = _WARMUP_SHAPE.fullmatch(entry)
        if match is None:
            raise ValueError(f"{entry!r} is not WIDTHxHEIGHT:BATCH[,BATCH...], e.g. 512x512:1,2,4,8")
        width, height = int(match[1]), int(match[2])
        for name, side in (("width", width), ("height", height)):
            try:
                rules.check_side(name, side)
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
        sizes = tuple(sorted({int(b) for b in match[3].split(",")}))
        if sizes[0] < 1 or sizes[-1] > MAX_WARMUP_BATCH:
            raise ValueError(f"{entry!r}: batch sizes must be between 1 and {MAX_WARMUP_BATCH}")
        shapes.append(WarmupShape(width, height, sizes))
    return shapes


_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's errors into one readable line per `SDQ_` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "SDQ_" + "_".join(str(p) for p in err["loc"]).upper()
            got = "a hidden value" if "SECRET" in name else repr(err.get("input"))  # keep secrets out of logs
            lines.append(f"{name}: {err['msg']} (got {got})")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


# Variables docker-compose.yml reads for itself. They share .env with the settings, so they are no misspellings.
COMPOSE_VARIABLES = frozenset({
    "SDQ_API_IMAGE", "SDQ_API_PORT", "SDQ_CHECKPOINT_FILE", "SDQ_GPUS_PER_WORKER", "SDQ_MODELS_DIR", "SDQ_WORKER_IMAGE",
})


# Variables of the client side (`sdqueue submit`, `sdqueue.client`): the server a client talks to and its API key.
SERVER_VARIABLE = "SDQ_SERVER"
API_KEY_VARIABLE = "SDQ_API_KEY"
CLIENT_VARIABLES = frozenset({SERVER_VARIABLE, API_KEY_VARIABLE})


def unknown_variables(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> list[str]:
    """One warning per ``SDQ_`` variable, in the environment or the .env file, that is no setting: pydantic would
    ignore a misspelt one in silence. Names the setting it is closest to, when one is close."""
    known = {f"SDQ_{name.upper()}" for name in Settings.model_fields}
    path = Path(str(Settings.model_config.get("env_file"))) if env_file is None else env_file
    sources: list[tuple[str, Mapping[str, object]]] = [("environment", os.environ if environ is None else environ)]
    if path.is_file():
        sources.append((str(path), dotenv_values(path)))
    warnings = []
    for where, variables in sources:
        for name in variables:
            upper = name.upper()  # settings are read case-insensitively
            if not upper.startswith("SDQ_") or upper in known or upper in COMPOSE_VARIABLES | CLIENT_VARIABLES:
                continue
            # Compared without the prefix, which every name shares and which would make any two names look alike.
            close = difflib.get_close_matches(upper[4:], sorted(k[4:] for k in known), n=1, cutoff=0.7)
            hint = f"; did you mean SDQ_{close[0]}?" if close else ""
            warnings.append(f"{name} (in the {where}) is not an sdqueue setting and is ignored{hint}")
    return warnings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
