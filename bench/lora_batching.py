"""Batching across LoRAs: 8 jobs with 8 different LoRAs submitted at once (one batch, a side path per row) vs the
same 8 one by one.

Real processes, as bench/batching.py: a redis-server and one `sdqueue worker` with `SDQ_LORA_DIR` holding 8 random
LoRAs in kohya's format (rank 16, alpha 8, on every layer kohya's default LoRA trains: the transformer blocks'
attention, feed-forward and projections in the UNet, attention and MLP in the text encoder). Jobs are enqueued as
the API does, each naming its own LoRA, all with the same size, sampler and steps. Throughput = 8 images / wall
time from the first submission to the last success; a warm-up (one job alone, one batch of 8) first; the modes
alternate over rounds. SD 1.5 size with random weights (the checkpoint is written once, ~4 GB in fp32).

    python bench/lora_batching.py [--size 256] [--steps 4] [--rounds 1] [--workdir DIR] [--write]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batching import JOBS, WINDOW_MS, Service, sd15_checkpoint, tiny_checkpoint
from bench.report import cpu_kind, markdown_table, write_section
from core.jobs import GenerationParams
from core.jobstore import enqueue, new_job_spec

log = logging.getLogger("bench.lora_batching")

RANK, ALPHA = 16, 8.0
# kohya's default LoRA modules (sd-scripts networks/lora.py): inside the UNet's transformers, and CLIP's layers
UNET_LAYERS = ("proj_in", "proj_out", "attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q",
               "attn2_to_k", "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
TEXT_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
               "mlp_fc2")


def write_kohya_loras(folder: Path, count: int, tiny: bool) -> list[str]:
    """``count`` random kohya-format LoRAs for the SD 1.5 (or the tiny test) architecture; returns their names."""
    from model.clip_config import clip_text_config
    from model.lora_names import LoraNames
    from model.unet import UNetConfig
    from model.weights import tiny_configs

    unet, _, text = tiny_configs() if tiny else (UNetConfig(), None, clip_text_config())
    names = LoraNames.build(unet, text)
    layers = {name: target for name, (_, target) in names.layers.items()
              if (name.startswith("lora_unet_") and "_attentions_" in name and name.endswith(UNET_LAYERS))
              or (name.startswith("lora_te_") and name.endswith(TEXT_LAYERS))}
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for name, t in layers.items():
            down = torch.randn(RANK, t.in_features, generator=generator) / t.in_features**0.5
            up = 0.05 * torch.randn(t.out_features, RANK, generator=generator) / RANK**0.5
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
        save_file({k: v.half() for k, v in tensors.items()}, str(folder / f"style-{i}.safetensors"))
        out.append(f"style-{i}")
    log.info("%d LoRAs of %d layers written to %s", count, len(layers), folder)
    return out


def submit(service: Service, seed: int, lora: str | None, size: int, steps: int) -> str:
    params = GenerationParams.model_validate({
        "prompt": "a photo of an astronaut riding a horse", "width": size, "height": size, "steps": steps,
        "sampler": "euler_a", "seed": seed, "loras": [] if lora is None else [{"name": lora, "scale": 0.8}],
    })
    spec = new_job_spec(params)
    enqueue(service.redis, service.settings, spec)
    return spec.id


def measure(service: Service, loras: list[str | None], size: int, steps: int, rounds: int) -> dict[str, Any]:
    seeds = iter(range(10_000))
    log.info("warm-up")
    service.wait_done([submit(service, next(seeds), loras[0], size, steps)])
    service.wait_done([submit(service, next(seeds), lora, size, steps) for lora in loras])
    one_by_one, at_once, batches = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for lora in loras:
            service.wait_done([submit(service, next(seeds), lora, size, steps)])
        one_by_one.append(time.perf_counter() - start)
        log.info("one by one %.2f s", one_by_one[-1])
        before = service.mean_batch()
        start = time.perf_counter()
        service.wait_done([submit(service, next(seeds), lora, size, steps) for lora in loras])
        at_once.append(time.perf_counter() - start)
        after = service.mean_batch()
        batches.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
        log.info("at once %.2f s (%.1f images per pipeline call)", at_once[-1], batches[-1])
    return {"one_by_one": statistics.median(one_by_one), "at_once": statistics.median(at_once),
            "mean_batch": statistics.mean(batches),
            "rounds": [a / b for a, b in zip(one_by_one, at_once, strict=True)]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the checkpoint and LoRAs between runs")
    parser.add_argument("--write", action="store_true", help="also write the section into BENCHMARKS.md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint instead (a quick check)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    checkpoint = workdir / ("tiny.safetensors" if args.tiny else "sd15.safetensors")
    if not checkpoint.exists():
        log.info("writing the checkpoint to %s", checkpoint)
        (tiny_checkpoint if args.tiny else sd15_checkpoint)(checkpoint)
    lora_dir = workdir / ("loras-tiny" if args.tiny else "loras")
    loras = write_kohya_loras(lora_dir, JOBS, args.tiny)
    os.environ["SDQ_LORA_DIR"] = str(lora_dir)  # the worker process inherits it
    run_dir = workdir / "run-loras"
    run_dir.mkdir(exist_ok=True)
    service = Service(run_dir, checkpoint)
    try:
        # The same 8 jobs without LoRAs beside them: what batching gains on this machine at all.
        results = {"8 different LoRAs": measure(service, list(loras), args.size, args.steps, args.rounds),
                   "no LoRA": measure(service, [None] * JOBS, args.size, args.steps, args.rounds)}
    finally:
        service.stop()
    rows = [[f"{args.size}x{args.size}, {args.steps} steps, {what}", f"{r['one_by_one']:.2f}",
             f"{JOBS / r['one_by_one']:.3f}", f"{r['at_once']:.2f}", f"{JOBS / r['at_once']:.3f}",
             f"{r['mean_batch']:.1f}", f"{r['one_by_one'] / r['at_once']:.2f}x",
             ", ".join(f"{x:.2f}x" for x in r["rounds"])] for what, r in results.items()]
    model = "the tiny test model" if args.tiny else "SD 1.5 size with random weights"
    body = (
        f"{JOBS} txt2img jobs, each with its own LoRA (kohya format, rank {RANK}, transformer and text encoder "
        f"layers, scale 0.8), {model}, euler_a, CFG 7.5, one `sdqueue worker` on the CPU "
        f"(dtype auto), `SDQ_MAX_BATCH_IMAGES={JOBS}`, `SDQ_BATCH_WINDOW_MS={WINDOW_MS}`. One by one: submit, wait "
        "until succeeded, next. At once: all submitted together (one batch, each row with its own LoRA). Wall time "
        f"from the first submission to the last success, after a warm-up; median of {args.rounds} round(s).\n\n"
        + markdown_table(["job", "one by one s", "images/s", "at once s", "images/s",
                          "images per pipeline call (at once)", "speed-up (medians)", "speed-up per round"], rows)
        + "\n\nTarget: >= 1.5x on this CPU."
    )
    if args.write:
        write_section(f"Batching across LoRAs: 8 jobs with 8 different LoRAs ({cpu_kind()})", body)
    log.info("\n%s", body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
