"""Our pipeline vs diffusers on the full SD 1.5 architecture with random weights (CPU, 4 steps, batch 1).

Both run in one process, alternately, on the same weights; the median of several runs is reported. The whole
process (start, imports, load and the first image; ours: with the CPU self-check's first pass) and the peak RSS
come from fresh subprocesses, one per implementation and round, alternating (a process that has run another
implementation first has its kernels and pages warm). Results go to BENCHMARKS.md. oneDNN, MKL and
ATen read their instruction-set caps at start: ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2`` runs an AVX-512 CPU on AVX2 kernels only.

    python bench/model_vs_diffusers.py [--runs 5] [--fresh 2] [--size 256] [--folder DIR]
"""

from __future__ import annotations

import argparse
import gc
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

from bench.report import cpu_kind, markdown_table, write_section

log = logging.getLogger("bench.model")

STEPS, PROMPT, SEED = 4, "a photo of an astronaut riding a horse", 1234
SIZE = 256  # set from --size


def write_sd15_folder(folder: Path) -> None:
    """A diffusers folder with SD 1.5-shaped, randomly initialised UNet, VAE and text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.tokenizer import ClipTokenizer
    from tests.model.reference import SD15_SCHEDULER

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).save_pretrained(
        folder / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    ).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, vocab_size=49408,
    )).save_pretrained(folder / "text_encoder")
    ClipTokenizer.bundled().save_folder(folder / "tokenizer")
    import json

    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def ours(folder: Path, dtype: str, choices: Path | None = None) -> Callable[[str], None]:
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest

    pipe = Pipeline.load(folder, device="cpu", dtype=dtype, cpu_choices=choices)

    def run(prompt: str) -> None:
        pipe.generate([GenerationRequest(prompt=prompt, width=SIZE, height=SIZE, steps=STEPS, sampler="euler_a",
                                         seed=SEED)])

    return run


def theirs(folder: Path) -> Callable[[str], None]:
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.model.reference import SD15_SCHEDULER

    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).eval(),
        vae=AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).eval(),
        text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
        scheduler=EulerAncestralDiscreteScheduler(**{
            k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "clip_sample")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str) -> None:
        pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS,
             generator=torch.Generator("cpu").manual_seed(SEED))

    return run


def fresh_process(folder: Path, which: str, choices: Path) -> tuple[float, float, float]:
    """(seconds from its start to its first image, its second image's seconds, peak RSS MiB) of a new process that
    loads ``which`` and generates twice (the second image: that implementation alone in its process, as users run
    it, with no other implementation's process-wide settings or warm kernels). Ours keeps its CPU self-check's
    choices in ``choices``, as a worker or ``sdqueue generate`` does: the first such process measures, later ones
    find them stored."""
    start = time.time()
    out = subprocess.run([sys.executable, __file__, "--folder", str(folder), "--child", which, "--size", str(SIZE),
                          "--choices", str(choices)], check=True, capture_output=True, text=True)
    loaded, first_done, second, rss = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    log.info("%s: interpreter, imports and load %.2f s, first image %.2f s", which, loaded - start, first_done - loaded)
    return first_done - start, second, rss


def median_or_nan(values: list[float]) -> float:
    """The median, or NaN with no values (``--fresh 0``: no fresh processes)."""
    return statistics.median(values) if values else float("nan")


def main() -> None:
    global SIZE
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--fresh", type=int, default=2, help="rounds of fresh processes (whole process, peak RSS)")
    parser.add_argument("--child", choices=("ours", "ours-fp32", "diffusers"), default=None)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--choices", type=Path, default=None, help="(child) the CPU self-check's choices file")
    args = parser.parse_args()
    SIZE = args.size
    tmp = tempfile.TemporaryDirectory() if args.folder is None else None
    folder = args.folder or Path(tmp.name)  # type: ignore[union-attr]
    if not (folder / "unet").exists():
        log.info("writing SD 1.5-size random weights to %s", folder)
        write_sd15_folder(folder)
    if args.child:  # child: load one implementation, generate twice; print what fresh_process reads
        run = theirs(folder) if args.child == "diffusers" else ours(folder, "float32" if args.child == "ours-fp32"
                                                                     else "auto", args.choices)
        loaded = time.time()
        run(PROMPT)
        first_done = time.time()
        start = time.perf_counter()
        run(f"{PROMPT}, again")
        second = time.perf_counter() - start
        # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork/exec.
        status = Path("/proc/self/status").read_text()
        hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        print(f"{loaded} {first_done} {second} {hwm_kib / 1024}")  # the parent reads this line
        return

    from model.cpu_choice import cpu_isa
    from model.device import cpu_has_fast_bf16

    makers: dict[str, Callable[[], Callable[[str], None]]] = {
        "ours (auto)": lambda: ours(folder, "auto"), "ours (fp32)": lambda: ours(folder, "float32"),
        "diffusers (fp32)": lambda: theirs(folder)}
    if not cpu_has_fast_bf16():
        del makers["ours (auto)"]  # auto is fp32 here: the same runs again
    load_before = os.getloadavg()[0]
    children = {"ours (auto)": "ours", "ours (fp32)": "ours-fp32", "diffusers (fp32)": "diffusers"}
    whole: dict[str, list[float]] = {name: [] for name in makers}
    alone: dict[str, list[float]] = {name: [] for name in makers}
    peaks: dict[str, list[float]] = {name: [] for name in makers}
    # Each round starts ours twice: with a new choices file (the self-check measures, as on a new machine) and with
    # the file the first round's measuring start wrote (the choices found stored, as on every later start).
    stored: dict[str, list[float]] = {name: [] for name in makers}
    choices = tempfile.TemporaryDirectory()
    for i in range(args.fresh):  # fresh processes first, while this one holds no model
        for name in makers:
            seconds, second, peak = fresh_process(folder, children[name], Path(choices.name) / f"{name} {i}.json")
            whole[name].append(seconds)
            alone[name].append(second)
            peaks[name].append(peak)
            log.info("fresh process %d %s: start to first image %.2f s, second image %.2f s, peak RSS %.0f MiB",
                     i, name, seconds, second, peak)
            if name.startswith("ours"):
                seconds, _, _ = fresh_process(folder, children[name], Path(choices.name) / f"{name} 0.json")
                stored[name].append(seconds)
                log.info("fresh process %d %s, choices stored: start to first image %.2f s", i, name, seconds)
            else:
                stored[name].append(seconds)  # diffusers has no self-check: its start is the same start
    runners: dict[str, Callable[[str], None]] = {}
    for name, make in makers.items():  # load, then the first image (the warm-up)
        gc.collect()
        runners[name] = make()
        runners[name](PROMPT)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.runs):
        prompt = f"{PROMPT}, take {i}"  # a new text each run: no implementation reuses a cached prompt embedding
        for name, run in runners.items():
            gc.collect()
            start = time.perf_counter()
            run(prompt)
            times[name].append(time.perf_counter() - start)
            log.info("run %d %s: %.2f s", i, name, times[name][-1])
    del runners
    gc.collect()
    load_after = os.getloadavg()[0]
    choices.cleanup()
    cold = {k: median_or_nan(v) for k, v in whole.items()}
    warm = {k: median_or_nan(v) for k, v in stored.items()}
    rss = {k: f"{max(v):.0f}" if v else "" for k, v in peaks.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["diffusers (fp32)"]

    def paired(name: str) -> str:
        ratios = [d / t for d, t in zip(times["diffusers (fp32)"], times[name], strict=True)]
        return f"{min(ratios):.2f}x to {max(ratios):.2f}x, median {statistics.median(ratios):.2f}x"

    solo = {k: median_or_nan(v) for k, v in alone.items()}
    header = ["implementation", "seconds / image", "speed vs diffusers fp32"]
    rows = [[k, f"{med[k]:.2f}", f"{base / med[k]:.2f}x"] for k in med]
    if args.fresh:  # the fresh processes' columns
        header += ["alone: second image s", "alone vs diffusers", "new machine: start to first image s",
                   "vs diffusers", "later starts s", "vs diffusers"]
        for row, k in zip(rows, med, strict=True):
            row += [f"{solo[k]:.2f}", f"{solo['diffusers (fp32)'] / solo[k]:.2f}x", f"{cold[k]:.2f}",
                    f"{cold['diffusers (fp32)'] / cold[k]:.2f}x", f"{warm[k]:.2f}",
                    f"{warm['diffusers (fp32)'] / warm[k]:.2f}x"]
    header += ["runs (s)", "peak RSS MiB"]
    for row, k in zip(rows, med, strict=True):
        row += [", ".join(f"{t:.2f}" for t in times[k]), rss[k]]
    fresh = (
        f" Whole process: a fresh process from its start "
        f"(interpreter, imports, load) to its first image, median of {args.fresh} alternating rounds, each starting "
        f"ours twice: on a new machine (no stored choices: the CPU self-check measures on the first pass, "
        f"model/cpu_choice.py) and on later starts (the choices the first round stored, model/cpu_choice_store.py, "
        f"as a restarted worker or a second `sdqueue generate` finds them; diffusers: the same start as in the "
        f"other column); alone: the second image of those processes (each implementation on its own, as users run "
        f"it); peak RSS: the largest of those processes'." if args.fresh else " No fresh processes (--fresh 0).")
    import diffusers
    import transformers

    auto = "bf16" if cpu_has_fast_bf16() else "fp32, so not run again"
    body = (
        f"Full SD 1.5 architecture, random weights, txt2img {SIZE}x{SIZE}, {STEPS} steps, euler_a, batch 1, CFG 7.5, "
        f"CPU; median of {args.runs} alternating runs after the first image, each run with a new prompt text. "
        f"{cpu_isa()}; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}; threads {torch.get_num_threads()}; ours (auto) is {auto}. Load average "
        f"{load_before:.2f} at the start, {load_after:.2f} at the end.{fresh} The glibc malloc setting ours makes on "
        f"load (model/device.py) is process-wide, so the diffusers runs in this process (seconds / image) get it "
        f"too{'; the alone column has diffusers without it' if args.fresh else ''}."
        f"\n\n"
        + markdown_table(header, rows)
        + "\n\nRun by run (each ours run against the diffusers run of the same round): "
        + "; ".join(f"{k} {paired(k)}" for k in times if k != "diffusers (fp32)") + "."
        + "\n\nTargets (issue 14): ours (fp32) >= 1.5x diffusers fp32 on every x86 CPU; ours (auto) >= 2.5x where "
        "bf16 is native."
    )
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    kernels = f"ONEDNN_MAX_CPU_ISA={isa}" if isa else "native ISA"
    write_section(f"Model: sdqueue vs diffusers ({cpu_kind()}, {kernels}, {SIZE}x{SIZE})", body)
    log.info("\n%s", body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
