"""PIL <-> tensor conversions, the way diffusers' image processor does them, plus the cheap latent preview."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Approximate linear map from SD 1.x latents to RGB (a well-known community fit), for previews only.
_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1]; resized with Lanczos if its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int, invert: bool = False) -> torch.Tensor:
    """Grayscale mask -> [1, 1, H, W] of 0/1 (1 = repaint), binarised at 0.5 like diffusers."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    binary = (array >= 0.5) if not invert else (array < 0.5)
    return torch.from_numpy(binary.astype(np.float32))[None, None]


def tensor_to_images(decoded: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images, rounded like diffusers' numpy_to_pil."""
    array = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    array = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def latents_to_preview(latents: torch.Tensor, max_side: int = 256) -> list[Image.Image]:
    """Cheap RGB previews of [B, 4, h, w] latents (no VAE): one matrix product per pixel."""
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), _LATENT_RGB)  # [B, 3, h, w]
    images = tensor_to_images(rgb.clamp(-1, 1))
    out = []
    for image in images:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        out.append(image.resize(size, Image.Resampling.BILINEAR))
    return out
