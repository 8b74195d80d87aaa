"""The GPU worker's figures in one run: precision, UNet it/s eager / compiled / CUDA graphs, images/s, VAE decode.

Meant for a CUDA machine lent for minutes: SD 1.5-size networks with random weights are built on the GPU (no
files, no downloads; the timings do not depend on the values), and everything runs in one process, alternating
the implementations round by round, so a busy neighbour slows them all alike. It prints one markdown table.

1. fp16 vs fp32 (TF32 off): ``max |eps diff|`` of the UNet on one input, and PSNR of the decoded 512x512 image
   (20 steps, the same seed) of the fp16 pipeline (UNet and CLIP fp16, VAE bf16: the CUDA default) vs all fp32.
2. UNet it/s at batch 1 with CFG (2 rows, 64x64 latents, fp16, TF32 allowed): eager; ``torch.compile`` (inductor,
   ``SDQ_COMPILE=default``); inductor + CUDA graphs (``SDQ_COMPILE=max``). First-call compile times are reported.
3. images/s at 512x512, 20 and 50 steps, batch 1, 4, 8, 16 (text encoding to decoded images): ours eager, ours
   with the fastest compiled UNet of 2. (decoder eager), and diffusers' StableDiffusionPipeline fp16 on the same
   weights when diffusers is importable (euler in both). Each batch shape is first run once with 2 steps (compiles
   it), then 20 steps alternate twice and 50 steps once.
4. VAE decode ms at 512x512, batch 1 and 8.

Rows beyond ``--budget-s`` are skipped (listed as such), so the run fits the lease (< 8 min on an H100/H200).

    python bench/gpu.py [--budget-s 420]     # on a CUDA machine
    python bench/gpu.py --smoke              # tiny networks on the CPU, a few steps: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table
from model.clip_config import clip_text_config
from model.compile import compile_network
from model.diffusers_format import rename, unet_renames, vae_renames
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.schedule import NoiseSchedule
from model.tokenizer import ClipTokenizer
from model.unet import UNetConfig, UNetModel
from model.vae import AutoencoderKL, VAEConfig
from model.vae_decode import decode_latents
from model.weights import Components, tiny_configs

log = logging.getLogger("bench.gpu")

PROMPT, SEED = "a photo of an astronaut riding a horse", 1234
DIFFUSERS = "diffusers StableDiffusionPipeline"  # fp16 on CUDA, fp32 in the smoke run
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}


@dataclass
class Plan:
    """What one run measures: sizes, steps, batches, repetitions."""

    side: int = 512
    steps: tuple[int, ...] = (20, 50)
    batches: tuple[int, ...] = (1, 4, 8, 16)
    unet_iters: int = 50
    rounds: int = 3  # UNet it/s and VAE: alternating rounds
    image_rounds: int = 2  # images/s at the first step count; the longer runs alternate once
    smoke: bool = False
    budget_s: float = 390.0
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


@dataclass
class Table:
    rows: list[list[str]] = field(default_factory=list)

    def add(self, measure: str, what: str, value: str, note: str = "") -> None:
        self.rows.append([measure, what, value, note])
        log.info("%s | %s | %s | %s", measure, what, value, note)

    def markdown(self) -> str:
        return markdown_table(["measure", "implementation", "result", "notes"], self.rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def alternating(
    runners: dict[str, Callable[[], Any]], calls: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each runner, the runners taking turns round by round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(per_call(run, calls, device))
    return {name: statistics.median(t) for name, t in times.items()}


# --- the networks ------------------------------------------------------------------------------------------------
def build_components(configs: tuple[UNetConfig, VAEConfig, Any], device: torch.device) -> Components:
    """Random fp32 networks, initialised on ``device``."""
    from transformers import CLIPTextModel

    unet_config, vae_config, clip_config = configs
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, text = UNetModel(unet_config), AutoencoderKL(vae_config), CLIPTextModel(clip_config)
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return Components(unet, vae, text, unet_config, vae_config, 0.18215, None, None, Path("random"))


def cast(components: Components, unet: torch.dtype, text: torch.dtype, vae: torch.dtype) -> Components:
    """A copy of ``components`` in other dtypes (the same values, rounded)."""
    out = copy.copy(components)
    out.unet = copy.deepcopy(components.unet).to(unet)
    out.text_encoder = copy.deepcopy(components.text_encoder).to(text)  # type: ignore[arg-type]
    out.vae = copy.deepcopy(components.vae).to(vae)
    return out


def pipeline(components: Components, device: torch.device) -> Pipeline:
    from model.device import Precision

    precision = Precision(next(components.unet.parameters()).dtype, next(components.text_encoder.parameters()).dtype,
                          next(components.vae.parameters()).dtype)
    return Pipeline(components, ClipTokenizer.bundled(), NoiseSchedule.sd15(), device, precision, "random")


def requests(side: int, steps: int, images: int, prompt: str = PROMPT) -> list[GenerationRequest]:
    """``images`` images in requests of at most 8 (the request limit), euler, CFG 7.5."""
    sizes = [min(8, images - start) for start in range(0, images, 8)]
    return [GenerationRequest(prompt=prompt, width=side, height=side, steps=steps, sampler="euler", seed=SEED + i,
                              n=n) for i, n in enumerate(sizes)]


def diffusers_pipeline(components: Components, device: torch.device) -> Any | None:
    """diffusers' StableDiffusionPipeline, fp16, holding the same weights as ``components``; None without diffusers."""
    try:
        import diffusers
    except ImportError:
        return None
    c, v = components.unet_config, components.vae_config
    channels = [c.model_channels * m for m in c.channel_mult]
    attention = [2**i in c.attention_resolutions for i in range(len(channels))]
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=tuple(channels),
            layers_per_block=c.num_res_blocks, cross_attention_dim=c.context_dim, attention_head_dim=c.num_heads,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
            down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
            up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult),
            latent_channels=v.z_channels, sample_size=512,
        )
    _copy_weights(components.unet, unet, unet_renames(c))
    _copy_weights(components.vae, vae, vae_renames(v))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=copy.deepcopy(components.text_encoder).to(dtype),  # type: ignore[arg-type]
        tokenizer=ClipTokenizer.bundled()._tokenizer,  # the same vocabulary as ours, built without files
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, renames: dict[str, str]) -> None:
    """Every tensor of diffusers' module from ours, through the loader's name table (1x1 convs -> linears)."""
    mine = ours.state_dict()
    state = {}
    for key, tensor in theirs.state_dict().items():
        source = rename(key, renames)
        if source is None or source not in mine:
            raise KeyError(f"no tensor of ours for diffusers' {key}")
        state[key] = mine[source].reshape(tensor.shape)
    theirs.load_state_dict(state)


