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
        _make_dirs(path.parent)
        # Write a temp file in the same directory, then rename over the target: readers (the API route, a retried
        # job writing the same key) see the old file, the new file, or nothing, never a partial one. The worker marks
        # a job succeeded once its images are written, so the bytes and the new name reach the disk first (the file
        # before the rename, the directory after it): an OS crash or power cut cannot lose a succeeded job's images
        # or leave an empty file under their name.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

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


def _make_dirs(directory: Path) -> None:
    """``mkdir -p`` that also makes each new directory's name durable, by syncing the directory that holds it."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # exist_ok: another writer may create the same job folder at the same moment
        _fsync_dir(new.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
