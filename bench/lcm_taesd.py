"""LCM 4 steps + TAESD at 512x512, batch 1: ours vs diffusers with LCMScheduler and AutoencoderTiny (CPU).

Full SD 1.5 architecture with random weights (the timing does not depend on the values), guidance 1 (one UNet pass
per step, as LCM runs). diffusers runs `StableDiffusionPipeline` with `LCMScheduler` and `AutoencoderTiny`: its
recipe for LCM on an SD 1.5 UNet (LCM-LoRA). Its `LatentConsistencyModelPipeline` needs a UNet with a guidance
embedding (`time_cond_proj_dim`); with guidance 1 and no such embedding it is the same computation. Both run in one
process, alternately, on the same weights; whole image = text encoding, 4 UNet steps, TAESD decode. The median of
several runs is reported, with the load average. Prints a markdown section (``--write`` adds it to BENCHMARKS.md).

    python bench/lcm_taesd.py [--runs 5] [--size 512] [--folder DIR] [--write]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_vs_diffusers import write_sd15_folder
from bench.report import cpu_kind, markdown_table, write_section

log = logging.getLogger("bench.lcm_taesd")

STEPS, PROMPT, SEED, GUIDANCE = 4, "a photo of an astronaut riding a horse", 1234, 1.0


def write_taesd(folder: Path) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    AutoencoderTiny().save_pretrained(folder)


def ours(folder: Path, taesd: Path, dtype: str, size: int) -> Callable[[str], None]:
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest

    pipe = Pipeline.load(folder, device="cpu", dtype=dtype, tiny_vae=taesd)

    def run(prompt: str) -> None:
        pipe.generate([GenerationRequest(prompt=prompt, width=size, height=size, steps=STEPS, sampler="lcm",
                                         guidance_scale=GUIDANCE, seed=SEED, vae="tiny")])

    return run


def theirs(folder: Path, taesd: Path, size: int) -> Callable[[str], None]:
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.model.reference import SD15_SCHEDULER

    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).eval(),
        vae=AutoencoderTiny.from_pretrained(str(taesd), local_files_only=True).eval(),
        text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
        scheduler=LCMScheduler.from_config({**SD15_SCHEDULER, "original_inference_steps": 50}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str) -> None:
        pipe(prompt, height=size, width=size, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             generator=torch.Generator("cpu").manual_seed(SEED))

    return run


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=None, help="keeps the random weights between runs")
    parser.add_argument("--write", action="store_true", help="add the section to BENCHMARKS.md")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.folder is None else None
    folder = args.folder or Path(tmp.name)  # type: ignore[union-attr]
    taesd = folder / "taesd"
    if not (folder / "unet").exists():
        log.info("writing SD 1.5-size random weights to %s", folder)
        write_sd15_folder(folder)
    if not taesd.exists():
        write_taesd(taesd)

    from model.cpu_choice import cpu_isa
    from model.device import cpu_has_fast_bf16

    makers: dict[str, Callable[[], Callable[[str], None]]] = {
        "ours (auto)": lambda: ours(folder, taesd, "auto", args.size),
        "ours (fp32)": lambda: ours(folder, taesd, "float32", args.size),
        "diffusers (fp32)": lambda: theirs(folder, taesd, args.size),
    }
    if not cpu_has_fast_bf16():
        del makers["ours (auto)"]  # auto is fp32 here: the same runs again
    load_before = os.getloadavg()
    runners: dict[str, Callable[[str], None]] = {}
    for name, make in makers.items():
        runners[name] = make()
        runners[name](PROMPT)  # warm-up: first-pass kernel choices, allocator
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.runs):
        prompt = f"{PROMPT}, take {i}"  # a new text each run: no cached prompt embedding
        for name, run in runners.items():
            gc.collect()
            start = time.perf_counter()
            run(prompt)
            times[name].append(time.perf_counter() - start)
            log.info("run %d %s: %.2f s", i, name, times[name][-1])
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["diffusers (fp32)"]

    def paired(name: str) -> str:
        ratios = [d / t for d, t in zip(times["diffusers (fp32)"], times[name], strict=True)]
        return f"{min(ratios):.2f}x to {max(ratios):.2f}x, median {statistics.median(ratios):.2f}x"

    rows = [[k, f"{med[k]:.2f}", f"{base / med[k]:.2f}x", ", ".join(f"{t:.2f}" for t in times[k])] for k in med]
    import diffusers

    body = (
        f"Full SD 1.5 architecture, random weights, txt2img {args.size}x{args.size}, LCM {STEPS} steps, guidance "
        f"{GUIDANCE:g} (one UNet pass per step), TAESD decode, batch 1, CPU; whole image (text, steps, decode); "
        f"median of {args.runs} alternating runs after a warm-up. diffusers: StableDiffusionPipeline + LCMScheduler + "
        f"AutoencoderTiny, fp32. {cpu_isa()}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"threads {torch.get_num_threads()}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, {'/'.join(f'{x:.2f}' for x in load_after)} "
        f"at the end.\n\n"
        + markdown_table(["implementation", "seconds / image", "speed vs diffusers fp32", "runs (s)"], rows)
        + "\n\nRun by run: " + "; ".join(f"{k} {paired(k)}" for k in times if k != "diffusers (fp32)") + "."
        + "\n\nTarget (issue 15): >= 1.5x diffusers."
    )
    if args.write:
        write_section(f"LCM + TAESD: sdqueue vs diffusers ({cpu_kind()}, {args.size}x{args.size})", body)
    print(body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
