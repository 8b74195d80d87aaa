"""`sdqueue.client.Client` against real processes: redis-server, `sdqueue api` and `sdqueue worker` on the tiny
checkpoint. Submit, follow on the event stream (and by polling when a proxy spoils the stream), images, cancel,
the API's errors as exceptions, and a submission retried after its answer was lost that still makes one job."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from core.jobs import Status
from sdqueue.client import Client, GenerateOptions, InvalidRequestError, JobFailedError, NotFoundError, WaitTimeout
from tests.e2e.conftest import Service
from tests.redis_server import RedisServer
from tests.sdqueue import live


@pytest.fixture(scope="module")
def running(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with live.service(redis_server.url, tmp_path_factory.mktemp("client")) as svc:
        yield svc


@pytest.fixture
def client(running: Service) -> Iterator[Client]:
    with Client(running.url) as c:
        yield c


class DropFirstSubmitAnswer(httpx.BaseTransport):
    """The real transport, except that the answer to the first submission is received and then lost, as when a
    proxy or the network drops the reply after the server has queued the job."""

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.dropped: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/txt2img" and not self.dropped:
            response.read()
            response.close()
            self.dropped.append(response.status_code)
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


class WithoutIdempotencyKey(httpx.BaseTransport):
    """Strips the Idempotency-Key: what a client without one would send."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers.pop("Idempotency-Key", None)  # (a retry sends the same request again)
        return self.inner.handle_request(request)


class ProxyThatSpoilsStreams(httpx.BaseTransport):
    """Answers every event stream request with an HTML page, as a misconfigured proxy might; the rest passes."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.spoiled = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.spoiled += 1
            return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>buffering</html>")
        return self.inner.handle_request(request)


def test_a_job_is_submitted_followed_on_its_event_stream_and_its_images_downloaded(client: Client) -> None:
    options: GenerateOptions = {**live.QUICK, "seed": 7, "n": 2}
    job = client.txt2img("a photo of a cat", **options)
    assert job.status is Status.queued and job.seeds == [7, 8]
    events = list(client.events(job))
    names = [e.event for e in events]
    assert names[-1] == "succeeded" and "running" in names
    steps = [e.data["step"] for e in events if e.event == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == live.QUICK["steps"]
    assert all(e.id for e in events)  # from the stream, not made up by polling
    done = client.wait(job)  # an ended job: its terminal event comes at once
    assert done.status is Status.succeeded and [i.seed for i in done.images] == [7, 8]
    images = client.images(done)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    data = client.image_bytes(done.id)
    assert data[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert "a photo of a cat" in Image.open(io.BytesIO(data[0])).info["parameters"]


def test_img2img_and_inpaint_take_pil_images_and_paths(client: Client, tmp_path: Path) -> None:
    source = Image.new("RGB", (72, 64), (200, 40, 40))
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    img2img = client.wait(client.img2img("a red boat", source, strength=0.5, steps=4, seed=1))
    assert img2img.status is Status.succeeded and img2img.task == "img2img" and img2img.strength == 0.5
    assert client.images(img2img)[0].size == (72, 64)
    inpaint = client.wait(client.inpaint("a sun", source, tmp_path / "mask.png", steps=4, seed=2))
    assert inpaint.status is Status.succeeded and inpaint.task == "inpaint"
    kept = client.images(inpaint)[0].convert("RGB")
    assert kept.getpixel((2, 2)) == (200, 40, 40)  # outside the mask the source comes back exactly


def test_a_request_the_api_refuses_raises_with_its_type_message_and_field(client: Client) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.txt2img("a cat", width=513)
    err = info.value
    assert (err.status_code, err.type, err.field) == (422, "invalid_request", "width")
    assert "width must be a multiple of 8, got 513" in err.message
    assert err.request_id  # the answer's X-Request-ID, for a bug report
    with pytest.raises(NotFoundError) as missing:
        client.get("0" * 32)
    assert missing.value.type == "not_found" and missing.value.field is None


def test_a_queued_job_is_canceled_and_a_running_one_stops(client: Client) -> None:
    slow = client.txt2img("a slow cat", **live.SLOW)
    queued = client.txt2img("a queued cat", **live.QUICK)
    assert client.cancel(queued).status is Status.canceled  # behind the slow one: it never ran
    for event in client.events(slow):
        if event.event == "progress":
            break
    assert client.get(slow).status is Status.running
    client.cancel(slow)
    ended = client.wait(slow, timeout=60)
    assert ended.status is Status.canceled and ended.finished_at is not None
    with pytest.raises(JobFailedError) as info:
        client.images(ended)
    assert info.value.job.id == slow.id
    assert client.get(queued).started_at is None


def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_single_job(running: Service) -> None:
    transport = DropFirstSubmitAnswer()
    before = live.job_count(running.env["SDQ_REDIS_URL"])
    with Client(running.url, transport=transport) as client:
        job = client.txt2img("a cat, once", **live.QUICK)
        assert transport.dropped == [202]  # the server had queued the job when its answer was lost
        assert live.job_count(running.env["SDQ_REDIS_URL"]) - before == 1
        assert client.wait(job).status is Status.succeeded
        assert job.id in {j.id for j in client.list_jobs(limit=100).jobs}


def test_without_an_idempotency_key_the_same_loss_makes_two_jobs(running: Service) -> None:
    """The harness above can see a duplicate: the same lost answer, with the key stripped, queues twice."""
    before = live.job_count(running.env["SDQ_REDIS_URL"])
    with Client(running.url, transport=DropFirstSubmitAnswer(WithoutIdempotencyKey())) as client:
        client.txt2img("a cat, twice", **live.QUICK)
    assert live.job_count(running.env["SDQ_REDIS_URL"]) - before == 2


def test_a_proxy_that_spoils_event_streams_gets_polled_instead(running: Service) -> None:
    transport = ProxyThatSpoilsStreams()
    with Client(running.url, transport=transport) as client:
        job = client.txt2img("a polled cat", **live.QUICK)
        events = list(client.events(job))
        assert transport.spoiled == 1
        assert events[-1].event == "succeeded" and events[-1].job().status is Status.succeeded
        assert all(e.id is None for e in events)  # made from polls


def test_list_jobs_pages_newest_first_and_filters_by_status(client: Client) -> None:
    first = client.wait(client.txt2img("listed one", **live.QUICK))
    second = client.wait(client.txt2img("listed two", **live.QUICK))
    page = client.list_jobs(limit=1, status="succeeded")
    assert [j.id for j in page.jobs] == [second.id] and page.next_cursor
    after = client.list_jobs(limit=1, status=Status.succeeded, cursor=page.next_cursor)
    assert [j.id for j in after.jobs] == [first.id]


def test_wait_gives_up_after_its_timeout_and_the_job_goes_on(client: Client) -> None:
    slow = client.txt2img("a patient cat", **live.SLOW)
    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        client.wait(slow, timeout=1.5)
    assert 1.4 <= time.monotonic() - started < 10
    assert not client.get(slow).status.is_terminal()
    client.cancel(slow)
    assert client.wait(slow, timeout=60).status is Status.canceled
