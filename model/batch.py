"""The state of one running batch: which rows belong to which request, their noise and conditioning.

Every image (row) owns a CPU generator seeded ``seed + i``. It draws, in diffusers' order: the VAE posterior
sample of the init image (img2img, and inpaint on a standard UNet or with strength < 1), the initial noise, the
posterior sample of the masked image (9-channel inpainting UNet), then any ancestral/eta noise of the sampler.
Nothing a row draws depends on its batch mates, so an image is the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core import rules
from model.device import to_device
from model.lcm import guidance_embedding
from model.lora_rows import RowAdapters
from model.requests import GenerationRequest, StepCallback, StepEvent
from model.samplers import SamplingPlan, StepControl

# (latents [B, C, h, w] in the UNet's dtype, timesteps [B], text context [B, 77 * chunks, D], the context positions
# each row attends to [B, 77 * chunks] bool or None = all[, SDXL's vector conditioning y [B, adm]]) -> ε [B, 4, h, w]
UNetFn = Callable[..., torch.Tensor]
Posterior = tuple[torch.Tensor, torch.Tensor | None]  # VAE posterior (mean, std) of one image, unscaled, float32;
# std None: a deterministic encoder (TAESD), whose latents draw no noise


class BatchCancelled(Exception):
    """Every request of the batch was cancelled: stop denoising."""


@dataclass(frozen=True)
class Denoiser:
    """The model a batch runs at every step."""

    unet: UNetFn
    dtype: torch.dtype  # the UNet's input dtype
    device: torch.device
    inpaint9: bool  # a 9-channel inpainting UNet: latents + mask + masked-image latents
    scaling_factor: float  # VAE latents -> UNet latents
    latent_scale: int  # image pixels per latent pixel along each side
    guidance_dim: int = 0  # an LCM-distilled UNet's guidance-embedding width: guidance goes in, never CFG


@dataclass(frozen=True)
class InputNeeds:
    """What the VAE must encode for a batch before it starts (the same for every request of one batch key)."""

    image: bool  # the init image's posterior (img2img; inpaint by blending or at strength < 1)
    masked: bool  # the masked image's posterior (9-channel inpainting UNet)
    mask: bool  # the mask at latent size

    @classmethod
    def of(cls, first: GenerationRequest, inpaint9: bool) -> InputNeeds:
        blend = first.task == "inpaint" and not inpaint9  # latent-mask blending on a standard UNet
        full = first.denoising_strength >= 1.0
        image = first.task == "img2img" or (first.task == "inpaint" and (blend or not full))
        return cls(image=image, masked=inpaint9, mask=inpaint9 or blend)


@dataclass
class EncodedInputs:
    """One request's inputs, ready for its rows: posteriors from the VAE and the mask at latent size."""

    image: Posterior | None = None
    masked: Posterior | None = None
    mask: torch.Tensor | None = None  # [1, 1, h, w], 1 = repaint