# --- the measures ------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def precision_rows(table: Table, fp32: Components, fast: Pipeline, plan: Plan, device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    c = fp32.unet_config
    g = torch.Generator().manual_seed(3)
    side = plan.side // 8
    x = torch.randn(2, 4, side, side, generator=g).to(device)
    context = torch.randn(2, 77, c.context_dim, generator=g).to(device)
    t = torch.tensor([500.0, 500.0], device=device)
    eps32 = fp32.unet(x, t, context)
    eps16 = fast.components.unet(x.to(fast.precision.unet), t, context.to(fast.precision.unet)).float()
    table.add("max abs eps diff", f"ours {fast.precision.unet} vs fp32", f"{(eps16 - eps32).abs().max().item():.4f}",
              f"UNet, batch 2, t=500; eps std {eps32.std().item():.3f}")
    [full] = pipeline(fp32, device).generate(requests(plan.side, plan.steps[0], 1))
    [half] = fast.generate(requests(plan.side, plan.steps[0], 1))
    assert full is not None and half is not None
    value = psnr(np.asarray(full.images[0]), np.asarray(half.images[0]))
    table.add("image PSNR", f"ours unet {fast.precision.unet}, vae {fast.precision.vae} vs fp32", f"{value:.1f} dB",
              f"{plan.side}x{plan.side}, {plan.steps[0]} steps, euler, CFG 7.5; target >= 35 dB")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def compiled_variants(unet: UNetModel, plan: Plan, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    if plan.smoke:  # the inductor's compile takes minutes on a CPU: dynamo alone checks the plumbing
        return {"compile (smoke: dynamo only)": torch.compile(unet, fullgraph=True, dynamic=False, backend="eager")}
    return {"compile default (SDQ_COMPILE=default)": compile_network(unet, "default", device),
            "compile + CUDA graphs (SDQ_COMPILE=max)": compile_network(unet, "max", device)}


def unet_rows(table: Table, fast: Pipeline, plan: Plan, device: torch.device) -> Callable[..., torch.Tensor]:
    """UNet it/s at batch 1 with CFG; returns the fastest callable, for the images/s rows."""
    unet, dtype = fast.components.unet, fast.precision.unet
    side, dim = plan.side // 8, fast.components.unet_config.context_dim
    x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, dim, device=device, dtype=dtype)
    variants: dict[str, Callable[..., torch.Tensor]] = {"eager": unet}
    for name, compiled in compiled_variants(unet, plan, device).items():
        if plan.left() < 60:
            table.add("UNet it/s, batch 1 + CFG", name, "skipped", "time budget")
            continue
        start = time.monotonic()
        for _ in range(3):  # CUDA graph trees record on the 2nd or 3rd call
            compiled(x, t, context)
        sync(device)
        table.add("compile time", name, f"{time.monotonic() - start:.1f} s", "first 3 calls, one shape")
        variants[name] = compiled
    calls: dict[str, Callable[[], Any]] = {n: partial(f, x, t, context) for n, f in variants.items()}
    med = alternating(calls, plan.unet_iters, plan.rounds, device)
    for name, seconds in med.items():
        table.add("UNet it/s, batch 1 + CFG", name, f"{1 / seconds:.1f}",
                  f"{dtype}, 2 x 4 x {side} x {side}; eager / this: {med['eager'] / seconds:.2f}x")
    return variants[min(med, key=med.__getitem__)]


