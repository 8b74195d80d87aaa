"""LoRAs through the real API and worker processes: two jobs with different LoRAs share one batch, and each gets the
pixels it gets alone."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from typing import Any

import numpy as np
import webuiapi
from PIL import Image

from tests.e2e.conftest import Service
from tests.model.lora_files import write_peft_lora

JOB = {"width": 64, "height": 64, "steps": 4, "sampler": "euler", "guidance_scale": 6.0}


def pixels(service: Service, job: dict[str, Any]) -> np.ndarray:
    r = service.http.get(job["images"][0]["url"])
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def test_two_loras_in_one_batch_give_the_pixels_of_each_alone(service: Service, tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    write_peft_lora(loras / "ink.safetensors", seed=11)
    write_peft_lora(loras / "neon.safetensors", seed=12, rank=8, alpha=4.0)
    service.env["SDQ_LORA_DIR"] = str(loras)
    service.start_api()
    worker = service.start_worker()
    service.wait_ready()
    assert service.http.get("/v1/loras").json()["loras"] == [
        {"name": "ink", "workers": [service.http.get("/v1/models").json()["models"][0]["workers"][0]["name"]]},
        {"name": "neon", "workers": [service.http.get("/v1/models").json()["models"][0]["workers"][0]["name"]]},
    ]
    first = {**JOB, "prompt": "a lighthouse", "seed": 1, "loras": [{"name": "ink", "scale": 0.8}]}
    second = {**JOB, "prompt": "a harbour <lora:neon:0.6>", "seed": 2}

    worker.send_signal(signal.SIGSTOP)  # both jobs wait while the worker is held, so they make one batch
    try:
        together = [service.submit(**first), service.submit(**second)]
    finally:
        worker.send_signal(signal.SIGCONT)
    together = [service.wait_job(job["id"]) for job in together]
    assert "batch of 2 jobs" in service.logs()
    assert together[1]["params"]["prompt"] == "a harbour "
    assert together[1]["params"]["loras"] == [{"name": "neon", "scale": 0.6}]

    alone = [service.wait_job(service.submit(**body)["id"]) for body in (first, second)]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(pixels(service, a) - pixels(service, b)).max() <= 1
    plain = service.wait_job(service.submit(**{**first, "loras": []})["id"])
    assert np.abs(pixels(service, plain) - pixels(service, alone[0])).max() > 10  # the LoRA was applied

    r = service.http.post("/v1/txt2img", json={**JOB, "prompt": "a boat", "loras": [{"name": "absent"}]})
    assert r.status_code == 422 and "'absent' is not available" in r.json()["error"]["message"]

    # The AUTOMATIC1111 layer, with its usual client: the prompt's tag applies the LoRA as the native field does.
    a1111 = webuiapi.WebUIApi(baseurl=f"{service.url}/sdapi/v1")
    assert [lora["name"] for lora in a1111.get_loras()] == ["ink", "neon"]
    result = a1111.txt2img(prompt="a lighthouse <lora:ink:0.8>", width=64, height=64, steps=4, cfg_scale=6.0,
                           sampler_name="Euler", seed=1)
    assert np.array_equal(np.asarray(result.image.convert("RGB"), dtype=np.int16), pixels(service, alone[0]))
