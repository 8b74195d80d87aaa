"""SDQ_CPU_CHOICES reaches the resident model: the worker's CPU self-check keeps its choices where it says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.requests import GenerationRequest
from tests.worker.conftest import make_settings
from worker import tasks


@pytest.fixture
def no_resident(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tasks, "_resident", None)  # load_resident loads once per process: start from none
    yield


@pytest.mark.usefixtures("no_resident")
def test_the_worker_keeps_its_choices_in_the_configured_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    file = tmp_path / "state" / "choices.json"
    resident = tasks.load_resident(make_settings("redis://127.0.0.1:1/0", tmp_path, tiny_checkpoint,
                                                 cpu_choices=str(file), dtype="float32"))
    assert resident.pipe.cpu_choices is not None and resident.pipe.cpu_choices.path == file
    resident.pipe.generate([GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=1)])
    networks = {key.split()[1] for key in json.loads(file.read_text())["choices"]}
    assert {"UNetModel", "AutoencoderKL", "CLIPTextModel"} <= networks


@pytest.mark.usefixtures("no_resident")
def test_off_keeps_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    resident = tasks.load_resident(make_settings("redis://127.0.0.1:1/0", tmp_path, tiny_checkpoint,
                                                 cpu_choices="off", dtype="float32"))
    assert resident.pipe.cpu_choices is None
