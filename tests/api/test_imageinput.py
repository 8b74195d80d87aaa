"""Guarded decoding and preparation of img2img / inpaint inputs (Pillow only, no server)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from PIL import Image, ImageChops

from api.imageinput import (
    ImageInputError,
    ImageLimits,
    decode_base64,
    open_image,
    prepare_img2img,
    prepare_inpaint,
    to_mask,
    to_rgb,
)
from core.jobs import Img2ImgRequest, InpaintRequest
from tests.images import b64, encode, noise_image, png_b64, png_header, white_box

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4096 * 4096)


def refused(call: Any, *args: Any) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        call(*args)
    return info.value


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and ImageChops.difference(a, b).getbbox() is None


def img2img(image: Image.Image, **fields: Any) -> Img2ImgRequest:
    return Img2ImgRequest(prompt="a cat", image=png_b64(image), **fields)


def inpaint(image: Image.Image, mask: Image.Image | None, **fields: Any) -> InpaintRequest:
    return InpaintRequest(prompt="a cat", image=png_b64(image), mask=None if mask is None else png_b64(mask),
                          **fields)


# decoding ----------------------------------------------------------------------------------------------------------
def test_base64_plain_data_url_and_line_wrapped_decode_to_the_same_bytes() -> None:
    data = encode(noise_image(16, 16))
    text = b64(data)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    for form in (text, f"data:image/png;base64,{text}", "DATA:image/png;base64," + wrapped, wrapped):
        assert decode_base64("image", form, LIMITS) == data


@pytest.mark.parametrize(("text", "rule"), [
    ("not base64!", "image is not valid base64"),
    ("aGVsbG8", "image is not valid base64"),  # missing padding
    ("data:image/png,iVBORw0K", "image is a data: URL without ';base64,'"),
    ("", "image is empty"),
])
def test_invalid_base64_names_the_field(text: str, rule: str) -> None:
    error = refused(decode_base64, "image", text, LIMITS)
    assert error.field == "image" and rule in error.message and not error.too_large


def test_oversized_base64_is_refused_from_its_length_before_decoding() -> None:
    limits = ImageLimits(max_bytes=3000, max_pixels=LIMITS.max_pixels)
    error = refused(decode_base64, "mask", "!" * 4004, limits)  # not even base64: never decoded
    assert error.too_large and error.field == "mask"
    assert error.message == "mask is 3,003 bytes, more than the 3,000-byte limit (SDQ_MAX_IMAGE_BYTES)"
    assert len(decode_base64("mask", b64(b"x" * 3000), limits)) == 3000  # exactly the limit passes


@pytest.mark.parametrize(("data", "found"), [
    (encode(noise_image(8, 8), "GIF"), "a GIF image"),
    (encode(noise_image(8, 8), "BMP"), "a BMP image"),
    (b"hello, world", "data that is not an image"),
])
def test_only_png_jpeg_and_webp_are_accepted(data: bytes, found: str) -> None:
    error = refused(open_image, "image", data, LIMITS)
    assert error.message == f"image must be a PNG, JPEG or WebP image, got {found}"


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    bomb = png_header(5000, 5000)  # 100-odd bytes declaring 25 megapixels
    error = refused(open_image, "image", bomb, LIMITS)
    assert error.message == ("image is 5000x5000 = 25,000,000 pixels, more than the 16,777,216-pixel limit "
                             "(SDQ_MAX_IMAGE_PIXELS)")


def test_a_header_beyond_pillows_own_bomb_limit_is_refused_too() -> None:
    error = refused(open_image, "mask", png_header(100_000, 100_000), ImageLimits(1 << 20, 10**12))
    assert error.field == "mask" and "declares too many pixels" in error.message


def test_undecodable_pixels_are_a_422_not_a_crash() -> None:
    data = encode(noise_image(64, 64))
    error = refused(open_image, "image", data[: len(data) // 2], LIMITS)
    assert error.message.startswith("image could not be decoded as PNG")


def test_exif_orientation_is_applied() -> None:
    source = noise_image(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    image = open_image("image", encode(source, "JPEG", exif=exif, quality=95), LIMITS)
    assert image.size == (32, 48)


def test_alpha_is_flattened_on_white_for_images_and_on_black_for_masks() -> None:
    rgba = Image.new("RGBA", (8, 8), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (200, 10, 10, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(rgba).getpixel((1, 0)) == (200, 10, 10)
    white = Image.new("LA", (8, 8), (255, 255))
    white.putpixel((0, 0), (255, 0))
    assert to_mask(white).getpixel((0, 0)) == 0 and to_mask(white).getpixel((1, 0)) == 255


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.new("I;16", (2, 1))
    grey.putpixel((0, 0), 32768)
    grey.putpixel((1, 0), 65535)
    decoded = open_image("mask", encode(grey), LIMITS)
    assert [to_mask(decoded).getpixel((x, 0)) for x in (0, 1)] == [128, 255]


# sizes ---------------------------------------------------------------------------------------------------------------
def test_sides_round_down_to_multiples_of_8_by_cropping_right_and_bottom() -> None:
    source = noise_image(75, 67)
    prepared = prepare_img2img(img2img(source), LIMITS)
    assert same(prepared.image, source.crop((0, 0, 72, 64)))  # no pixel moved or resampled


def test_strict_size_rule_refuses_instead() -> None:
    strict = ImageLimits(LIMITS.max_bytes, LIMITS.max_pixels, "strict")
    error = refused(prepare_img2img, img2img(noise_image(75, 64)), strict)
    assert error.field == "image"
    assert error.message == ("image width is 75 px, not a multiple of 8 (SDQ_IMAGE_SIZE_RULE=strict): crop it, or "
                             "pass width and height")
    assert prepare_img2img(img2img(noise_image(72, 64)), strict).image.size == (72, 64)


@pytest.mark.parametrize(("size", "rule"), [
    ((40, 64), "image width is 40 px; at least 64 are needed"),
    ((64, 2100), "image height is 2100 px, more than 2048: pass width and height"),
])
def test_sides_out_of_range_are_refused_unless_width_and_height_scale_them(
    size: tuple[int, int], rule: str
) -> None:
    error = refused(prepare_img2img, img2img(noise_image(*size)), LIMITS)
    assert rule in error.message
    assert prepare_img2img(img2img(noise_image(*size), width=64, height=128), LIMITS).image.size == (64, 128)


def test_width_and_height_scale_by_resize_mode() -> None:
    source = Image.new("RGB", (100, 50), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 20, 50))  # a blue strip at the left
    stretched = prepare_img2img(img2img(source, width=64, height=64), LIMITS).image
    cropped = prepare_img2img(img2img(source, width=64, height=64, resize_mode="crop"), LIMITS).image
    assert stretched.size == cropped.size == (64, 64)
    assert stretched.getpixel((2, 32)) == (0, 0, 255)  # the blue strip, squeezed
    assert cropped.getpixel((2, 32)) == (255, 0, 0)  # the centre square only: the strip was cut off


def test_only_width_given_keeps_the_images_height() -> None:
    prepared = prepare_img2img(img2img(noise_image(80, 72), width=64), LIMITS)
    assert prepared.image.size == (64, 72)


# masks ---------------------------------------------------------------------------------------------------------------
def test_mask_is_binary_without_blur_and_inverts() -> None:
    image, box = noise_image(64, 64), white_box(64, 64, (16, 16, 48, 40))
    plain = prepare_inpaint(inpaint(image, box, mask_blur=0), LIMITS)
    inverted = prepare_inpaint(inpaint(image, box, mask_blur=0, invert_mask=True), LIMITS)
    assert plain.mask is not None and inverted.mask is not None
    assert same(plain.mask, box) and same(inverted.mask, Image.eval(box, lambda v: 255 - v))
    assert same(plain.image, image)


def test_mask_blur_softens_only_near_the_edge() -> None:
    box = white_box(64, 64, (16, 16, 48, 48))
    mask = prepare_inpaint(inpaint(noise_image(64, 64), box, mask_blur=4), LIMITS).mask
    assert mask is not None
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((1, 1)) == 0
    edge = mask.getpixel((16, 32))
    assert isinstance(edge, int) and 0 < edge < 255  # on the edge
    assert mask.crop((0, 0, 64, 2)).getbbox() is None  # far from the box: untouched


def test_mask_must_match_the_image_size() -> None:
    error = refused(prepare_inpaint, inpaint(noise_image(64, 64), white_box(32, 64, (0, 0, 8, 8))), LIMITS)
    assert error.field == "mask" and error.message == "mask is 32x64 but image is 64x64: they must be the same size"


def test_mask_is_required_without_outpaint_and_must_mark_something() -> None:
    assert refused(prepare_inpaint, inpaint(noise_image(64, 64), None), LIMITS).message == (
        "mask is required for inpaint unless outpaint is set")
    black = Image.new("L", (64, 64), 0)
    assert "mask marks nothing to repaint" in refused(prepare_inpaint, inpaint(noise_image(64, 64), black),
                                                      LIMITS).message


# outpaint ------------------------------------------------------------------------------------------------------------
def test_outpaint_grows_the_canvas_by_edge_extension_and_masks_the_new_area() -> None:
    source = noise_image(64, 64)
    prepared = prepare_inpaint(inpaint(source, None, mask_blur=0, outpaint={"left": 16, "top": 8}), LIMITS)
    image, mask = prepared.image, prepared.mask
    assert mask is not None and image.size == mask.size == (80, 72)
    assert same(image.crop((16, 8, 80, 72)), source)
    assert image.getpixel((3, 30)) == source.getpixel((0, 22))  # a left margin pixel repeats the row's first
    assert image.getpixel((40, 2)) == source.getpixel((24, 0))  # a top margin pixel repeats the column's first
    assert image.getpixel((0, 0)) == source.getpixel((0, 0))  # the corner takes the corner's colour
    expected = Image.new("L", (80, 72), 255)
    expected.paste(0, (16, 8, 80, 72))
    assert same(mask, expected)


def test_outpaint_overlap_repaints_a_band_of_the_original_and_keeps_a_given_mask() -> None:
    source, box = noise_image(64, 64), white_box(64, 64, (40, 40, 48, 48))
    mask = prepare_inpaint(inpaint(source, box, mask_blur=0, outpaint={"right": 8, "overlap": 4}), LIMITS).mask
    assert mask is not None and mask.size == (72, 64)
    expected = Image.new("L", (72, 64), 0)
    expected.paste(255, (60, 0, 72, 64))  # 4 px of the original + the 8 px margin
    expected.paste(255, (40, 40, 48, 48))
    assert same(mask, expected)


def test_outpaint_canvas_follows_the_size_rule() -> None:
    prepared = prepare_inpaint(inpaint(noise_image(64, 64), None, outpaint={"left": 5, "bottom": 70}), LIMITS)
    assert prepared.image.size == (64, 128)  # 69 x 134 rounded down: the 5 px strip at the right goes


def test_outpaint_must_grow_something() -> None:
    with pytest.raises(ValueError, match="outpaint must add pixels on at least one side"):
        inpaint(noise_image(64, 64), None, outpaint={"overlap": 8})


def test_base64_of_each_allowed_format_round_trips_through_prepare() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        request = img2img(noise_image(64, 64))
        request.image = base64.b64encode(encode(noise_image(64, 64), fmt)).decode()
        assert prepare_img2img(request, LIMITS).image.size == (64, 64)
