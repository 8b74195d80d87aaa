"""Weighted and long prompts through the API on real processes: the job succeeds, GET /v1/jobs/{id} reports its
token counts, a prompt past the chunk limit says so in the warnings, and a short job beside a long one keeps its
pixels."""

from __future__ import annotations

import numpy as np

from core.rules import MAX_PROMPT_CHUNKS
from tests.e2e.conftest import Service
from tests.e2e.test_service import download

BASE = {"width": 64, "height": 64, "steps": 3, "sampler": "euler", "guidance_scale": 5.0}
LONG = "a (red:1.3) house on a [hill], ((tall trees)), \\(sunny\\) " * 9 + "BREAK blue sky"


def pixels(service: Service, job: dict[str, object]) -> np.ndarray:
    return np.stack([np.asarray(download(service, image["url"]), dtype=np.int16)  # type: ignore[index]
                     for image in job["images"]])  # type: ignore[attr-defined]


def test_weighted_long_prompt_job_reports_its_tokens(service: Service) -> None:
    service.start_api()
    service.start_worker()
    service.wait_ready()
    short = {**BASE, "prompt": "a cat", "negative_prompt": "(blurry:1.2)", "seed": 3}
    alone = service.wait_job(service.submit(**short)["id"], timeout=120)

    jobs = [service.submit(**BASE, prompt=LONG, negative_prompt="ugly", seed=4, n=2), service.submit(**short),
            service.submit(**BASE, prompt="cat " * (75 * MAX_PROMPT_CHUNKS + 5), seed=5)]
    long, beside, cut = (service.wait_job(job["id"], timeout=180) for job in jobs)

    assert len(long["images"]) == 2 and long["warnings"] == []
    # per repeat: a red house on a hill , tall trees ( sunny ) = 13 tokens; then blue sky in a chunk of its own
    assert long["tokens"] == {"prompt": 13 * 9 + 2, "negative_prompt": 1, "chunks": 3}
    assert alone["tokens"] == beside["tokens"] == {"prompt": 2, "negative_prompt": 1, "chunks": 1}
    assert np.abs(pixels(service, alone) - pixels(service, beside)).max() <= 1
    assert cut["tokens"]["chunks"] == MAX_PROMPT_CHUNKS
    assert cut["warnings"] == [f"prompt has {75 * MAX_PROMPT_CHUNKS + 5} CLIP tokens, more than fit in "
                               f"{MAX_PROMPT_CHUNKS} chunks of 75: only its first {MAX_PROMPT_CHUNKS} chunks were used"]
