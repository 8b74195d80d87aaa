"""TAESD against diffusers' AutoencoderTiny on random weights: both checkpoint layouts, strict loading, pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file
from torch import nn

from model.single_file import CheckpointError
from model.taesd import DECODER_FILE, ENCODER_FILE, TinyAutoencoder, TinyVAEConfig, load_tiny_vae

CPU = torch.device("cpu")


def random_taesd(seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    vae = AutoencoderTiny().eval()
    with torch.no_grad():  # random init is near-degenerate for ReLU stacks: spread the weights so pixels vary
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def original_sequentials(vae: AutoencoderTiny) -> tuple[nn.Sequential, nn.Sequential]:
    """madebyollin/taesd's own ``Encoder()`` / ``Decoder()`` modules, holding ``vae``'s weights (copied in module
    order, independently of the mapping under test)."""
    enc, dec = vae.encoder.layers, vae.decoder.layers
    return nn.Sequential(*enc), nn.Sequential(Clamp(), *dec)


def write_single_files(vae: AutoencoderTiny, folder: Path) -> Path:
    encoder, decoder = original_sequentials(vae)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / ENCODER_FILE)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, folder / DECODER_FILE)
    return folder


@pytest.fixture(scope="module")
def reference() -> AutoencoderTiny:
    return random_taesd()


@pytest.fixture(scope="module")
def folder(reference: AutoencoderTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(tmp_path_factory.mktemp("taesd-diffusers"))
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_files(reference: AutoencoderTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_files(reference, Path(tmp_path_factory.mktemp("taesd-single")))


def to_pixels(images: torch.Tensor) -> np.ndarray:
    return np.round(((images / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()).astype(np.int16)


def latents(seed: int = 1) -> torch.Tensor:
    return torch.randn((2, 4, 16, 12), generator=torch.Generator().manual_seed(seed)) * 1.5


def image(seed: int = 2) -> torch.Tensor:
    return torch.rand((1, 3, 64, 48), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_decode_matches_diffusers(reference: AutoencoderTiny, folder: Path) -> None:
    ours = load_tiny_vae(folder, device=CPU, dtype=torch.float32)
    with torch.no_grad():
        theirs = to_pixels(reference.decode(latents()).sample)
        mine = to_pixels(ours.decode(latents()))
    assert mine.shape == (2, 128, 96, 3)
    assert np.abs(mine - theirs).max() <= 2
    assert mine.std() > 5  # an image, not a constant: the comparison can fail


def test_encode_matches_diffusers(reference: AutoencoderTiny, folder: Path) -> None:
    ours = load_tiny_vae(folder, device=CPU, dtype=torch.float32)
    with torch.no_grad():
        theirs = reference.encode(image()).latents
        mine = ours.encode(image())
    assert mine.shape == (1, 4, 8, 6)
    assert (mine - theirs).abs().max().item() <= 1e-4
    assert theirs.std().item() > 1e-3


@pytest.mark.parametrize("which", ["folder", ENCODER_FILE, DECODER_FILE])
def test_single_files_load_to_the_same_outputs(folder: Path, single_files: Path, which: str) -> None:
    from_folder = load_tiny_vae(folder, device=CPU, dtype=torch.float32)
    from_files = load_tiny_vae(single_files if which == "folder" else single_files / which,
                               device=CPU, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(from_files.decode(latents()), from_folder.decode(latents()))
        assert torch.equal(from_files.encode(image()), from_folder.encode(image()))


def test_the_original_modules_decode_like_diffusers(reference: AutoencoderTiny) -> None:
    """The single files written here are the layout madebyollin's code produces: its Decoder gives diffusers'
    pixels (diffusers maps [0, 1] to [-1, 1] after the layers)."""
    _, decoder = original_sequentials(reference)
    with torch.no_grad():
        assert torch.allclose(decoder(latents()) * 2 - 1, reference.decode(latents()).sample, atol=1e-5)


def test_an_unexpected_tensor_is_named(reference: AutoencoderTiny, tmp_path: Path) -> None:
    files = write_single_files(reference, tmp_path)
    _, decoder = original_sequentials(reference)
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    state["3.extra.weight"] = torch.zeros(1)
    save_file(state, files / DECODER_FILE)
    with pytest.raises(CheckpointError, match=r"unexpected decoder\.layers\.2\.extra\.weight"):
        load_tiny_vae(files, device=CPU, dtype=torch.float32)


def test_a_missing_tensor_is_named(reference: AutoencoderTiny, tmp_path: Path) -> None:
    files = write_single_files(reference, tmp_path)
    encoder, _ = original_sequentials(reference)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "1.conv.2.weight"}
    save_file(state, files / ENCODER_FILE)
    with pytest.raises(CheckpointError, match=r"missing encoder\.layers\.1\.conv\.2\.weight"):
        load_tiny_vae(files, device=CPU, dtype=torch.float32)


def test_one_single_file_alone_is_refused(reference: AutoencoderTiny, tmp_path: Path) -> None:
    files = write_single_files(reference, tmp_path)
    (files / ENCODER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{ENCODER_FILE} missing"):
        load_tiny_vae(files / DECODER_FILE, device=CPU, dtype=torch.float32)


def test_a_folder_without_taesd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="expected a diffusers AutoencoderTiny folder"):
        load_tiny_vae(tmp_path, device=CPU, dtype=torch.float32)


def test_module_names_are_the_diffusers_keys(reference: AutoencoderTiny) -> None:
    assert set(TinyAutoencoder(TinyVAEConfig()).state_dict()) == set(reference.state_dict())
