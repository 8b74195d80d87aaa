"""`AsyncClient`: `Client`'s twin on httpx's async API. Requests and answers are `sdqueue.client.protocol`'s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType

import httpx
from PIL import Image
from typing_extensions import Unpack

from core.jobs import JobPublic, Status
from sdqueue.client import protocol as p
from sdqueue.client.errors import APIConnectionError, APIError


class AsyncClient:
    """`Client` with `async` methods, for asyncio programs (same arguments, retries and errors).

        async with AsyncClient() as client:
            job = await client.wait(await client.txt2img("a photo of a cat", steps=20, seed=42))
            (await client.images(job))[0].save("cat.png")
    """

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: httpx.Timeout = p.TIMEOUT,
                 max_retries: int = 3, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.server = p.base_url(server)
        self._http = httpx.AsyncClient(base_url=self.server, headers=p.client_headers(api_key), timeout=timeout,
                                  transport=transport)
        self._retry = p.Retry(max_retries)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # --- jobs ---

    async def txt2img(self, prompt: str, *, idempotency_key: str | None = None,
                **options: Unpack[p.GenerateOptions]) -> JobPublic:
        """Queue a text-to-image job; the answer is the queued job (`wait()` follows it)."""
        return await self._job(p.submit_call("txt2img", p.txt2img_body(prompt, options), idempotency_key))

    async def img2img(self, prompt: str, image: p.ImageInput, *, idempotency_key: str | None = None,
                **options: Unpack[p.Img2ImgOptions]) -> JobPublic:
        """Queue an image-to-image job; `image` is a PIL image, a path or a file's bytes."""
        return await self._job(p.submit_call("img2img", p.img2img_body(prompt, image, options), idempotency_key))

    async def inpaint(self, prompt: str, image: p.ImageInput, mask: p.ImageInput | None = None, *,
                idempotency_key: str | None = None, **options: Unpack[p.InpaintOptions]) -> JobPublic:
        """Queue an inpaint job: the white area of `mask` is repainted (with `outpaint=`, `mask` may be left out)."""
        return await self._job(p.submit_call("inpaint", p.inpaint_body(prompt, image, mask, options), idempotency_key))

    async def get(self, job: JobPublic | str) -> JobPublic:
        return await self._job(p.job_call(p.job_id_of(job)))

    async def cancel(self, job: JobPublic | str) -> JobPublic:
        """Cancel a job: a queued one never runs; a running one stops after its current step (its status stays
        `running` until then: `wait()` for the end)."""
        return await self._job(p.cancel_call(p.job_id_of(job)))

    async def list_jobs(self, *, status: Status | str | None = None, limit: int = 20,
                  cursor: str | None = None) -> p.JobPage:
        """One page of the caller's jobs, newest first; pass `next_cursor` back for the next page."""
        return p.parse_page(await self._send(p.list_call(status, limit, cursor)))

    async def events(self, job: JobPublic | str, *, timeout: float | None = None) -> AsyncIterator[p.Event]:
        """The job's events until its terminal one (on the event stream; by polling where a stream does not get
        through). Raises WaitTimeout after `timeout` seconds."""
        follower = p.Follower(p.job_id_of(job), timeout)
        while not follower.done:
            if follower.polling:
                if (event := follower.on_poll(await self.get(follower.job_id))) is not None:
                    yield event
                if not follower.done:
                    await asyncio.sleep(follower.poll_delay())
                continue
            error: Exception | None = None
            try:
                response = await self._send(follower.stream_call(), timeout=follower.stream_timeout())
                try:
                    follower.check_stream(response)
                    async for line in response.aiter_lines():
                        if (event := follower.on_line(line)) is not None:
                            yield event
                        if follower.done:
                            return
                finally:
                    await response.aclose()
            except (httpx.TransportError, APIConnectionError, APIError, p.StreamUnusable) as exc:
                error = exc
            follower.on_stream_end(error)

    async def wait(self, job: JobPublic | str, *, timeout: float | None = None) -> JobPublic:
        """The job once it has ended (succeeded, failed or canceled). Raises WaitTimeout after `timeout` seconds."""
        async for event in self.events(job, timeout=timeout):
            if event.terminal and "id" in event.data:
                return event.job()
        return await self.get(job)  # a terminal event without the job in it: the job expired as it ended

    async def image_bytes(self, job: JobPublic | str) -> list[bytes]:
        """The files of a succeeded job's images, as stored (PNG, JPEG or WebP); JobFailedError if it failed."""
        job = job if isinstance(job, JobPublic) else await self.get(job)
        return [(await self._send(call)).content for call in p.image_calls(job, self.server)]

    async def images(self, job: JobPublic | str) -> list[Image.Image]:
        return [p.decode_image(data) for data in await self.image_bytes(job)]

    # --- transport ---

    async def _job(self, call: p.Call) -> JobPublic:
        return p.parse_job(await self._send(call))

    async def _send(self, call: p.Call, *, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """The answer to `call`, retried as `protocol.Retry` says; error answers raise APIError. A streamed
        answer is returned open: the caller closes it."""
        request = self._http.build_request(call.method, call.path, json=call.json, params=call.params,
                                           headers=call.headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        if not call.auth:
            request.headers.pop("Authorization", None)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if (delay := self._retry.after_error(attempt)) is None:
                    raise APIConnectionError(f"{call.method} {request.url}: no answer: {exc!r}") from exc
            else:
                delay = self._retry.after_response(attempt, response)
                if delay is None:
                    if response.is_error:
                        await response.aread()
                        await response.aclose()
                        p.raise_for_error(response)
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1
