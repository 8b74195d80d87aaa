"""What both clients share: their option types against the API's request models, the Server-Sent Events decoder,
`Retry-After`, and retries and auth against a real API with rate limits (served in-process, no worker needed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from api.main import create_app
from core import apikeys
from core.jobs import GenerationParams, Img2ImgRequest, InpaintRequest, JobPublic, Status
from core.settings import load_settings
from sdqueue.client import AuthenticationError, Client, JobFailedError, RateLimitedError
from sdqueue.client.protocol import (
    GenerateOptions,
    Img2ImgOptions,
    InpaintOptions,
    SSEDecoder,
    image_calls,
    parse_retry_after,
)
from tests.api.conftest import LiveServer
from tests.sdqueue import live

KEY = "sdq_test-key-for-the-client"


def test_the_option_types_list_exactly_the_request_models_fields() -> None:
    """A field added to the API's models shows up here until the client's types have it too."""
    assert set(GenerateOptions.__annotations__) == set(GenerationParams.model_fields) - {"prompt"}
    assert set(Img2ImgOptions.__annotations__) == set(Img2ImgRequest.model_fields) - {"prompt", "image"}
    assert set(InpaintOptions.__annotations__) == set(InpaintRequest.model_fields) - {"prompt", "image", "mask"}


def test_sse_decoder_reads_events_ids_multiline_data_and_skips_comments() -> None:
    lines = ["retry: 2000", "", ": keepalive", "", "id: 1-0", "event: progress", 'data: {"step": 1,',
             'data: "total": 2}', "", "id: 2-0", "event: succeeded", 'data:{"id": "j"}', ""]
    decoder = SSEDecoder()
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.event, e.id, e.data) for e in events] == [
        ("progress", "1-0", {"step": 1, "total": 2}), ("succeeded", "2-0", {"id": "j"}),
    ]
    assert decoder.last_id == "2-0" and events[1].terminal and not events[0].terminal


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (parse_retry_after(soon) or 0) <= 30
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


@pytest.fixture
def limited_api(redis_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """Auth on, one submission a second with no burst: the second submission at once gets 429, Retry-After: 1."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path / "data", api_keys=f"me:{apikeys.digest(KEY)}",
                             rate_limit_per_min=60, rate_limit_burst=1)
    server = LiveServer(create_app(settings))
    server.start()
    yield server
    server.stop()


def test_a_429_is_retried_after_its_retry_after_and_makes_one_job(limited_api: LiveServer, redis_url: str) -> None:
    with Client(limited_api.url, api_key=KEY) as client:
        client.txt2img("first", **live.QUICK)
        started = time.monotonic()
        second = client.txt2img("second", **live.QUICK)  # 429 first, then queued after Retry-After
        assert time.monotonic() - started >= 0.9
        assert live.job_count(redis_url) == 2
        assert client.get(second).id == second.id
    with Client(limited_api.url, api_key=KEY, max_retries=0) as impatient, pytest.raises(RateLimitedError) as info:
        impatient.txt2img("third", **live.QUICK)
    assert info.value.status_code == 429 and info.value.type == "rate_limited"
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert live.job_count(redis_url) == 2


def test_the_api_key_comes_from_the_environment_and_a_wrong_one_raises(
    limited_api: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDQ_SERVER", limited_api.url)
    monkeypatch.setenv("SDQ_API_KEY", KEY)
    with Client() as client:
        assert client.list_jobs().jobs == []
    with Client(api_key="sdq_wrong") as wrong, pytest.raises(AuthenticationError) as info:
        wrong.list_jobs()
    assert info.value.status_code == 401 and info.value.type == "unauthorized"


def test_images_of_the_api_come_from_the_server_with_the_key_and_presigned_ones_without() -> None:
    job = JobPublic.model_validate({
        "id": "j", "status": "succeeded", "task": "txt2img", "created_at": "2026-01-01T00:00:00Z",
        "params": {"prompt": "a cat"}, "seeds": [1, 2, 3],
        "images": [{"url": url, "key": f"j/{i}.png", "seed": 1 + i, "width": 64, "height": 64}
                   for i, url in enumerate([
                       "http://public.example:8000/v1/images/j/0.png",  # SDQ_PUBLIC_URL is not the client's URL
                       "https://bucket.s3.example/j/1.png?X-Amz-Signature=abc",
                       "http://127.0.0.1:9/elsewhere/j/2.png",
                   ])],
    })
    calls = image_calls(job, "http://127.0.0.1:9")
    assert [(c.path, c.auth) for c in calls] == [
        ("/v1/images/j/0.png", True),
        ("https://bucket.s3.example/j/1.png?X-Amz-Signature=abc", False),
        ("http://127.0.0.1:9/elsewhere/j/2.png", True),
    ]
    with pytest.raises(JobFailedError):
        image_calls(job.model_copy(update={"status": Status.failed}), "http://127.0.0.1:9")
