"""The SD pipeline (1.x, 2.x, SDXL): a list of requests in, one batched denoising loop, images out.

Stages (as in diffusers' StableDiffusionPipeline.__call__, for a heterogeneous batch):
  1. check the requests and that they can share one batch
  2. encode prompts and negative prompts (CLIP; weights and 75-token chunks as A1111, ``text_encoding.py``; SDXL:
     both text encoders, the pooled embedding and the size conditioning, ``sdxl.py``)
  3. prepare latents: per image a CPU generator seeded ``seed + i`` (see ``noise.py``)
  4. denoise: one UNet call per step for the whole batch, classifier-free guidance per sample
  5. decode with the VAE (in slices, big images in tiles: ``vae_decode.py``) and convert to PIL images
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from core import rules
from model.batch import Batch, BatchCancelled, Denoiser, EncodedInputs, InputNeeds, Posterior, UNetFn
from model.compile import CompileMode, compile_decode, compile_network
from model.cpu_choice import PathChooser
from model.cpu_choice_store import ChoiceStore
from model.cpu_tuning import tune_networks, tune_process
from model.device import Precision, resolve_device, resolve_precision
from model.images import image_to_tensor, latents_to_preview, mask_to_tensor, tensor_to_images
from model.lora_rows import NO_LORA, LoraBatch, LoraLibrary
from model.open_clip import pad_token_for
from model.prediction import PredictionChoice, choose_prediction_type
from model.refiner import Refiner, is_refiner_checkpoint, load_refiner
from model.requests import GenerationRequest, GenerationResult, StepCallback, VaeChoice
from model.samplers import initial_latents, make_plan, sample
from model.schedule import NoiseSchedule
from model.sdxl import request_vectors
from model.taesd import TinyAutoencoder, load_tiny_vae
from model.text_cache import Key, TextEmbeddings
from model.text_encoding import encode_prompts
from model.tokenizer import ClipTokenizer
from model.vae_decode import DecodeFn, decode_latents, slice_rows
from model.warmup import BatchPadding
from model.weights import Components, load_components

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # longest side of a TAESD preview, as the cheap previews


class Pipeline:
    """A resident SD 1.x model. ``generate`` runs a list of compatible requests as one batch."""

    def __init__(
        self,
        components: Components,
        tokenizer: ClipTokenizer,
        schedule: NoiseSchedule,
        device: torch.device,
        precision: Precision,
        name: str,
    ) -> None:
        self.components = components
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.device = device
        self.precision = precision
        self.name = name
        self.text = TextEmbeddings(components.text_encoder, components.text_encoder_2, tokenizer.eos_id, device,
                                   precision.unet)
        self.loras = LoraLibrary(components.unet, components.text_encoder, device,
                                 {"unet": precision.unet, "text": precision.text, "text2": precision.text},
                                 text_encoder_2=components.text_encoder_2)
        self.tiny_vae: TinyAutoencoder | None = None  # TAESD (use_tiny_vae): "vae": "tiny" requests and previews
        # what a batch without LoRAs runs (compiled by use_compile), and the full VAE's decode
        self.fast_unet: UNetFn = components.unet
        self.vae_decode: DecodeFn = components.vae.decode
        self.batch_padding: BatchPadding | None = None  # set by a worker that pads batches to warmed sizes
        self.refiner: Refiner | None = None  # SDXL: the second stage of requests with refiner_switch
        self.cpu_choices: ChoiceStore | None = None  # where the CPU self-check keeps its choices (load)
        self.cpu_choosers: list[PathChooser] = []  # the CPU self-check of each packed network

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        tiny_vae: str | Path | None = None,
        compile_mode: CompileMode = "off",
        prediction_type: PredictionChoice = "auto",
        cpu_choices: Path | None = None,
    ) -> Pipeline:
        """Load a single-file checkpoint or diffusers folder from a local path onto ``device``, and optionally a
        tiny VAE (TAESD, ``model/taesd.py``). ``prediction_type`` "auto": the folder's scheduler config, or for a
        single file the rule of ``model/prediction.py``; "epsilon" / "v_prediction" overrule both.
        ``cpu_choices``: a file where the CPU self-check keeps its choices for later processes
        (``model/cpu_choice_store.py``); None measures in every process."""
        dev = resolve_device(device)
        precision = resolve_precision(dev, dtype)
        components = load_components(
            checkpoint,
            device=dev,
            dtype=precision.unet,
            vae_dtype=precision.vae,
            text_dtype=precision.text,
            allow_pickle=allow_pickle,
        )
        if components.tokenizer_dir is not None:
            tokenizer = ClipTokenizer.from_folder(components.tokenizer_dir)
        else:
            tokenizer = ClipTokenizer.bundled(pad_token_for(components.text_encoder.config))
        positions = components.text_encoder.config.max_position_embeddings
        if tokenizer.max_length > positions:
            raise ValueError(f"the tokenizer's model_max_length ({tokenizer.max_length}) exceeds the text encoder's "
                             f"{positions} positions: fix tokenizer/tokenizer_config.json")
        if components.scheduler_config is not None:
            schedule = NoiseSchedule.from_diffusers_config(components.scheduler_config)
        else:
            schedule = NoiseSchedule.sd15()
        schedule = dataclasses.replace(schedule, prediction_type=choose_prediction_type(components, prediction_type))
        store = ChoiceStore(cpu_choices) if cpu_choices is not None and dev.type == "cpu" else None
        choosers = _tune_for_cpu(components, precision, store) if dev.type == "cpu" else []
        log.info("loaded %s on %s (unet %s, vae %s)", checkpoint, dev, precision.unet, precision.vae)
        pipe = cls(components, tokenizer, schedule, dev, precision, Path(checkpoint).stem)
        pipe.cpu_choices = store
        pipe.cpu_choosers = choosers
        if components.tokenizer_2_dir is not None:
            pipe.text.pad_id_2 = ClipTokenizer.from_folder(components.tokenizer_2_dir).pad_id
        if tiny_vae is not None:
            pipe.use_tiny_vae(tiny_vae)
        pipe.use_compile(compile_mode)
        return pipe

    def use_compile(self, mode: CompileMode) -> None:
        """``torch.compile`` the UNet (for batches without LoRAs) and the VAE decoder (``model/compile.py``)."""
        self.fast_unet = compile_network(self.components.unet, mode, self.device)
        self.vae_decode = compile_decode(self.components.vae, mode, self.device)

    def use_refiner(self, path: str | Path) -> None:
        """Load an SDXL refiner (``model/refiner.py``) for requests with ``refiner_switch``."""
        if not self.components.is_sdxl:
            raise ValueError("a refiner needs an SDXL base model; this one is not SDXL")
        if not is_refiner_checkpoint(Path(path).expanduser()):
            raise ValueError(f"{path} is not an SDXL refiner: a .safetensors file with OpenCLIP ViT-bigG under "
                             "conditioner.embedders.0.model., or a diffusers folder with text_encoder_2/ and no "
                             "text_encoder/")
        parts = load_refiner(path, device=self.device, dtype=self.precision.unet, text_dtype=self.precision.text)
        if self.device.type == "cpu":
            self.cpu_choosers += tune_networks(
                [(parts.unet, self.precision.unet, False), (parts.text_encoder, self.precision.text, True)],
                label="Refiner", store=self.cpu_choices)
        self.refiner = Refiner(parts, self.device, self.precision.unet, Path(path).stem)

    def use_tiny_vae(self, path: str | Path) -> None:
        """Load TAESD for requests with ``vae="tiny"`` (decode, and encode for image tasks) and for previews."""
        self.tiny_vae = load_tiny_vae(path, device=self.device, dtype=self.precision.vae)
        if self.device.type != "cpu":
            return
        # as for the other networks; TAESD 512x512 decode measured 1.38 s packed, 1.50 s NHWC, 1.69 s plain,
        # diffusers 1.86 s (2 busy cores)
        self.cpu_choosers += tune_networks([(self.tiny_vae, self.precision.vae, False)], store=self.cpu_choices)

    def settle_cpu_self_check(self) -> bool:
        """Fix the path of every layer kind the CPU self-check has measured so far; returns True when no later pass
        mixes packed and plain layers: every packed network's self-check has seen a pass (a warm-up, an earlier
        batch), or nothing is packed. The worker's first batch then needs no extra step (``worker/runner.py``)."""
        return all([chooser.settle_measured() for chooser in self.cpu_choosers])  # a list: settle every one

    @property
    def is_inpaint(self) -> bool:
        return self.components.is_inpaint

    @property
    def default_size(self) -> int:
        """The side the model was trained for: SDXL 1024, SD 2.x v-prediction (768-v) 768, else 512."""
        if self.components.is_sdxl:
            return 1024
        return 768 if self.schedule.prediction_type == "v_prediction" else 512

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel along each side: the VAE's, 8 for every SD VAE."""
        return self.components.vae.config.downsample_factor

    # 1. checks ---------------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError naming the field and the rule when ``request`` cannot run (the rules of ``core.rules``,
        which the API applies too)."""
        r = request
        if r.task not in ("txt2img", "img2img", "inpaint"):
            raise ValueError(f"task must be one of txt2img, img2img, inpaint; got {r.task!r}")
        for name, side in (("width", r.width), ("height", r.height)):
            rules.check_side(name, side)
            if side % self.latent_scale:  # a VAE of another depth than the SD ones the rules assume
                raise ValueError(f"{name} must be a multiple of {self.latent_scale} for this VAE, got {side}")
        if not 1 <= r.steps <= rules.MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {rules.MAX_STEPS}, got {r.steps}")
        if not math.isfinite(r.guidance_scale) or not 0 <= r.guidance_scale <= rules.MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be a finite number in [0, {rules.MAX_GUIDANCE:g}], "
                             f"got {r.guidance_scale}")
        if not 0.0 <= r.eta <= 1.0:
            raise ValueError(f"eta must be between 0 and 1, got {r.eta}")
        rules.check_sampler_options(r.sampler, karras=r.karras, eta=r.eta)
        rules.check_steps(r.sampler, r.steps)
        if r.refiner_switch is not None:
            if self.refiner is None:
                raise ValueError("refiner: this worker holds no SDXL refiner")
            if self.is_inpaint:
                raise ValueError("refiner: an inpainting model's latents carry the mask and the masked image, and "
                                 "the refiner takes plain latents; inpaint with the refiner on a standard SDXL model")
            rules.check_refiner_switch(r.refiner_switch)
        if r.vae == "tiny" and self.tiny_vae is None:
            raise ValueError("vae 'tiny' needs a tiny VAE (TAESD), and none is loaded with this model")
        if not 1 <= r.n <= rules.MAX_IMAGES:
            raise ValueError(f"n must be between 1 and {rules.MAX_IMAGES}, got {r.n}")
        if not 0 <= r.seed <= rules.MAX_SEED:
            raise ValueError(f"seed must be between 0 and {rules.MAX_SEED}, got {r.seed}")
        if r.task != "txt2img":
            if not 0.0 <= r.strength <= 1.0:
                raise ValueError(f"strength must be between 0 and 1, got {r.strength}")
            if r.init_image is None:
                raise ValueError(f"init_image is required for {r.task}")
            if r.init_image.size != (r.width, r.height):
                w, h = r.init_image.size
                raise ValueError(f"init_image is {w}x{h} but width x height is {r.width}x{r.height}")
        if len(r.loras) > rules.MAX_LORAS:
            raise ValueError(f"at most {rules.MAX_LORAS} loras per request, got {len(r.loras)}")
        for ref in r.loras:
            if not math.isfinite(ref.scale) or abs(ref.scale) > rules.MAX_LORA_SCALE:
                raise ValueError(f"lora {ref.name!r}: scale must be a finite number in "
                                 f"[-{rules.MAX_LORA_SCALE:g}, {rules.MAX_LORA_SCALE:g}], got {ref.scale}")
            self.loras.load(ref)  # a file that does not fit this model fails its request here, alone
        if r.task == "inpaint":
            if r.mask is None:
                raise ValueError("mask is required for inpaint")
            if r.init_image is not None and r.mask.size != r.init_image.size:
                raise ValueError(f"mask is {r.mask.size[0]}x{r.mask.size[1]} but init_image is "
                                 f"{r.init_image.size[0]}x{r.init_image.size[1]}: they must match")

    # the whole call ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerationRequest], callback: StepCallback | None = None
    ) -> list[GenerationResult | None]:
        """Run ``requests`` as one batch. A request cancelled through ``callback`` gets ``None``."""
        if not requests:
            return []
        if self.batch_padding is not None and (padded := self.batch_padding.generate(self, requests, callback)):
            return padded
        for r in requests:
            self.check(r)
        keys = {r.batch_key() for r in requests}
        if len(keys) > 1:
            raise ValueError(f"requests cannot share a batch: their batch keys differ: {sorted(keys)}")
        first = requests[0]
        plan = make_plan(self.schedule, first.sampler, first.steps, karras=first.karras,
                         strength=first.denoising_strength)

        lora = self.loras.batch(requests)

        # 2. text
        # SDXL: (request, token ids of a chunk) -> its pooled embedding (requests' text LoRAs differ)
        pooled: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

        def encode_rows(ids: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
            context, pooled_rows = self._encode_text(ids, lora, owners)
            if pooled_rows is not None:
                pooled.update(zip(zip(owners, map(tuple, ids.tolist()), strict=True), pooled_rows, strict=True))
            return context

        text = encode_prompts(self.tokenizer, encode_rows, [r.prompt for r in requests],
                              [r.negative_prompt for r in requests])
        vectors = request_vectors(requests, text.prompts, text.negatives, pooled) if pooled else None

        # 3. latents, per image from its own generator
        inputs = self._encode_inputs(requests, InputNeeds.of(first, self.is_inpaint))
        denoiser = self._denoiser(eager=lora.unet is not None)
        batch = Batch(denoiser, requests, inputs, text.cond, text.uncond, plan, lora.unet, text.mask, vectors)
        x = initial_latents(plan, batch.noise0, batch.start_latents)
        if plan.num_steps == 0:  # strength 0: nothing to denoise, the input comes back (through the VAE)
            final = x
        else:
            # 4. denoise (SDXL with a refiner: the base down to the switch, then the refiner)
            switch = plan.num_steps
            if first.refiner_switch is not None:
                switch = plan.steps_before(first.refiner_switch, self.schedule.num_train_timesteps)
            on_step = batch.step_callback(callback)
            try:
                final = sample(plan, batch.eps, x, noise=batch.step_noise, eta=first.eta, callback=on_step,
                               stop=switch)
                if switch < plan.num_steps and final.shape[0]:
                    assert self.refiner is not None  # check() refused the request otherwise
                    refined, y, y_uncond = self.refiner.condition(requests)
                    denoiser = Denoiser(self.refiner.unet, self.precision.unet, self.device, False,
                                        self.components.scaling_factor, self.latent_scale,
                                        self.refiner.unet.config.time_cond_proj_dim)
                    batch.switch_model(denoiser, refined.cond, refined.uncond, refined.mask, (y, y_uncond))
                    final = sample(plan, batch.eps, final, noise=batch.step_noise, eta=first.eta, callback=on_step,
                                   start=switch)
            except BatchCancelled:
                return [None] * len(requests)

        # 5. decode
        images = self._decode(final, [requests[k].vae for k in batch.active_requests for _ in range(requests[k].n)])
        results: list[GenerationResult | None] = [None] * len(requests)
        offset = 0
        for req_index in batch.active_requests:
            r = requests[req_index]
            results[req_index] = GenerationResult(
                images=images[offset : offset + r.n],
                seeds=rules.image_seeds(r.seed, r.n),
                prompt_truncated=text.prompts[req_index].truncated,
                negative_prompt_truncated=text.negatives[req_index].truncated,
                prompt_tokens=text.prompts[req_index].num_tokens,
                negative_prompt_tokens=text.negatives[req_index].num_tokens,
                prompt_chunks=text.chunks[req_index],
            )
            offset += r.n
        # Each network this batch ran has had a pass: fix (and store) the CPU self-check's kinds it measured, those
        # whose layers ran once and filled neither budget too (the VAE decoder's), so no later call measures them.
        self.settle_cpu_self_check()
        return results

    # helpers -------------------------------------------------------------------------------------------------
    def _encode_text(self, ids: torch.Tensor, lora: LoraBatch = NO_LORA, owners: Sequence[int] = ()
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.text.encode(ids, lora, owners)  # model/text_cache.py

    @property
    def _text_cache(self) -> OrderedDict[Key, tuple[torch.Tensor, torch.Tensor | None]]:
        return self.text.cache

    def _denoiser(self, eager: bool = False) -> Denoiser:
        """``eager``: the module itself, whose LoRA side paths change per batch; else the compiled one, if any."""
        c = self.components
        unet = c.unet if eager else self.fast_unet
        return Denoiser(unet, self.precision.unet, self.device, c.is_inpaint, c.scaling_factor, self.latent_scale,
                        c.unet.config.time_cond_proj_dim)

    def _encode_inputs(self, requests: Sequence[GenerationRequest], needs: InputNeeds) -> list[EncodedInputs]:
        """What each request's rows start from: its image's posteriors and its mask at latent size."""
        out = []
        for r in requests:
            size = (r.height // self.latent_scale, r.width // self.latent_scale)
            # Without an image (txt2img on an inpainting UNet): an empty (grey) canvas. Without a mask: repaint all.
            pixels = torch.zeros(1, 3, r.height, r.width)
            if r.init_image is not None:
                pixels = image_to_tensor(r.init_image, r.width, r.height)  # [1, 3, H, W] in [-1, 1]
            mask = torch.ones(1, 1, r.height, r.width)
            if r.task == "inpaint" and r.mask is not None:
                mask = mask_to_tensor(r.mask, r.width, r.height)  # [1, 1, H, W], 1 = repaint
            encoded = EncodedInputs()
            if needs.image:
                encoded.image = self._encode(pixels, r.vae)
            if needs.mask:
                encoded.mask = F.interpolate(mask, size=size)
            if needs.masked:
                encoded.masked = self._encode(pixels * (mask < 0.5).to(pixels.dtype), r.vae)
            out.append(encoded)
        return out

    def _encode(self, pixels: torch.Tensor, vae_choice: VaeChoice) -> Posterior:
        """The posterior through the chosen VAE. TAESD encodes deterministically: std None, so the image's generator
        draws nothing for it (as diffusers' pipelines with AutoencoderTiny)."""
        if vae_choice == "full":
            return self.encode_image(pixels)
        assert self.tiny_vae is not None  # check() refused the request otherwise
        latents = self.tiny_vae.encode(pixels.to(self.device, self.precision.vae)).float()
        return latents / self.components.scaling_factor, None  # the batch scales it back: UNet latents

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] in [-1, 1] -> posterior (mean, std) of the scaled-less latents, float32."""
        vae = self.components.vae
        mean, logvar = vae.encode(pixels.to(self.device, self.precision.vae))
        std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
        return mean.float(), std

    def _decode(self, latents: torch.Tensor, choices: Sequence[VaeChoice]) -> list[Image.Image]:
        """Images of the final latents, each row through the VAE its request chose (``choices``, one per row).

        Rows choosing different VAEs share the UNet batch and split only here: the batch key ignores the VAE.
        """
        images: list[Image.Image | None] = [None] * latents.shape[0]
        for choice in dict.fromkeys(choices):
            rows = [i for i, c in enumerate(choices) if c == choice]
            step = slice_rows(latents.shape[-2] * self.latent_scale, latents.shape[-1] * self.latent_scale)
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                if choice == "tiny":
                    assert self.tiny_vae is not None  # TAESD takes UNet latents (diffusers: its scaling_factor 1)
                    decoded = self.tiny_vae.decode(latents[part].to(self.device, self.precision.vae))
                else:
                    chunk = latents[part] / self.components.scaling_factor
                    decoded = decode_latents(self.vae_decode, chunk.to(self.device, self.precision.vae),
                                             self.latent_scale)
                for row, image in zip(part, tensor_to_images(decoded), strict=True):
                    images[row] = image
        return [image for image in images if image is not None]

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """RGB previews of the running latents for progress events: TAESD's decode when a tiny VAE is loaded,
        else a cheap linear map (no VAE)."""
        if self.tiny_vae is None:
            return latents_to_preview(latents)
        h, w = latents.shape[-2:]
        shrink = max(h, w) * self.latent_scale / PREVIEW_SIDE
        if shrink > 1:  # decode no more pixels than the preview shows: a 512px image's preview costs 1/4 decode
            latents = F.interpolate(latents.float(), size=(max(1, round(h / shrink)), max(1, round(w / shrink))),
                                    mode="area")
        decoded = self.tiny_vae.decode(latents.to(self.device, self.precision.vae))
        images = tensor_to_images(decoded)
        side = PREVIEW_SIDE / max(images[0].size) if images else 1.0  # the size latents_to_preview gives
        return [i.resize((max(1, round(i.width * side)), max(1, round(i.height * side))), Image.Resampling.BILINEAR)
                for i in images]


def _tune_for_cpu(components: Components, precision: Precision, store: ChoiceStore | None) -> list[PathChooser]:
    tune_process()
    networks = [(components.unet, precision.unet, False), (components.vae, precision.vae, False),
                (components.text_encoder, precision.text, True)]
    if components.text_encoder_2 is not None:
        networks.append((components.text_encoder_2, precision.text, True))
    return tune_networks(networks, store=store)
