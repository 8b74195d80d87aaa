"""A typed client of sdqueue's native API: `Client` (sync) and `AsyncClient` (asyncio), on httpx.

    from sdqueue.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        job = client.wait(client.txt2img("a photo of a cat", steps=20, seed=42))
        client.images(job)[0].save("cat.png")

Jobs are `core.jobs.JobPublic`, the API's own model. It needs no torch.
"""

from core.jobs import JobPublic, Status
from sdqueue.client.aio import AsyncClient
from sdqueue.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    SdqueueError,
    UnavailableError,
    WaitTimeout,
)
from sdqueue.client.protocol import Event, GenerateOptions, Img2ImgOptions, InpaintOptions, JobPage
from sdqueue.client.sync import Client

__all__ = [
    "APIConnectionError", "APIError", "AsyncClient", "AuthenticationError", "BadRequestError", "Client",
    "ConflictError", "Event", "GenerateOptions", "Img2ImgOptions", "InpaintOptions", "InternalServerError",
    "InvalidRequestError", "JobFailedError", "JobPage", "JobPublic", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitedError", "SdqueueError", "Status", "UnavailableError", "WaitTimeout",
]
