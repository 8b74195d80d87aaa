"""SDXL on the CPU: our pipeline vs diffusers' StableDiffusionXLPipeline on the full SDXL base architecture with
random weights (UNet 2.6 B parameters, CLIP ViT-L + OpenCLIP ViT-bigG, the SD VAE), txt2img 512x512, 4 steps.

Each implementation runs in a fresh process (the machine holds one SDXL at a time comfortably, not two): load, the
first image (ours: with the CPU self-check's first pass), then ``--runs`` timed images, each with a new prompt so
that no text embedding is reused; the process's peak RSS (VmHWM) is the memory an SDXL worker needs. Results go to
BENCHMARKS.md with the CPU's model and the instruction-set flags that matter here.

    python bench/sdxl.py [--runs 2] [--folder DIR] [--size 512] [--only ours-auto,ours-fp32,diffusers]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section

log = logging.getLogger("bench.sdxl")

STEPS, PROMPT, SEED, NEGATIVE = 4, "a photo of an astronaut riding a horse", 1234, "blurry"
IMPLEMENTATIONS = ("ours-auto", "ours-fp32", "diffusers")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def write_sdxl_folder(folder: Path) -> None:
    """A diffusers folder of SDXL base's shapes (stabilityai/stable-diffusion-xl-base-1.0's configs), random."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from model.tokenizer import ClipTokenizer
    from tests.model.sdxl_reference import SDXL_SCHEDULER

    torch.manual_seed(0)
    with torch.no_grad():
        UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ).save_pretrained(folder / "unet")
        AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
            scaling_factor=0.13025,
        ).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407)).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
            projection_dim=1280, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=0)).save_pretrained(folder / "text_encoder_2")
    ClipTokenizer.bundled().save_folder(folder / "tokenizer")
    ClipTokenizer.bundled("!").save_folder(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                         "force_zeros_for_empty_prompt": True}))


def ours(folder: Path, dtype: str, size: int) -> Callable[[str], None]:
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest

    pipe = Pipeline.load(folder, device="cpu", dtype=dtype)

    def run(prompt: str) -> None:
        pipe.generate([GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE, width=size, height=size,
                                         steps=STEPS, sampler="euler", guidance_scale=5.0, seed=SEED)])

    return run


def theirs(folder: Path, size: int) -> Callable[[str], None]:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True),
        scheduler=EulerDiscreteScheduler.from_config(json.loads((folder / "scheduler" /
                                                                 "scheduler_config.json").read_text())),
    )
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str) -> None:
        pipe(prompt, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=STEPS,
             guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(SEED))

    return run


def child(folder: Path, which: str, size: int, runs: int) -> dict[str, object]:
    """Load one implementation, make the first image, then ``runs`` timed ones; with the peak RSS."""
    start = time.perf_counter()
    run = theirs(folder, size) if which == "diffusers" else ours(folder, "float32" if which == "ours-fp32" else
                                                                 "auto", size)
    loaded = time.perf_counter() - start
    run(PROMPT)
    first = time.perf_counter() - start
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        run(f"{PROMPT}, take {i}")
        times.append(time.perf_counter() - t0)
        log.info("%s run %d: %.1f s", which, i, times[-1])
    status = Path("/proc/self/status").read_text()  # VmHWM: this process's own peak (ru_maxrss spans the fork)
    hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"load": loaded, "first": first, "times": times, "rss_mib": hwm_kib / 1024}


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return " ".join(f for f in CPU_FLAGS if f in have) or "none of " + " ".join(CPU_FLAGS)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=None, help="reuse (or keep) the random SDXL folder here")
    parser.add_argument("--only", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--child", choices=IMPLEMENTATIONS, default=None)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.folder is None else None
    folder = args.folder or Path(tmp.name)  # type: ignore[union-attr]
    if args.child:
        print(json.dumps(child(folder, args.child, args.size, args.runs)))
        return
    if not (folder / "unet").exists():
        log.info("writing SDXL-size random weights to %s", folder)
        write_sdxl_folder(folder)

    from model.cpu_choice import cpu_isa
    from model.device import cpu_has_fast_bf16

    chosen = [w for w in args.only.split(",") if w in IMPLEMENTATIONS]
    if not cpu_has_fast_bf16() and "ours-auto" in chosen and "ours-fp32" in chosen:
        chosen.remove("ours-auto")  # auto is fp32 here: the same run again
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, object]] = {}
    for which in chosen:
        out = subprocess.run([sys.executable, __file__, "--child", which, "--folder", str(folder), "--size",
                              str(args.size), "--runs", str(args.runs)], check=True, capture_output=True, text=True)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        log.info("%s: %s", which, results[which])
    load_after = os.getloadavg()[0]
    if tmp is not None:
        tmp.cleanup()

    def median(which: str) -> float:
        times = results[which]["times"]
        assert isinstance(times, list)
        return float(statistics.median(times))

    base = median("diffusers") if "diffusers" in results else None
    rows = []
    for which, r in results.items():
        speed = f"{base / median(which):.2f}x" if base else ""
        times = r["times"]
        assert isinstance(times, list)
        rows.append([which, f"{median(which):.1f}", speed, f"{r['load']:.1f}", f"{r['first']:.1f}",
                     ", ".join(f"{t:.1f}" for t in times), f"{r['rss_mib']:.0f}"])
    import diffusers
    import transformers

    auto = "bf16" if cpu_has_fast_bf16() else "fp32"
    body = (
        f"SDXL base architecture with random weights (diffusers folder: UNet 2.6 B parameters, CLIP ViT-L and "
        f"OpenCLIP ViT-bigG, the SD VAE), txt2img {args.size}x{args.size}, {STEPS} steps, Euler, CFG 5, batch 1, "
        f"CPU. Each implementation in its own process: load, the first image, then {args.runs} timed images with "
        f"new prompts (median). CPU flags: {cpu_flags()}; {cpu_isa()}; torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}; {torch.get_num_threads()} threads; "
        f"ours-auto is {auto}. Load average {load_before:.2f} at the start, {load_after:.2f} at the end. Peak "
        f"RSS = the process's VmHWM: what an SDXL worker needs.\n\n"
        + markdown_table(["implementation", "seconds / image", "speed vs diffusers fp32", "load s",
                          "load + first image s", "runs (s)", "peak RSS MiB"], rows)
    )
    write_section(f"SDXL: sdqueue vs diffusers (CPU, {args.size}x{args.size})", body)
    log.info("\n%s", body)


if __name__ == "__main__":
    main()