def cell_runners(
    fast: Pipeline, unets: dict[str, Callable[..., torch.Tensor]], theirs: Any | None, work: list[GenerationRequest],
) -> dict[str, Callable[[], Any]]:
    """One whole generation of ``work`` per implementation: ours with each UNet callable, diffusers'."""
    first = work[0]

    def ours(unet: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        def run() -> None:
            fast.fast_unet = unet
            fast._text_cache.clear()  # encode the prompts every time, as diffusers does
            fast.generate(work)
        return run

    runners = {name: ours(unet) for name, unet in unets.items()}
    if theirs is not None:
        prompts = [r.prompt for r in work for _ in range(r.n)]
        runners[DIFFUSERS] = lambda: theirs(
            prompts, height=first.height, width=first.width, num_inference_steps=first.steps, guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(SEED))
    return runners


def image_rows(table: Table, fast: Pipeline, best: Callable[..., torch.Tensor], theirs: Any | None, plan: Plan,
               device: torch.device) -> None:
    eager_unet = fast.fast_unet
    unets = {"ours eager": eager_unet}
    if best is not eager_unet:
        unets["ours compiled UNet"] = best
    for steps in plan.steps:
        for batch in plan.batches:
            measure = f"images/s, {plan.side}x{plan.side}, {steps} steps, batch {batch}"
            if plan.left() < 45:
                table.add(measure, "all", "skipped", "time budget")
                continue
            if steps == plan.steps[0]:  # a new batch shape: compile / record graphs, allocator, kernel choices
                for run in cell_runners(fast, unets, theirs, requests(plan.side, 2, batch)).values():
                    run()
            runners = cell_runners(fast, unets, theirs, requests(plan.side, steps, batch))
            med = alternating(runners, 1, plan.image_rounds if steps == plan.steps[0] else 1, device)
            for name, seconds in med.items():
                note = ""
                if DIFFUSERS in med and name != DIFFUSERS:
                    note = f"{med[DIFFUSERS] / seconds:.2f}x diffusers"
                table.add(measure, name, f"{batch / seconds:.2f}", note)
    fast.fast_unet = eager_unet


def vae_rows(table: Table, fast: Pipeline, plan: Plan, device: torch.device) -> None:
    side = plan.side // 8
    for batch in (1, 8):
        z = torch.randn(batch, 4, side, side, device=device, dtype=fast.precision.vae)
        decode: dict[str, Callable[[], Any]] = {"eager": partial(decode_latents, fast.vae_decode, z)}
        ms = 1000 * alternating(decode, 2, plan.rounds, device)["eager"]
        table.add(f"VAE decode ms, {plan.side}x{plan.side}, batch {batch}", f"ours eager {fast.precision.vae}",
                  f"{ms:.1f}", "sliced: 4 images per decoder call" if batch > 4 else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny networks on the CPU, a few steps")
    parser.add_argument("--budget-s", type=float, default=390.0, help="skip rows that would start after this")
    parser.add_argument("--no-diffusers", action="store_true", help="leave diffusers' pipeline out")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        unet_config, vae_config, _ = tiny_configs()
        clip = clip_text_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        configs: tuple[UNetConfig, VAEConfig, Any] = (unet_config, vae_config, clip)
        plan = Plan(side=64, steps=(2,), batches=(1, 2), unet_iters=1, rounds=1, image_rounds=1, smoke=True,
                    budget_s=args.budget_s)
        dtypes = (torch.bfloat16, torch.bfloat16, torch.float32)
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA device and found none (torch.cuda.is_available() is False); "
                  "run it with --smoke to check the script on a CPU.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        configs = (UNetConfig(), VAEConfig(), clip_text_config())
        plan = Plan(budget_s=args.budget_s)
        vae = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        dtypes = (torch.float16, torch.float16, vae)
    table = Table()
    with torch.inference_mode():
        fp32 = build_components(configs, device)
        fast = pipeline(cast(fp32, *dtypes), device)
        theirs = None if args.no_diffusers else diffusers_pipeline(fp32, device)
        precision_rows(table, fp32, fast, plan, device)
        del fp32
        best = unet_rows(table, fast, plan, device)
        image_rows(table, fast, best, theirs, plan, device)
        vae_rows(table, fast, plan, device)
    if theirs is None:
        table.add("diffusers anchor", "diffusers", "not run", "diffusers not importable" if not args.no_diffusers
                  else "--no-diffusers")
    where = "CPU (smoke: tiny networks, not a measurement)" if args.smoke else torch.cuda.get_device_name(device)
    cuda = "" if args.smoke else f", CUDA {torch.version.cuda}"
    print(f"{where}; torch {torch.__version__}{cuda}; {time.monotonic() - plan.started:.0f} s in all\n")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
