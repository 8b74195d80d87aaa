"""SDQ_WARMUP_SHAPES: the worker runs each shape once before it registers and reports the time; batches padded to a
warmed size give their requests the pixels they get unpadded, and the padding never reaches results."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from model.pipeline import Pipeline
from model.requests import GenerationRequest, StepEvent
from model.warmup import BatchPadding, batch_requests, warm_up
from sdqueue.cli import main as cli_main
from tests.worker.conftest import make_settings
from worker import main as worker_main
from worker.metrics import WorkerMetrics


class Recorder:
    """Wraps ``pipe.generate`` and records the image count of every call."""

    def __init__(self, pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[GenerationRequest]] = []
        real = pipe.generate

        def generate(requests: list[GenerationRequest], callback: Any = None) -> Any:
            self.calls.append(list(requests))
            return real(requests, callback)

        monkeypatch.setattr(pipe, "generate", generate)

    def images(self) -> list[int]:
        return [sum(r.n for r in call) for call in self.calls]


@pytest.fixture
def pipe(tiny_checkpoint: Path) -> Pipeline:
    return Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 11, "n": 1}
    return GenerationRequest(**{**values, **overrides})


def pixels(result: Any) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_batch_requests_split_at_the_image_limit() -> None:
    assert [r.n for r in batch_requests(64, 64, 19)] == [8, 8, 3]
    dummy = batch_requests(512, 768, 1)[0]
    assert (dummy.width, dummy.height, dummy.steps) == (512, 768, 1)
    assert dummy.guidance_scale > 1  # warms the CFG shape: 2 UNet rows per image


def test_warm_up_runs_each_shape_once(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(pipe, monkeypatch)
    warmed = warm_up(pipe, [(64, 64, 1), (64, 64, 3), (96, 64, 2)])
    assert recorder.images() == [1, 3, 2]
    assert [(w.width, w.height, w.batch) for w in warmed] == [(64, 64, 1), (64, 64, 3), (96, 64, 2)]
    assert all(w.seconds > 0 for w in warmed)
    assert {(r.width, r.height, r.steps) for call in recorder.calls for r in call} == {(64, 64, 1), (96, 64, 1)}


def test_a_shape_that_fails_is_left_cold(pipe: Pipeline) -> None:
    warmed = warm_up(pipe, [(64, 64, 1), (64, 68, 1)])  # 68 is not a multiple of the VAE's 8
    assert [(w.width, w.height) for w in warmed] == [(64, 64)]


def test_worker_warms_up_before_it_registers(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(pipe, monkeypatch)
    seen: dict[str, Any] = {}

    class FakeWorker:
        """Stands for BatchWorker: registration happens in work()."""

        stop_requested = True
        name = "fake"

        def __init__(self, *args: Any, metrics: WorkerMetrics, **kwargs: Any) -> None:
            self.metrics = metrics

        def work(self, **kwargs: Any) -> None:
            seen["calls_before_work"] = recorder.images()
            seen["warmup_seconds"] = self.metrics.registry.get_sample_value("sdq_warmup_seconds")

    monkeypatch.setattr(worker_main, "load_resident", lambda settings: SimpleNamespace(pipe=pipe, load_seconds=0.5))
    monkeypatch.setattr(worker_main, "BatchWorker", FakeWorker)
    settings = make_settings("redis://127.0.0.1:1/0", tmp_path, warmup_shapes="64x64:2,1", pad_to_warmed=True)
    assert worker_main.main(settings) == 0
    assert seen["calls_before_work"] == [1, 2]
    assert seen["warmup_seconds"] > 0
    assert pipe.batch_padding is None  # padding is for CUDA only


@pytest.mark.parametrize("value", ["512x512", "512x512:0", "512x500:1", "big:1", "512x512:1,,2"])
def test_a_bad_warmup_shape_exits_2_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SDQ_WARMUP_SHAPES", value)
    assert cli_main(["worker"]) == 2
    assert "SDQ_WARMUP_SHAPES" in capsys.readouterr().err


def test_padding_targets_the_nearest_warmed_size() -> None:
    padding = BatchPadding({(64, 64): [4, 1, 8]})
    assert [padding.target(64, 64, n) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, 9]
    assert padding.target(96, 64, 2) == 2  # a size with nothing warmed runs as it is


def test_padded_rows_never_reach_results(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [request(seed=11), request(seed=40, n=2, prompt="a dog")]
    unpadded = pipe.generate(requests)
    pipe.batch_padding = BatchPadding({(64, 64): [8]})
    recorder = Recorder(pipe, monkeypatch)
    events: list[StepEvent] = []

    def record(event: StepEvent) -> None:
        events.append(event)

    padded = pipe.generate(requests, callback=record)
    assert recorder.images() == [3, 8]  # the call, then the padded batch it made
    assert len(padded) == 2
    for alone, together in zip(unpadded, padded, strict=True):
        assert alone is not None and together is not None
        assert len(together.images) == len(alone.images) and together.seeds == alone.seeds
        # batch invariance holds within one level of 255 in float32
        assert max(int(np.abs(a - b).max()) for a, b in zip(pixels(alone), pixels(together), strict=True)) <= 1
    assert events and all(e.active == [0, 1] and e.latents.shape[0] == 3 for e in events)


def test_cancelling_every_real_request_stops_a_padded_batch(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe.batch_padding = BatchPadding({(64, 64): [4]})
    recorder = Recorder(pipe, monkeypatch)
    steps: list[int] = []

    def cancel_at_first_step(event: StepEvent) -> list[int]:
        steps.append(event.step)
        return [0]

    assert pipe.generate([request(steps=5)], callback=cancel_at_first_step) == [None]
    assert recorder.images() == [1, 4]
    assert steps == [1]


def test_a_warm_up_settles_the_cpu_self_check_so_the_first_batch_needs_no_extra_step(pipe: Pipeline) -> None:
    from rq.timeouts import UnixSignalDeathPenalty

    from core.queues import Keys
    from worker.runner import BatchRunner

    def runner() -> BatchRunner:
        return BatchRunner(pipe, None, Keys("sdq"), death_penalty_class=UnixSignalDeathPenalty)  # type: ignore[arg-type]

    assert pipe.cpu_choosers and not pipe.settle_cpu_self_check()  # packed networks, no pass yet
    assert runner().self_check_pending  # without a warm-up the first batch runs one step first
    warm_up(pipe, [(64, 64, 1)])
    assert pipe.settle_cpu_self_check()
    assert not runner().self_check_pending
    measured = {c.network: {k: t.layers for k, t in c.totals.items()} for c in pipe.cpu_choosers}
    assert all(set(c.totals) <= set(c.decided) for c in pipe.cpu_choosers)  # every measured kind is fixed
    from PIL import Image

    init = Image.new("RGB", (64, 72), (30, 160, 90))
    # the VAE's encoder (img2img: its first pass), then another shape
    pipe.generate([request(task="img2img", init_image=init, width=64, height=72, strength=0.6, steps=3)])
    pipe.generate([request(width=64, height=72, steps=2, n=2)])
    after = {c.network: {k: t.layers for k, t in c.totals.items()} for c in pipe.cpu_choosers}
    assert after == measured  # nothing measured again: the batch ran on the settled paths only
