"""`sdqueue.client.AsyncClient` against real processes (redis-server, `sdqueue api`, `sdqueue worker`): the same
calls as the sync client, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from core.jobs import Status
from sdqueue.client import AsyncClient, GenerateOptions, InvalidRequestError
from tests.e2e.conftest import Service
from tests.redis_server import RedisServer
from tests.sdqueue import live


@pytest.fixture(scope="module")
def running(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with live.service(redis_server.url, tmp_path_factory.mktemp("async-client")) as svc:
        yield svc


class DropFirstSubmitAnswer(httpx.AsyncBaseTransport):
    """The real transport, except that the first submission's answer is received and then lost."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.dropped: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and not self.dropped:
            await response.aread()
            await response.aclose()
            self.dropped.append(response.status_code)
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_jobs_are_submitted_followed_and_downloaded_concurrently(running: Service) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.url) as client:
            options: list[GenerateOptions] = [{**live.QUICK, "seed": i} for i in range(3)]
            jobs = await asyncio.gather(*(client.txt2img(f"cat {i}", **o) for i, o in enumerate(options)))
            events = [e async for e in client.events(jobs[0])]
            assert events[-1].event == "succeeded" and any(e.event == "progress" for e in events)
            assert all(e.id for e in events)  # the event stream's own ids
            done = await asyncio.gather(*(client.wait(job, timeout=60) for job in jobs))
            assert [j.status for j in done] == [Status.succeeded] * 3 and [j.seeds for j in done] == [[0], [1], [2]]
            images = await client.images(done[2])
            assert images[0].size == (64, 64)

    asyncio.run(scenario())


def test_errors_cancel_and_an_answer_lost_after_the_server_queued_the_job(running: Service) -> None:
    async def scenario() -> None:
        transport = DropFirstSubmitAnswer()
        before = live.job_count(running.env["SDQ_REDIS_URL"])
        async with AsyncClient(running.url, transport=transport) as client:
            slow = await client.txt2img("a slow async cat", **live.SLOW)
            assert transport.dropped == [202]
            assert live.job_count(running.env["SDQ_REDIS_URL"]) - before == 1
            with pytest.raises(InvalidRequestError) as info:
                await client.txt2img("a cat", steps=0)
            assert info.value.field == "steps" and info.value.type == "invalid_request"
            async for event in client.events(slow):
                if event.event == "progress":
                    break
            await client.cancel(slow)
            assert (await client.wait(slow, timeout=60)).status is Status.canceled

    asyncio.run(scenario())
