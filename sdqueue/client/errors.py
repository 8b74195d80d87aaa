"""What the client raises. An answer with an error status becomes an `APIError` subclass carrying the API's error
shape (`type`, `message`, `field`), so code can branch on `type` or catch by class."""

from __future__ import annotations

from typing import Any

import httpx

from core.jobs import JobPublic


class SdqueueError(Exception):
    """Base of everything the client raises."""


class APIConnectionError(SdqueueError):
    """No answer from the server (refused, cut off, timed out), after the retries."""


class WaitTimeout(SdqueueError, TimeoutError):
    """`wait()` gave up before the job ended; the job goes on."""


class JobFailedError(SdqueueError):
    """The job ended without images: it failed or was canceled. `job` is the ended job."""

    def __init__(self, job: JobPublic) -> None:
        reason = f": {job.error.type}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status.value}{reason}")
        self.job = job


class APIError(SdqueueError):
    """The API answered with an error status; `type`, `message` and `field` are its error object's."""

    def __init__(self, status_code: int, type: str, message: str, field: str | None = None, *,
                 retry_after: float | None = None, request_id: str | None = None) -> None:
        super().__init__(f"{message} ({status_code} {type})")
        self.status_code = status_code
        self.type = type
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.request_id = request_id


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class InvalidRequestError(APIError):
    pass


class RateLimitedError(APIError):
    pass


class InternalServerError(APIError):
    pass


class UnavailableError(APIError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 422: InvalidRequestError, 429: RateLimitedError,
    500: InternalServerError, 503: UnavailableError,
}


def error_from_response(response: httpx.Response, retry_after: float | None) -> APIError:
    """The exception for an error answer; one that is not the API's shape (a proxy's 502 page) keeps its text."""
    info: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            info = body["error"]
    except ValueError:
        pass
    status = response.status_code
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
    message = str(info.get("message") or response.text[:300].strip() or response.reason_phrase)
    field = info.get("field")
    return cls(status, str(info.get("type") or "http_error"), message, field if isinstance(field, str) else None,
               retry_after=retry_after, request_id=response.headers.get("X-Request-ID"))
