"""Result images in a local directory, served by the API's ``/v1/images/{key}`` route."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.storage.base import Storage, validate_key


class LocalStorage(Storage):
    """Files under ``root``; ``url(key)`` points at the API that serves them (``{public_url}/v1/images/{key}``)."""

    name = "local"

    def __init__(self, root: Path, public_url: str) -> None:
        self.root = Path(root).resolve()
        self.public_url = public_url.rstrip("/")

    def path(self, key: str) -> Path:
        """The file for ``key``; raises ``ValueError`` for keys that would leave ``root``."""
        path = (self.root / validate_key(key)).resolve()
        # validate_key already refuses '..' and absolute keys; this also catches symlinks pointing out of root.
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}: resolves outside the storage directory")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temp file in the same directory, then rename over the target: readers (the API route, a retried
        # job writing the same key) see the old file, the new file, or nothing, never a partial one. No fsync: an
        # image lost in a power cut is regenerated from its job's seed, and fsync would add its latency to every job.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return f"{self.public_url}/v1/images/{validate_key(key)}"
