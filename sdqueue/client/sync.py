"""`Client`: the native API over httpx's synchronous API. Requests and answers are `sdqueue.client.protocol`'s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType

import httpx
from PIL import Image
from typing_extensions import Unpack

from core.jobs import JobPublic, Status
from sdqueue.client import protocol as p
from sdqueue.client.errors import APIConnectionError, APIError


class Client:
    """A client of one sdqueue API. `server` defaults to $SDQ_SERVER (else http://127.0.0.1:8000), `api_key` to
    $SDQ_API_KEY. Answers 429 and 503 are retried after their `Retry-After`, calls that got no answer after a
    backoff, up to `max_retries` times; submissions carry an Idempotency-Key, so a retry never makes a second job.

        with Client() as client:
            job = client.wait(client.txt2img("a photo of a cat", steps=20, seed=42))
            client.images(job)[0].save("cat.png")
    """

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: httpx.Timeout = p.TIMEOUT,
                 max_retries: int = 3, transport: httpx.BaseTransport | None = None) -> None:
        self.server = p.base_url(server)
        self._http = httpx.Client(base_url=self.server, headers=p.client_headers(api_key), timeout=timeout,
                                  transport=transport)
        self._retry = p.Retry(max_retries)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs ---

    def txt2img(self, prompt: str, *, idempotency_key: str | None = None,
                **options: Unpack[p.GenerateOptions]) -> JobPublic:
        """Queue a text-to-image job; the answer is the queued job (`wait()` follows it)."""
        return self._job(p.submit_call("txt2img", p.txt2img_body(prompt, options), idempotency_key))

    def img2img(self, prompt: str, image: p.ImageInput, *, idempotency_key: str | None = None,
                **options: Unpack[p.Img2ImgOptions]) -> JobPublic:
        """Queue an image-to-image job; `image` is a PIL image, a path or a file's bytes."""
        return self._job(p.submit_call("img2img", p.img2img_body(prompt, image, options), idempotency_key))

    def inpaint(self, prompt: str, image: p.ImageInput, mask: p.ImageInput | None = None, *,
                idempotency_key: str | None = None, **options: Unpack[p.InpaintOptions]) -> JobPublic:
        """Queue an inpaint job: the white area of `mask` is repainted (with `outpaint=`, `mask` may be left out)."""
        return self._job(p.submit_call("inpaint", p.inpaint_body(prompt, image, mask, options), idempotency_key))

    def get(self, job: JobPublic | str) -> JobPublic:
        return self._job(p.job_call(p.job_id_of(job)))

    def cancel(self, job: JobPublic | str) -> JobPublic:
        """Cancel a job: a queued one never runs; a running one stops after its current step (its status stays
        `running` until then: `wait()` for the end)."""
        return self._job(p.cancel_call(p.job_id_of(job)))

    def list_jobs(self, *, status: Status | str | None = None, limit: int = 20,
                  cursor: str | None = None) -> p.JobPage:
        """One page of the caller's jobs, newest first; pass `next_cursor` back for the next page."""
        return p.parse_page(self._send(p.list_call(status, limit, cursor)))

    def events(self, job: JobPublic | str, *, timeout: float | None = None) -> Iterator[p.Event]:
        """The job's events until its terminal one (on the event stream; by polling where a stream does not get
        through). Raises WaitTimeout after `timeout` seconds."""
        follower = p.Follower(p.job_id_of(job), timeout)
        while not follower.done:
            if follower.polling:
                if (event := follower.on_poll(self.get(follower.job_id))) is not None:
                    yield event
                if not follower.done:
                    time.sleep(follower.poll_delay())
                continue
            error: Exception | None = None
            try:
                response = self._send(follower.stream_call(), timeout=follower.stream_timeout())
                try:
                    follower.check_stream(response)
                    for line in response.iter_lines():
                        if (event := follower.on_line(line)) is not None:
                            yield event
                        if follower.done:
                            return
                finally:
                    response.close()
            except (httpx.TransportError, APIConnectionError, APIError, p.StreamUnusable) as exc:
                error = exc
            follower.on_stream_end(error)

    def wait(self, job: JobPublic | str, *, timeout: float | None = None) -> JobPublic:
        """The job once it has ended (succeeded, failed or canceled). Raises WaitTimeout after `timeout` seconds."""
        for event in self.events(job, timeout=timeout):
            if event.terminal and "id" in event.data:
                return event.job()
        return self.get(job)  # a terminal event without the job in it: the job expired as it ended

    def image_bytes(self, job: JobPublic | str) -> list[bytes]:
        """The files of a succeeded job's images, as stored (PNG, JPEG or WebP); JobFailedError if it failed."""
        job = job if isinstance(job, JobPublic) else self.get(job)
        return [self._send(call).content for call in p.image_calls(job, self.server)]

    def images(self, job: JobPublic | str) -> list[Image.Image]:
        return [p.decode_image(data) for data in self.image_bytes(job)]

    # --- transport ---

    def _job(self, call: p.Call) -> JobPublic:
        return p.parse_job(self._send(call))

    def _send(self, call: p.Call, *, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """The answer to `call`, retried as `protocol.Retry` says; error answers raise APIError. A streamed
        answer is returned open: the caller closes it."""
        request = self._http.build_request(call.method, call.path, json=call.json, params=call.params,
                                           headers=call.headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        if not call.auth:
            request.headers.pop("Authorization", None)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if (delay := self._retry.after_error(attempt)) is None:
                    raise APIConnectionError(f"{call.method} {request.url}: no answer: {exc!r}") from exc
            else:
                delay = self._retry.after_response(attempt, response)
                if delay is None:
                    if response.is_error:
                        response.read()
                        response.close()
                        p.raise_for_error(response)
                    return response
                response.close()
            time.sleep(delay)
            attempt += 1