class Batch:
    def __init__(
        self,
        denoiser: Denoiser,
        requests: Sequence[GenerationRequest],
        inputs: Sequence[EncodedInputs],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        plan: SamplingPlan,
        adapters: RowAdapters | None = None,
        context_mask: torch.Tensor | None = None,
        vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``vectors``: SDXL's vector conditioning per request, (cond, uncond) [N, adm] (``model/sdxl.py``)."""
        self.denoiser = denoiser
        self.adapters = adapters  # per-request LoRA side paths (model.lora_rows), owned by row_request
        self.plan = plan
        first = requests[0]
        device = denoiser.device
        h, w = first.height // denoiser.latent_scale, first.width // denoiser.latent_scale
        self.inpaint9 = denoiser.inpaint9
        self.blend = first.task == "inpaint" and not self.inpaint9
        scale = denoiser.scaling_factor

        self.active_requests: list[int] = list(range(len(requests)))
        self.row_request = torch.tensor([k for k, r in enumerate(requests) for _ in range(r.n)], dtype=torch.long)
        self.generators = [
            torch.Generator("cpu").manual_seed(seed) for r in requests for seed in rules.image_seeds(r.seed, r.n)
        ]
        self.guidance = torch.tensor(
            [r.guidance_scale for r in requests for _ in range(r.n)], dtype=torch.float32, device=device
        )
        # the rows with classifier-free guidance, known on the host: choosing them on the device would sync each step
        self.guided_rows = [i for i, r in enumerate(r for r in requests for _ in range(r.n))
                            if r.guidance_scale > rules.GUIDANCE_OFF and not denoiser.guidance_dim]
        self.timestep_cond = self._guidance_input(denoiser)  # [rows, guidance_dim] or None
        self.guided = to_device(torch.tensor(self.guided_rows, dtype=torch.long), device)
        self.cond = cond[self.row_request.to(cond.device)]  # [rows, 77 * chunks, C]
        self.uncond = uncond[self.row_request.to(uncond.device)]
        # [rows, L]: a request's own text positions, when its prompts have fewer chunks than the longest (text_encoding)
        self.context_mask = None if context_mask is None else context_mask[self.row_request.to(context_mask.device)]
        self.y: torch.Tensor | None = None  # [rows, adm], in the UNet's dtype
        self.y_uncond: torch.Tensor | None = None
        if vectors is not None:
            self.y, self.y_uncond = (v.to(device, denoiser.dtype)[self.row_request.to(device)] for v in vectors)

        noise, image_latents, masks, masked_latents = [], [], [], []
        row = 0
        for r, encoded in zip(requests, inputs, strict=True):
            if encoded.mask is not None:
                masks.append(encoded.mask.to(device))
            for _ in range(r.n):
                g = self.generators[row]
                if encoded.image is not None:
                    image_latents.append(scale * posterior_sample(g, *encoded.image))
                noise.append(torch.randn((1, 4, h, w), generator=g, dtype=torch.float32))
                if encoded.masked is not None:
                    masked_latents.append(scale * posterior_sample(g, *encoded.masked))
                row += 1
        self.noise0 = to_device(torch.cat(noise), device)  # [rows, 4, h, w], the whole batch in one copy
        self.image_latents = torch.cat(image_latents) if image_latents else None
        self.start_latents = self.image_latents if first.denoising_strength < 1.0 else None
        self.masks = torch.cat(masks)[self.row_request.to(device)] if masks else None  # [rows, 1, h, w]
        self.masked_latents = torch.cat(masked_latents) if masked_latents else None

    def switch_model(self, denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor,
                     context_mask: torch.Tensor | None, vectors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Run the next steps on another UNet (SDXL's refiner), with its own per-request conditioning; the rows,
        their generators and latents stay as they are (cancelled requests stay out)."""
        rows = self.row_request
        self.denoiser, self.adapters = denoiser, None  # LoRAs belong to the first model
        self.cond, self.uncond = cond[rows.to(cond.device)], uncond[rows.to(uncond.device)]
        self.context_mask = None if context_mask is None else context_mask[rows.to(context_mask.device)]
        device = denoiser.device
        self.y, self.y_uncond = (v.to(device, denoiser.dtype)[rows.to(device)] for v in vectors)
        self.timestep_cond = self._guidance_input(denoiser)

    def _guidance_input(self, denoiser: Denoiser) -> torch.Tensor | None:
        if not denoiser.guidance_dim:
            return None
        return guidance_embedding(self.guidance, denoiser.guidance_dim).to(denoiser.device, denoiser.dtype)

    # what the sampler calls ----------------------------------------------------------------------------------
    def eps(self, model_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction with classifier-free guidance for the rows whose scale is above 1."""
        unet, dtype = self.denoiser.unet, self.denoiser.dtype
        x = model_input
        if self.inpaint9:
            x = torch.cat([x, self.masks, self.masked_latents], dim=1)  # type: ignore[list-item]
        guided, k = self.guided, len(self.guided_rows)
        inputs = torch.cat([x[guided], x]) if k else x
        context = torch.cat([self.uncond[guided], self.cond]) if k else self.cond
        ts = torch.cat([timesteps[guided], timesteps]) if k else timesteps
        mask = self.context_mask
        if mask is not None and k:
            mask = torch.cat([mask[guided], mask])
        args: tuple[torch.Tensor | None, ...] = (inputs.to(dtype), ts, context, mask)
        if self.y is not None and self.y_uncond is not None:
            args = (*args, torch.cat([self.y_uncond[guided], self.y]) if k else self.y)
        if self.timestep_cond is not None:  # no guided rows: an LCM-distilled UNet takes the scale itself
            args = (*args, *([] if self.y is not None else [None]), self.timestep_cond)
        if self.adapters is None:
            out = unet(*args).float()  # [k + rows, 4, h, w]
        else:  # UNet row -> request, for its LoRAs: the guided rows' unconditional passes, then every row
            owners = torch.cat([self.row_request[self.guided_rows], self.row_request]) if k else self.row_request
            with self.adapters.rows(owners):
                out = unet(*args).float()
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
        return to_device(torch.cat(rows), like.device)

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
        kept_rows = {old: new for new, old in enumerate(keep.tolist())}
        self.guided_rows = [kept_rows[i] for i in self.guided_rows if i in kept_rows]
        self.guided = to_device(torch.tensor(self.guided_rows, dtype=torch.long), dev.device)
        self.cond, self.uncond, self.noise0 = self.cond[dev], self.uncond[dev], self.noise0[dev]
        if self.context_mask is not None:
            self.context_mask = self.context_mask[dev]
        if self.y is not None and self.y_uncond is not None:
            self.y, self.y_uncond = self.y[dev], self.y_uncond[dev]
        if self.timestep_cond is not None:
            self.timestep_cond = self.timestep_cond[dev]
        if self.image_latents is not None:
            self.image_latents = self.image_latents[dev]
        if self.masks is not None:
            self.masks = self.masks[dev]
        if self.masked_latents is not None:
            self.masked_latents = self.masked_latents[dev]
        return keep


def posterior_sample(generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor | None) -> torch.Tensor:
    """A draw from the VAE posterior N(mean, std²), its noise from ``generator`` (on the CPU, as diffusers);
    ``mean`` itself, drawing nothing, for a deterministic encoder (std None)."""
    if std is None:
        return mean
    noise = torch.randn(std.shape, generator=generator, dtype=torch.float32).to(std.device)
    return mean + noise * std
