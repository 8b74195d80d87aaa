"""Input images for img2img / inpaint tests: encoded files, base64, and crafted headers."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

from PIL import Image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: a moved or resampled pixel shows, and the file does not compress."""
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_b64(image: Image.Image) -> str:
    return b64(encode(image))


def png_header(width: int, height: int) -> bytes:
    """A small, valid-looking PNG that declares ``width`` x ``height`` pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def white_box(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A black L mask with a white rectangle ``box`` = (left, top, right, bottom), right/bottom exclusive."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask
