"""Result image files: A1111 metadata read back by an independent parser (sd-parsers), formats, model hash."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sd_parsers import ParserManager

from core.imagefile import (
    EncodedImage,
    ModelInfo,
    a1111_parameters,
    encode_image,
    encode_job_image,
    image_key,
    read_parameters,
)
from core.jobs import GenerationParams, JobSpec
from sdqueue import info as info_cmd
from worker.modelhash import model_hash, sha256_of

MODEL = ModelInfo("v1-5-pruned-emaonly", "6ce0161689")


def make_spec(**params: Any) -> JobSpec:
    values: dict[str, Any] = {"prompt": "a photo of a cat", "seed": 1234, **params}
    return JobSpec(
        id="3f2b8c0d", params=GenerationParams(**values), seed=values["seed"], created_at=datetime.now(timezone.utc)
    )


@pytest.fixture
def picture() -> Image.Image:
    # A gradient, so lossy encoders have something to lose.
    return Image.linear_gradient("L").resize((64, 48)).convert("RGB")


def parse_with_sd_parsers(encoded: EncodedImage) -> Any:
    result = ParserManager().parse(io.BytesIO(encoded.data))
    assert result is not None, "sd-parsers found no A1111 metadata"
    assert result.generator.name == "AUTOMATIC1111"
    [sampler] = result.samplers
    return sampler


@pytest.mark.parametrize(
    ("sampler", "karras", "a1111_name"),
    [("ddim", False, "DDIM"), ("euler", False, "Euler"), ("euler_a", False, "Euler a"), ("dpmpp_2m", True, "DPM++ 2M")],
)
def test_png_parameters_parse_with_sd_parsers(
    picture: Image.Image, sampler: str, karras: bool, a1111_name: str
) -> None:
    spec = make_spec(
        prompt="a photo of a cat, (masterpiece:1.2)", negative_prompt="blurry, lowres", steps=25,
        guidance_scale=6.5, sampler=sampler, karras=karras, width=768, height=512,
    )
    encoded = encode_job_image(picture, spec, index=1, seed=1235, model=MODEL)

    parsed = parse_with_sd_parsers(encoded)

    assert parsed.name == a1111_name
    assert [p.value for p in parsed.prompts] == ["a photo of a cat, (masterpiece:1.2)"]
    assert [p.value for p in parsed.negative_prompts] == ["blurry, lowres"]
    assert parsed.parameters["seed"] == "1235"
    assert parsed.parameters["steps"] == "25"
    assert parsed.parameters["cfg_scale"] == "6.5"
    assert parsed.parameters.get("scheduler") == ("Karras" if karras else None)
    assert parsed.model.name == "v1-5-pruned-emaonly"
    assert parsed.model.hash == "6ce0161689"


def test_parameters_text_is_the_a1111_layout() -> None:
    spec = make_spec(negative_prompt="blurry", steps=30, guidance_scale=7.0, sampler="euler_a")

    text = a1111_parameters(spec, seed=1234, model=MODEL)

    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
    )


def test_an_empty_prompt_leaves_no_blank_first_line() -> None:
    # img2img may have an empty prompt; A1111 strips its infotext, so the text starts with the negative prompt or
    # the settings line.
    assert a1111_parameters(make_spec(prompt="", negative_prompt="blurry"), seed=1, model=MODEL).splitlines()[0] \
        == "Negative prompt: blurry"
    assert a1111_parameters(make_spec(prompt=""), seed=1, model=MODEL).startswith("Steps: 30, ")


def test_empty_negative_prompt_line_is_omitted_and_extras_are_written() -> None:
    spec = make_spec(sampler="ddim", eta=0.5)

    text = a1111_parameters(spec, seed=7, model=ModelInfo("tiny"), strength=0.75)

    assert text.splitlines() == [
        "a photo of a cat",
        "Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 512x512, Model: tiny, Eta: 0.5, "
        "Denoising strength: 0.75",
    ]


def test_png_round_trip_keeps_unicode_multiline_prompts_and_the_json_record(picture: Image.Image) -> None:
    prompt = "un chat sur un toit\n猫, 屋根の上"
    spec = make_spec(prompt=prompt, negative_prompt="flou\nbruit", n=2)
    model = ModelInfo('my "best", model', "0123456789")
    encoded = encode_job_image(picture, spec, index=1, seed=1235, model=model)

    info = read_parameters(encoded.data)

    assert encoded.content_type == "image/png"
    assert info["format"] == "PNG"
    assert (info["width"], info["height"]) == (64, 48)
    assert info["prompt"] == prompt
    assert info["negative_prompt"] == "flou\nbruit"
    assert info["settings"]["Model"] == 'my "best", model'
    assert info["settings"]["Seed"] == "1235"
    record = info["sdqueue"]
    assert record["job_id"] == "3f2b8c0d"
    assert record["index"] == 1
    assert record["seed"] == 1235
    assert record["model"] == {"name": 'my "best", model', "hash": "0123456789"}
    assert GenerationParams.model_validate(record["params"]) == spec.params
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert image.tobytes() == picture.tobytes()  # PNG is lossless


@pytest.mark.parametrize(
    ("fmt", "content_type", "ext"), [("jpeg", "image/jpeg", "jpg"), ("webp", "image/webp", "webp")]
)
def test_jpeg_and_webp_carry_parameters_in_exif_user_comment(
    picture: Image.Image, fmt: str, content_type: str, ext: str
) -> None:
    spec = make_spec(negative_prompt="blurry", output_format=fmt, output_quality=80, sampler="euler")
    encoded = encode_job_image(picture, spec, index=0, seed=1234, model=MODEL)

    assert (encoded.content_type, encoded.extension) == (content_type, ext)
    assert image_key(spec.id, 0, encoded) == f"3f2b8c0d/0.{ext}"
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert image.format == fmt.upper()
        assert image.size == (64, 48)
    parsed = parse_with_sd_parsers(encoded)
    assert parsed.name == "Euler"
    assert parsed.parameters["seed"] == "1234"
    assert [p.value for p in parsed.negative_prompts] == ["blurry"]
    info = read_parameters(encoded.data)
    assert info["prompt"] == "a photo of a cat"
    assert info["sdqueue"] is None  # no place for the JSON record in these formats


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_trades_size_for_fidelity(fmt: str) -> None:
    noisy = Image.effect_noise((128, 128), 60).convert("RGB")
    low = encode_image(noisy, fmt, quality=20)  # type: ignore[arg-type]
    high = encode_image(noisy, fmt, quality=95)  # type: ignore[arg-type]
    assert len(low.data) < len(high.data)


def test_bad_format_and_quality_are_refused(picture: Image.Image) -> None:
    with pytest.raises(ValueError, match="output_format must be one of png, jpeg, webp, got 'gif'"):
        encode_image(picture, "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality must be between 1 and 100, got 0"):
        encode_image(picture, "jpeg", quality=0)


def test_model_hash_is_a1111_autov2_short_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    data = os.urandom(9 * 1024 * 1024 + 17)  # more than one 8 MiB read
    path.write_bytes(data)

    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(str(path)) == hashlib.sha256(data).hexdigest()[:10]


def test_model_hash_changes_with_the_file_and_uses_a_fresh_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first")
    first = model_hash(path)
    path.write_bytes(b"second version")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert model_hash(path) == hashlib.sha256(b"second version").hexdigest()[:10] != first

    sidecar = tmp_path / "model.safetensors.sha256"
    sidecar.write_text("ab" * 32 + "  model.safetensors\n")
    os.utime(sidecar, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    os.utime(path, ns=(path.stat().st_mtime_ns + 1,) * 2)  # new mtime: not served from the memory cache
    assert model_hash(path) == "ab" * 5

    os.utime(path, ns=(sidecar.stat().st_mtime_ns + 10**9,) * 2)  # the file is newer: the sidecar is stale
    assert model_hash(path) == hashlib.sha256(b"second version").hexdigest()[:10]


def test_diffusers_folder_hash_is_the_sha256_of_its_weight_manifest(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae")
    (tmp_path / "unet" / "config.json").write_text("{}")  # configuration is not hashed
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in [
            ("unet/diffusion_pytorch_model.safetensors", b"unet"),
            ("vae/diffusion_pytorch_model.safetensors", b"vae"),
        ]
    )

    assert sha256_of(tmp_path) == hashlib.sha256(manifest.encode()).hexdigest()
    assert model_hash(tmp_path) == hashlib.sha256(manifest.encode()).hexdigest()[:10]
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        model_hash(tmp_path / "missing.safetensors")


def test_info_command_prints_parameters_and_record(
    tmp_path: Path, picture: Image.Image, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "0.png"
    path.write_bytes(encode_job_image(picture, make_spec(), index=0, seed=1234, model=MODEL).data)
    parser = argparse.ArgumentParser()
    info_cmd.configure_parser(parser)

    assert info_cmd.run(parser.parse_args([str(path)])) == 0
    out = capsys.readouterr().out
    assert "PNG 64x48" in out
    assert "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234" in out
    assert '"job_id": "3f2b8c0d"' in out

    assert info_cmd.run(parser.parse_args([str(path), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["Model hash"] == "6ce0161689"

    plain = tmp_path / "plain.png"
    picture.save(plain)
    assert info_cmd.run(parser.parse_args([str(plain)])) == 1
