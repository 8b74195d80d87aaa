"""The storage interface shared by the worker (writes results) and the API (links to them)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Storage(ABC):
    """Where result images live. Keys look like ``{job_id}/{index}.{ext}``."""

    name: str

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key`` atomically: readers see the whole object or nothing."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise ``KeyError`` when there are none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def url(self, key: str) -> str:
        """A URL a client can GET the object from (API route for local, presigned URL for S3)."""


def validate_key(key: str) -> str:
    """Refuse keys that could escape the storage root (``..``, absolute paths, backslashes, NUL)."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"invalid storage key {key!r}: use relative 'job_id/name' keys without '..'")
    return key
