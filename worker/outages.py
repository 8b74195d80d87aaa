"""Riding out outages of Redis and of storage in the worker: which errors are the infrastructure's.

- Every ``redis.exceptions.RedisError`` is the infrastructure's (``core.outages``, which also holds the waiting:
  ``Backoff``, ``Link``, ``until_answered``, shared with the webhook sender). The worker never exits for one and
  never records one as a job's error.
- A storage error is the infrastructure's when it is an ``OSError`` (disk, network, timeouts), a botocore connection
  or HTTP error, or an S3 answer with a 5xx status or a throttling code (``is_storage_outage``). Other errors, a
  missing input or a 403 for a wrong key or bucket, are not retried: waiting would not change them.
- The worker runs RQ's abandoned-job recovery only after a lease of steady contact
  (``rq_adapter.RQWorker.clean_registries``): right after an outage every lease looks expired, and the workers that
  are alive need a heartbeat to renew theirs.
"""

from __future__ import annotations

import sys

import redis.exceptions

from core.outages import Backoff, GaveUp, Link, describe, quick_client, until_answered

# The waiting lives in core.outages; these names stay importable from here for the worker's modules.
__all__ = [
    "Backoff", "GaveUp", "Link", "describe", "is_infrastructure_error", "is_storage_outage", "quick_client",
    "until_answered",
]

# S3 error codes that say "try again" whatever the HTTP status.
RETRYABLE_S3_CODES = frozenset({
    "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException",
})


def is_storage_outage(exc: BaseException) -> bool:
    """Whether a storage call failed for the infrastructure's reasons (worth waiting out), not the request's."""
    if isinstance(exc, OSError):
        return True
    botocore = sys.modules.get("botocore.exceptions")  # loaded only by the S3 backend
    if botocore is None:
        return False
    if isinstance(exc, botocore.ConnectionError | botocore.HTTPClientError):
        return True
    if isinstance(exc, botocore.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return int(status) >= 500 or code in RETRYABLE_S3_CODES
    return False


def is_infrastructure_error(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.RedisError) or is_storage_outage(exc)
