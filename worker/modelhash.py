"""The short checkpoint hash AUTOMATIC1111 shows and writes as "Model hash" (its "AutoV2" hash).

For a single checkpoint file it is the first 10 hex digits of the SHA-256 of the whole file, so it matches what
A1111, civitai and other tools show for the same file.

A diffusers folder has no A1111 hash. For one we hash a manifest: the lines ``"{sha256 of file}  {relative path}\\n"``
(the ``sha256sum`` format) of its weight files (``*.safetensors``, ``*.bin``, ``*.ckpt``, ``*.pt``, ``*.pth`` in any
sub-folder), sorted by path; the short hash is the first 10 hex digits of that manifest's SHA-256. It changes when any
weight file changes and does not depend on file timestamps or configuration files.

Hashing a 2-4 GB file takes a few seconds, so results are kept in memory per (path, size, mtime); a worker computes
it once at model load. An operator can also put the full digest next to the checkpoint (``sha256sum model.safetensors
> model.safetensors.sha256``), which is used while it is newer than the file.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SHORT = 10
CHUNK = 8 * 1024 * 1024
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})

_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def model_hash(path: str | Path) -> str:
    """A1111's short hash of a checkpoint file, or of a diffusers folder's weights (see the module docstring)."""
    return sha256_of(path)[:SHORT]


def sha256_of(path: str | Path) -> str:
    """Full hex SHA-256 of a checkpoint file or of a diffusers folder's weight manifest."""
    path = Path(path)
    if path.is_dir():
        return _manifest_sha256(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _file_sha256(path)


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _cache.get(cache_key)
    if cached is not None:
        return cached
    digest = _sidecar_digest(path, stat.st_mtime_ns)
    if digest is None:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
    with _lock:
        _cache[cache_key] = digest
    return digest


def _sidecar_digest(path: Path, file_mtime_ns: int) -> str | None:
    """The digest from ``{file}.sha256`` (sha256sum output) when it exists and is newer than the file."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        if sidecar.stat().st_mtime_ns < file_mtime_ns:
            log.warning("ignoring %s: older than the checkpoint it describes", sidecar)
            return None
        words = sidecar.read_text(encoding="utf-8").split()
    except OSError:
        return None
    digest = words[0].lower() if words else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        log.warning("ignoring %s: it does not start with a SHA-256 hex digest", sidecar)
        return None
    return digest


def _manifest_sha256(folder: Path) -> str:
    weights = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not weights:
        raise FileNotFoundError(f"no weight files ({', '.join(sorted(WEIGHT_SUFFIXES))}) under {folder}")
    manifest = "".join(f"{_file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in weights)
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()
