"""Input images of img2img and inpaint: guarded decoding, then the image and mask exactly as the model gets them.

The API process runs this, so it uses Pillow only (no numpy, no torch). Decoding refuses, in this order and before
spending memory on pixels:

1. base64 that decodes to more than ``SDQ_MAX_IMAGE_BYTES`` (413, judged from the text's length) or is not base64;
2. files that are not PNG, JPEG or WebP (Pillow is only allowed to try those three);
3. a header declaring more than ``SDQ_MAX_IMAGE_PIXELS`` pixels, checked before any pixel is decoded (a
   decompression bomb is a small file declaring a huge size; Pillow's own bomb check backs this up);
4. files whose pixels fail to decode (truncated, corrupt).

Then EXIF orientation is applied, and the preparation described in docs/image-inputs.md: alpha flattened onto white
(image) or black (mask), mask inverted, outpaint canvas grown by edge extension, size rounded down to multiples of 8
by cropping the right and bottom edges (or refused with ``SDQ_IMAGE_SIZE_RULE=strict``), or scaled to the requested
width x height, and finally the mask blurred.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from core.jobs import MAX_SIDE, Img2ImgRequest, InpaintRequest, Outpaint, ResizeMode
from core.settings import Settings

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ALLOWED_NAMES = "PNG, JPEG or WebP"
MIN_SIDE = 64
REPAINT = 128  # mask values from here up are repainted (the model binarises the mask at 50%)

# data:[<media type>][;param=value]*;base64,<data>
_DATA_URL = re.compile(r"data:(?:[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*;base64,", re.ASCII | re.IGNORECASE)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageInputError(ValueError):
    """An input image the service refuses. ``field`` names the request field; ``too_large`` means 413, else 422."""

    def __init__(self, field: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.too_large = too_large


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    size_rule: Literal["round_down", "strict"] = "round_down"

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.image_size_rule)


@dataclass(frozen=True)
class PreparedInputs:
    """What the worker gets: an RGB image and, for inpaint, an L mask (255 = repaint), both at the output size."""

    image: Image.Image
    mask: Image.Image | None = None

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


# decoding ----------------------------------------------------------------------------------------------------------
def too_many_bytes(field: str, size: int, limits: ImageLimits) -> ImageInputError:
    return ImageInputError(
        field, f"{field} is {size:,} bytes, more than the {limits.max_bytes:,}-byte limit (SDQ_MAX_IMAGE_BYTES)",
        too_large=True,
    )


def decode_base64(field: str, text: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 string or data: URL; refuses what would decode to more than the byte limit unread."""
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise ImageInputError(field, f"{field} is a data: URL without ';base64,': send the file base64-encoded")
        text = text[match.end():]
    text = "".join(text.split())  # line-wrapped (MIME-style) base64 is fine
    decoded_size = len(text) * 3 // 4 - text[-2:].count("=")
    if decoded_size > limits.max_bytes:
        raise too_many_bytes(field, decoded_size, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(field, f"{field} is not valid base64 ({exc})") from None
    if not data:
        raise ImageInputError(field, f"{field} is empty")
    return data


def open_image(field: str, data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode PNG, JPEG or WebP bytes with the guards of the module docstring; EXIF orientation applied."""
    if len(data) > limits.max_bytes:
        raise too_many_bytes(field, len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(field, f"{field} declares too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageInputError(field, f"{field} must be a {ALLOWED_NAMES} image, got {_describe(data)}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageInputError(
            field, f"{field} is {width}x{height} = {width * height:,} pixels, more than the "
            f"{limits.max_pixels:,}-pixel limit (SDQ_MAX_IMAGE_PIXELS)",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(field, f"{field} could not be decoded as {image.format} ({exc})") from None


def load_image(field: str, text: str, limits: ImageLimits) -> Image.Image:
    return open_image(field, decode_base64(field, text, limits), limits)


def _describe(data: bytes) -> str:
    """What the refused bytes are, for the error message: a format Pillow knows, or not an image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = Image.open(io.BytesIO(data)).format  # header only; never decoded
    except Exception:
        found = None
    return f"a {found} image" if found else "data that is not an image"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparent pixels flattened onto white (as AUTOMATIC1111 does)."""
    return _flatten(image, (255, 255, 255, 255)).convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """Grayscale mask (255 = repaint); a transparent pixel counts as black (keep)."""
    return _flatten(image, (0, 0, 0, 255)).convert("L")


def _flatten(image: Image.Image, background: tuple[int, int, int, int]) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:  # Pillow's own conversion would clip 16-bit values to white
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if not image.has_transparency_data:
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, background), image.convert("RGBA"))


# preparation -------------------------------------------------------------------------------------------------------
def prepare_img2img(request: Img2ImgRequest, limits: ImageLimits) -> PreparedInputs:
    image = to_rgb(load_image("image", request.image, limits))
    size = output_size(image.size, request, limits, what="image")
    return PreparedInputs(fit(image, size, request.resize_mode, Image.Resampling.LANCZOS))


def prepare_inpaint(request: InpaintRequest, limits: ImageLimits) -> PreparedInputs:
    source = load_image("image", request.image, limits)
    if request.mask is not None:
        mask_source = load_image("mask", request.mask, limits)
        if mask_source.size != source.size:
            raise ImageInputError(
                "mask", f"mask is {mask_source.width}x{mask_source.height} but image is "
                f"{source.width}x{source.height}: they must be the same size",
            )
        mask = to_mask(mask_source)
        if request.invert_mask:
            mask = ImageOps.invert(mask)
    elif request.outpaint is None:
        raise ImageInputError("mask", "mask is required for inpaint unless outpaint is set")
    else:
        mask = Image.new("L", source.size, 0)
    image = to_rgb(source)
    what = "image"
    if request.outpaint is not None:
        o = request.outpaint
        what = "image with outpaint"
        canvas = (image.width + o.left + o.right, image.height + o.top + o.bottom)
        output_size(canvas, request, limits, what=what)  # refuse before allocating a canvas that cannot be used
        image, mask = outpaint_canvas(image, mask, o)
    size = output_size(image.size, request, limits, what=what)
    image = fit(image, size, request.resize_mode, Image.Resampling.LANCZOS)
    mask = fit(mask, size, request.resize_mode, Image.Resampling.BILINEAR)
    if request.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    if mask.point(lambda v: 255 if v >= REPAINT else 0).getbbox() is None:
        raise ImageInputError("mask", "mask marks nothing to repaint: no pixel is 50% white or more (after "
                                      "invert_mask and blur); white = repaint")
    return PreparedInputs(image, mask)


def output_size(
    canvas: tuple[int, int], request: Img2ImgRequest, limits: ImageLimits, *, what: str
) -> tuple[int, int]:
    """width x height of the output: as requested, else the canvas rounded down to multiples of 8 (or refused)."""
    sides = []
    for name, given, actual in (("width", request.width, canvas[0]), ("height", request.height, canvas[1])):
        if given is not None:
            sides.append(given)
            continue
        if actual % 8 and limits.size_rule == "strict":
            raise ImageInputError("image", f"{what} {name} is {actual} px, not a multiple of 8 "
                                           f"(SDQ_IMAGE_SIZE_RULE=strict): crop it, or pass width and height")
        side = actual - actual % 8
        if side < MIN_SIDE:
            raise ImageInputError("image", f"{what} {name} is {actual} px; at least {MIN_SIDE} are needed "
                                           "(or pass width and height to scale it up)")
        if side > MAX_SIDE:
            raise ImageInputError("image", f"{what} {name} is {actual} px, more than {MAX_SIDE}: pass width and "
                                           f"height (at most {MAX_SIDE}) to scale it down")
        sides.append(side)
    return sides[0], sides[1]


def fit(image: Image.Image, size: tuple[int, int], mode: ResizeMode, resample: Image.Resampling) -> Image.Image:
    """``image`` at ``size``: cropped at the right and bottom when that is the image rounded down to multiples of
    8 (no pixel moves), else scaled as ``mode`` says."""
    width, height = image.size
    if size == image.size:
        return image
    if size == (width - width % 8, height - height % 8):
        return image.crop((0, 0, *size))
    if mode == "crop":
        return ImageOps.fit(image, size, method=resample)
    return image.resize(size, resample)


def outpaint_canvas(image: Image.Image, mask: Image.Image, o: Outpaint) -> tuple[Image.Image, Image.Image]:
    """The image grown by ``o``'s margins, filled by repeating the edge pixels outwards (a colour hint for the
    model, which repaints the margins from noise at strength 1), and the mask grown with white margins plus the
    ``overlap`` band along each grown side."""
    width, height = image.size
    canvas = Image.new("RGB", (width + o.left + o.right, height + o.top + o.bottom))
    canvas.paste(image, (o.left, o.top))
    nearest = Image.Resampling.NEAREST
    if o.left:
        canvas.paste(image.crop((0, 0, 1, height)).resize((o.left, height), nearest), (0, o.top))
    if o.right:
        canvas.paste(image.crop((width - 1, 0, width, height)).resize((o.right, height), nearest),
                     (o.left + width, o.top))
    full = canvas.width  # rows are extended after the columns, so the corners take the corner pixels' colours
    if o.top:
        canvas.paste(canvas.crop((0, o.top, full, o.top + 1)).resize((full, o.top), nearest), (0, 0))
    if o.bottom:
        row = o.top + height - 1
        canvas.paste(canvas.crop((0, row, full, row + 1)).resize((full, o.bottom), nearest), (0, row + 1))

    grown = Image.new("L", canvas.size, 255)
    grown.paste(mask, (o.left, o.top))
    if o.overlap:
        band = min(o.overlap, width, height)
        x0, y0, x1, y1 = o.left, o.top, o.left + width - 1, o.top + height - 1  # the original area, inclusive
        draw = ImageDraw.Draw(grown)
        for grows, box in (
            (o.left, (x0, y0, x0 + band - 1, y1)),
            (o.right, (x1 - band + 1, y0, x1, y1)),
            (o.top, (x0, y0, x1, y0 + band - 1)),
            (o.bottom, (x0, y1 - band + 1, x1, y1)),
        ):
            if grows:
                draw.rectangle(box, fill=255)
    return canvas, grown
