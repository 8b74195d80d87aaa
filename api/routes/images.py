"""Result images of the local storage backend (with S3, clients download from presigned URLs instead)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from api.deps import StorageDep
from core.storage import LocalStorage

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The image."},
        400: {"description": "The key is not a valid storage key (e.g. contains '..')."},
        404: {"description": "No such image, or images are not served by the API with this storage backend."},
    },
)
def get_image(key: str, storage: StorageDep) -> FileResponse:
    """Download an image by its storage key (`{job_id}/{index}.png`), as linked from a job's `images[].url`."""
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
    # Keys are unique per job and never rewritten with other content, so clients may cache forever.
    return FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})
