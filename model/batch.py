"""The state of one running batch: which rows belong to which request, their noise and conditioning.

Every image (row) owns a CPU generator seeded ``seed + i``. It draws, in diffusers' order: the VAE posterior
sample of the init image (img2img, and inpaint on a standard UNet or with strength < 1), the initial noise, the
posterior sample of the masked image (9-channel inpainting UNet), then any ancestral/eta noise of the sampler.
Nothing a row draws depends on its batch mates, so an image is the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.images import image_to_tensor, mask_to_tensor
from model.requests import GenerationRequest, StepCallback, StepEvent
from model.samplers import SamplingPlan, StepControl

if TYPE_CHECKING:
    from model.pipeline import Pipeline


class BatchCancelled(Exception):
    """Every request of the batch was cancelled: stop denoising."""


class Batch:
    def __init__(
        self,
        pipe: Pipeline,
        requests: Sequence[GenerationRequest],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        plan: SamplingPlan,
    ) -> None:
        self.pipe = pipe
        self.plan = plan
        first = requests[0]
        device = pipe.device
        h, w = first.height // pipe.vae_scale, first.width // pipe.vae_scale
        self.inpaint9 = pipe.is_inpaint
        self.blend = first.task == "inpaint" and not self.inpaint9  # latent-mask blending on a standard UNet
        strength_max = first.task == "txt2img" or first.strength >= 1.0
        needs_image = first.task == "img2img" or (first.task == "inpaint" and (self.blend or not strength_max))
        scale = pipe.components.scaling_factor

        self.active_requests: list[int] = list(range(len(requests)))
        self.row_request = torch.tensor([k for k, r in enumerate(requests) for _ in range(r.n)], dtype=torch.long)
        self.generators = [
            torch.Generator("cpu").manual_seed(r.seed + i) for r in requests for i in range(r.n)
        ]
        self.guidance = torch.tensor(
            [r.guidance_scale for r in requests for _ in range(r.n)], dtype=torch.float32, device=device
        )
        self.cond = cond[self.row_request.to(cond.device)]  # [rows, 77, C]
        self.uncond = uncond[self.row_request.to(uncond.device)]

        noise, image_latents, masks, masked_latents = [], [], [], []
        row = 0
        for r in requests:
            pixels = self._pixels(r)  # [1, 3, H, W]
            mask = self._mask(r)  # [1, 1, H, W], 1 = repaint
            if needs_image:
                mean, std = pipe.encode_image(pixels)
            if self.inpaint9 or self.blend:
                masks.append(F.interpolate(mask, size=(h, w)).to(device))
            if self.inpaint9:
                masked_mean, masked_std = pipe.encode_image(pixels * (mask < 0.5).to(pixels.dtype))
            for _ in range(r.n):
                g = self.generators[row]
                if needs_image:
                    image_latents.append(scale * (mean + posterior_noise(g, std) * std))
                noise.append(torch.randn((1, 4, h, w), generator=g, dtype=torch.float32).to(device))
                if self.inpaint9:
                    masked_latents.append(scale * (masked_mean + posterior_noise(g, masked_std) * masked_std))
                row += 1
        self.noise0 = torch.cat(noise)  # [rows, 4, h, w]
        self.image_latents = torch.cat(image_latents) if image_latents else None
        self.start_latents = self.image_latents if not strength_max else None
        self.masks = torch.cat(masks)[self.row_request.to(device)] if masks else None  # [rows, 1, h, w]
        self.masked_latents = torch.cat(masked_latents) if masked_latents else None

    # inputs --------------------------------------------------------------------------------------------------
    @staticmethod
    def _pixels(r: GenerationRequest) -> torch.Tensor:
        if r.init_image is None:  # txt2img or img2img on an inpainting UNet: an empty (grey) canvas
            return torch.zeros(1, 3, r.height, r.width)
        return image_to_tensor(r.init_image, r.width, r.height)

    @staticmethod
    def _mask(r: GenerationRequest) -> torch.Tensor:
        if r.task != "inpaint" or r.mask is None:  # an inpainting UNet asked for txt2img/img2img repaints all
            return torch.ones(1, 1, r.height, r.width)
        return mask_to_tensor(r.mask, r.width, r.height)

    # what the sampler calls ----------------------------------------------------------------------------------
    def eps(self, model_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction with classifier-free guidance for the rows whose scale is above 1."""
        unet = self.pipe.components.unet
        dtype = self.pipe.precision.unet
        x = model_input
        if self.inpaint9:
            x = torch.cat([x, self.masks, self.masked_latents], dim=1)  # type: ignore[list-item]
        guided = torch.nonzero(self.guidance > 1.0).flatten()
        k = guided.numel()
        inputs = torch.cat([x[guided], x]) if k else x
        context = torch.cat([self.uncond[guided], self.cond]) if k else self.cond
        ts = torch.cat([timesteps[guided], timesteps]) if k else timesteps
        out = unet(inputs.to(dtype), ts, context).float()  # [k + rows, 4, h, w]
        eps = out[k:].clone()
        if k:
            eps_uncond = out[:k]
            scale = self.guidance[guided].view(-1, 1, 1, 1)
            eps[guided] = eps_uncond + scale * (eps[guided] - eps_uncond)
        return eps

    def step_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh noise for the sampler: row b from image b's own generator."""
        shape = (1, *like.shape[1:])
        rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(like.device)

    def step_callback(self, user: StepCallback | None) -> Callable[[int, torch.Tensor], StepControl | None]:
        total = self.plan.num_steps

        def on_step(i: int, x: torch.Tensor) -> StepControl | None:
            keep = None
            if user is not None:
                event = StepEvent(step=i + 1, total=total, active=list(self.active_requests), latents=x)
                cancelled = set(user(event) or ()) & set(self.active_requests)
                if cancelled:
                    keep = self._drop(cancelled)
                    x = x[keep.to(x.device)]
            latents = None
            if self.blend:
                assert self.image_latents is not None and self.masks is not None
                proper = self.image_latents
                if i + 1 < total:  # diffusers blends with the clean image after the last step
                    proper = self.plan.add_noise(self.image_latents, self.noise0, i + 1)
                latents = (1 - self.masks) * proper + self.masks * x
            if keep is None and latents is None:
                return None
            return StepControl(keep=keep, latents=latents)

        return on_step

    def _drop(self, cancelled: set[int]) -> torch.Tensor:
        """Remove the rows of ``cancelled`` requests from every per-row tensor; returns the kept row indices."""
        self.active_requests = [k for k in self.active_requests if k not in cancelled]
        if not self.active_requests:
            raise BatchCancelled
        keep_mask = torch.tensor([int(k) not in cancelled for k in self.row_request.tolist()])
        keep = torch.nonzero(keep_mask).flatten()
        dev = keep.to(self.noise0.device)
        self.row_request = self.row_request[keep]
        self.generators = [g for g, kept in zip(self.generators, keep_mask.tolist(), strict=True) if kept]
        self.guidance = self.guidance[dev]
        self.cond, self.uncond, self.noise0 = self.cond[dev], self.uncond[dev], self.noise0[dev]
        if self.image_latents is not None:
            self.image_latents = self.image_latents[dev]
        if self.masks is not None:
            self.masks = self.masks[dev]
        if self.masked_latents is not None:
            self.masked_latents = self.masked_latents[dev]
        return keep


def posterior_noise(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A standard normal draw shaped like ``like`` (a VAE posterior sample's noise), from ``generator``."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)
