"""The rules a client needs that the request schema does not carry: the side multiple and this server's limits on
input images. The request fields' defaults and ranges are in the OpenAPI schema (`/openapi.json`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import SettingsDep
from core.rules import SIDE_MULTIPLE

router = APIRouter(prefix="/v1", tags=["models"])


class Limits(BaseModel):
    side_multiple: int = Field(description="`width` and `height` must be multiples of this.")
    max_body_bytes: int = Field(description="Largest request body (SDQ_MAX_BODY_BYTES); beyond it 413.")
    max_image_bytes: int = Field(description="Largest input image or mask file (SDQ_MAX_IMAGE_BYTES); beyond it 413.")
    max_image_pixels: int = Field(description="Most pixels an input image may have (SDQ_MAX_IMAGE_PIXELS); beyond "
                                              "it 422.")
    image_size_rule: Literal["round_down", "strict"] = Field(
        description="Input sides that are not multiples of `side_multiple` (SDQ_IMAGE_SIZE_RULE): `round_down` crops "
        "the right and bottom edges, `strict` refuses the image (422)."
    )


@router.get("/limits")
async def get_limits(settings: SettingsDep) -> Limits:
    """The size rule and this server's limits on bodies and input images, for clients that check before they send;
    each field's own default and range is in the OpenAPI schema."""
    return Limits(
        side_multiple=SIDE_MULTIPLE, max_body_bytes=settings.max_body_bytes, max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels, image_size_rule=settings.image_size_rule,
    )
