"""Result images of the local storage backend (with S3, clients download from presigned URLs instead)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from api.deps import StorageDep
from core.imagefile import CONTENT_TYPES, EXTENSIONS
from core.storage import LocalStorage, Storage

router = APIRouter(prefix="/v1/images", tags=["images"])

# By file name, not by the platform's MIME table: a slim image may not know `.webp`.
_MEDIA_TYPES = {f".{EXTENSIONS[fmt]}": content_type for fmt, content_type in CONTENT_TYPES.items()}
_IMAGE_CONTENT = {t: {"schema": {"type": "string", "format": "binary"}} for t in CONTENT_TYPES.values()}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The key is not a valid storage key (e.g. contains '..')."},
    404: {"description": "No such image, or images are not served by the API with this storage backend."},
}


@router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={200: {"content": _IMAGE_CONTENT, "description": "The image, in the job's `output_format`."},
               **_ERRORS},
)
def get_image(key: str, storage: StorageDep) -> FileResponse:
    """Download an image by its storage key (`{job_id}/{index}.png`), as linked from a job's `images[].url`."""
    path = _image_path(storage, key)
    # Keys are unique per job and never rewritten with other content, so clients may cache forever.
    return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix),
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


@router.head(
    "/{key:path}",
    response_class=FileResponse,
    responses={200: {"description": "The image exists: `Content-Type` and `Content-Length` as GET would send, no "
                                    "body."},
               **_ERRORS},
)
def head_image(key: str, storage: StorageDep) -> FileResponse:
    """Check that an image exists, and read its type and size, without downloading it."""
    return get_image(key, storage)  # FileResponse answers a HEAD request with the headers only


def _image_path(storage: Storage, key: str) -> Path:
    if not isinstance(storage, LocalStorage):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"images are stored in {storage.name}; download them from the url in the job's images",
        )
    try:
        path = storage.path(key)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no image {key!r}")
    return path
