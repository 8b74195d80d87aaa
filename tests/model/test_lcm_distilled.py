"""LCM-distilled checkpoints: a UNet with a guidance-scale embedding (``time_cond_proj_dim``), as
SimianLuo/LCM_Dreamshaper_v7 ships it. Against diffusers' LatentConsistencyModelPipeline and StableDiffusionPipeline
(which both feed the embedding and skip classifier-free guidance), in both checkpoint layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from safetensors import safe_open

from model.lcm import guidance_embedding
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.weights import load_components, save_single_file
from tests.model.reference import Reference, build_reference
from tests.model.test_lcm import lcm_scheduler, pixels

W, H = 64, 64
GUIDANCE_DIM = 32


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return build_reference(Path(tmp_path_factory.mktemp("lcm-distilled")), seed=11,
                           time_cond_proj_dim=GUIDANCE_DIM, scheduler="LCMScheduler")


@pytest.fixture(scope="module")
def pipe(ref: Reference) -> Pipeline:
    return Pipeline.load(ref.folder, device="cpu", dtype="float32")


def diffusers_images(cls: type, ref: Reference, req: GenerationRequest) -> np.ndarray:
    pipe = cls(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
               scheduler=lcm_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
    out = pipe(req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=H, width=W,
               num_images_per_prompt=req.n, generator=gens, output_type="np")
    return np.round(out.images * 255).astype(np.int16)


def test_guidance_embedding_matches_diffusers() -> None:
    scales = torch.tensor([1.0, 2.5, 8.0])
    for dim in (GUIDANCE_DIM, 256, 7):
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scales - 1, embedding_dim=dim)
        assert torch.allclose(guidance_embedding(scales, dim), theirs, atol=1e-6)
    # scale 1 is w = 0: sin 0 = 0 and cos 0 = 1, the halves in diffusers' order
    one = guidance_embedding(torch.tensor([1.0]), 8)
    assert one.tolist() == [[0.0] * 4 + [1.0] * 4]


def test_the_folder_loads_with_its_guidance_projection(pipe: Pipeline, ref: Reference) -> None:
    unet = pipe.components.unet
    assert unet.config.time_cond_proj_dim == GUIDANCE_DIM
    theirs = ref.unet.time_embedding.cond_proj.weight
    assert torch.equal(unet.time_embedding.cond_proj.weight, theirs)
    with pytest.raises(ValueError, match="guidance embedding"):
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.zeros(1, 77, 32))


@pytest.mark.parametrize("cls", [LatentConsistencyModelPipeline, StableDiffusionPipeline],
                         ids=["lcm-pipeline", "sd-pipeline"])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_txt2img_matches_diffusers(ref: Reference, pipe: Pipeline, cls: type, guidance: float) -> None:
    req = GenerationRequest(prompt="a photo of a cat", width=W, height=H, steps=4, guidance_scale=guidance,
                            sampler="lcm", seed=42, n=2)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = diffusers_images(cls, ref, req)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0


def test_the_scale_reaches_the_unet(pipe: Pipeline) -> None:
    """One pass per step at any scale, and the scale changes the image (it would not if it were dropped)."""
    common = dict(prompt="a cat", negative_prompt="blurry", width=W, height=H, steps=2, sampler="lcm", seed=3, n=1)
    calls: list[int] = []
    unet = pipe.components.unet
    hook = unet.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        low = pixels(pipe.generate([GenerationRequest(guidance_scale=1.0, **common)])[0].images)  # type: ignore
        high = pixels(pipe.generate([GenerationRequest(guidance_scale=8.0, **common)])[0].images)  # type: ignore
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 1]  # no unconditional rows, whatever the scale
    assert np.abs(low - high).max() > 2


def test_rows_with_different_scales_share_a_batch(pipe: Pipeline) -> None:
    common = dict(width=W, height=H, steps=4, sampler="lcm")
    a = GenerationRequest(prompt="a cat", seed=1, n=1, guidance_scale=8.0, **common)  # type: ignore[arg-type]
    b = GenerationRequest(prompt="a dog", seed=7, n=2, guidance_scale=2.0, **common)  # type: ignore[arg-type]
    assert a.batch_key() == b.batch_key()
    alone = pixels(pipe.generate([a])[0].images)  # type: ignore[union-attr]
    together = pipe.generate([b, a])
    assert np.abs(pixels(together[1].images) - alone).max() <= 1  # type: ignore[union-attr]


def test_single_file_keeps_the_key_real_files_carry(pipe: Pipeline, ref: Reference, tmp_path: Path) -> None:
    """Converters to the original layout leave ``time_embedding.cond_proj`` in diffusers' name; ours writes and
    reads it there, and the single file makes the same pixels as the folder."""
    with pytest.raises(ValueError, match="packed"):  # a loaded CPU pipeline's layers hold packed weights only
        save_single_file(pipe.components, tmp_path / "packed.safetensors")
    path = save_single_file(load_components(ref.folder), tmp_path / "lcm.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "model.diffusion_model.time_embedding.cond_proj.weight" in set(f.keys())
    components = load_components(path)
    assert components.unet.config.time_cond_proj_dim == GUIDANCE_DIM
    single = Pipeline.load(path, device="cpu", dtype="float32")
    req = GenerationRequest(prompt="a lighthouse", width=W, height=H, steps=4, guidance_scale=6.0, sampler="lcm",
                            seed=5, n=1)
    a = pixels(single.generate([req])[0].images)  # type: ignore[union-attr]
    b = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(a - b).max() <= 1
