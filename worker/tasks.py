"""``JOB_FUNC`` (``worker.tasks.run_job``): the function every sdqueue job names in RQ, and the process's model.

The sdqueue worker (``worker.batch_worker``) never calls ``run_job``: it recognises jobs by this name and runs them
in batches. The function exists so that RQ's job records point at real code, and so that a stock RQ worker
(``rq worker -w rq.SimpleWorker sdq-model-<model>-high sdq-high ...``, the queues of ``Keys.worker_queues``) can
still run sdqueue jobs one at a time, with progress
in the meta and the same result format. It loads the model once per process, on first use.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rq import get_current_job

from core.imagefile import ModelInfo
from core.jobs import JobSpec
from core.queues import Keys
from core.settings import Settings, get_settings
from core.storage import Storage, make_storage
from worker.images import store_images
from worker.inputs import paste_back
from worker.modelhash import model_hash
from worker.progress import ReportedJob, StepReporter
from worker.runner import to_request

if TYPE_CHECKING:
    from model.pipeline import Pipeline
    from model.requests import GenerationResult

log = logging.getLogger(__name__)


@dataclass
class Resident:
    """What stays loaded for the life of a worker process."""

    pipe: Pipeline
    storage: Storage
    keys: Keys
    load_seconds: float
    model: ModelInfo  # name and A1111 short hash, written into every image's metadata


_resident: Resident | None = None
_lock = threading.Lock()


def load_resident(settings: Settings) -> Resident:
    """Load the checkpoint named by ``SDQ_CHECKPOINT`` once per process and keep it."""
    global _resident
    with _lock:
        if _resident is None:
            if settings.checkpoint is None:
                raise ValueError("SDQ_CHECKPOINT is not set: point it at an SD .safetensors file or diffusers folder")
            from model.cpu_choice_store import resolve_path as resolve_choices_path
            from model.pipeline import Pipeline  # torch is imported only by processes that run the model

            started = time.monotonic()
            pipe = Pipeline.load(
                settings.checkpoint, device=settings.device, dtype=settings.dtype, allow_pickle=settings.allow_pickle,
                tiny_vae=settings.tiny_vae, compile_mode=settings.compile, prediction_type=settings.prediction_type,
                cpu_choices=resolve_choices_path(settings.cpu_choices),
            )
            pipe.name = served_name(settings.model_name, pipe.name)
            if settings.refiner_checkpoint is not None:
                pipe.use_refiner(settings.refiner_checkpoint)
                assert pipe.refiner is not None
                pipe.refiner.name = served_name(None, pipe.refiner.name)
            pipe.loras.configure(settings.lora_dir, settings.lora_cache_mb * 2**20)
            seconds = time.monotonic() - started
            model = ModelInfo(pipe.name, _short_hash(settings.checkpoint))
            _resident = Resident(pipe, make_storage(settings), Keys(settings.queue_prefix), seconds, model)
            log.info("model %s resident on %s after %.1f s", pipe.name, pipe.device, seconds)
        return _resident


def _short_hash(checkpoint: Path) -> str | None:
    try:
        return model_hash(checkpoint)
    except OSError as exc:
        log.warning("cannot hash %s for the images' metadata: %s", checkpoint, exc)
        return None


def build_result(
    storage: Storage, spec: JobSpec, result: GenerationResult, model: ModelInfo, run_seconds: float,
    pipeline_seconds: float,
) -> dict[str, Any]:
    """Write the images and return the job's RQ result, as the service contract defines it."""
    records = store_images(storage, spec, result.images, result.seeds, model)
    return {
        "images": records,
        "warnings": result.warnings(),
        "tokens": {"prompt": result.prompt_tokens, "negative_prompt": result.negative_prompt_tokens,
                   "chunks": result.prompt_chunks},
        "timings": {"run_seconds": round(run_seconds, 4), "pipeline_seconds": round(pipeline_seconds, 4)},
    }


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job alone through the resident pipeline; used when a plain RQ worker executes sdqueue jobs."""
    started = time.monotonic()
    job_spec = JobSpec.model_validate(spec)
    resident = load_resident(get_settings())
    request = to_request(job_spec, resident.storage)
    resident.pipe.check(request)
    job = get_current_job()
    reporter = None
    if job is not None:
        reporter = StepReporter(
            job.connection, resident.keys, [ReportedJob(job, job_spec)], preview=resident.pipe.preview
        )
    generate_started = time.monotonic()
    [result] = resident.pipe.generate([request], callback=reporter)
    if result is None:
        # A plain RQ worker has no "canceled while running" outcome: the job fails with this reason instead.
        raise RuntimeError(f"job {job_spec.id} was canceled while running")
    result = paste_back(job_spec, request, result)
    pipeline_seconds = time.monotonic() - generate_started
    return build_result(resident.storage, job_spec, result, resident.model, time.monotonic() - started,
                        pipeline_seconds)


def served_name(configured: str | None, stem: str) -> str:
    """The name jobs use for this worker's model: SDQ_MODEL_NAME, else the checkpoint's stem with each run of other
    characters than those of a model name (``core.rules.MODEL_NAME_PATTERN``) replaced by one ``-``."""
    if configured:
        return configured
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-._+")[:128]
    return name or "model"
