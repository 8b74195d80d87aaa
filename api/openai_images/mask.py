"""OpenAI's edit mask as a native inpaint mask.

OpenAI marks the area to edit with the mask's fully transparent pixels (alpha 0) and keeps the rest; a native mask
is white where it repaints and black where it keeps. The converted mask then goes through the native preparation
(`api.imageinput.prepare_inpaint`): the same size check against the image, blur and kept pixels pasted back.
"""

from __future__ import annotations

import base64
import io

from api.imageinput import ImageInputError, ImageLimits, load_image


def native_mask(text: str, limits: ImageLimits) -> str:
    """Base64 of a PNG that is white where the OpenAI mask `text` (base64) is fully transparent, black elsewhere."""
    mask = load_image("mask", text, limits)
    if not mask.has_transparency_data:
        raise ImageInputError("mask", "mask has no transparency: its fully transparent pixels mark the area to edit; "
                                      "send a PNG with an alpha channel")
    repaint = mask.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    if repaint.getbbox() is None:
        raise ImageInputError("mask", "mask has no fully transparent pixel, so nothing would be edited: make the "
                                      "area to edit transparent (alpha 0)")
    buf = io.BytesIO()
    repaint.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
