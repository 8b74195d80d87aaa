"""TAESD, the tiny autoencoder for SD latents (Ollin Boer Bohan, madebyollin/taesd), as diffusers' AutoencoderTiny.

Module names equal the keys of diffusers' ``AutoencoderTiny`` (``encoder.layers.1.conv.0.weight``), so its folder
loads with no renaming. The single files ``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors`` are the two
bare ``nn.Sequential`` of the original code; ``_from_single_files`` is the one place that maps them onto these names
(the decoder's index 0 there is its input clamp, a module without weights, so its indices are one higher).

TAESD works in the UNet's latent space: diffusers' config says ``scaling_factor`` 1.0, so a pipeline feeds it the
latents the sampler ends with (SD's VAE latents x 0.18215) unchanged, and its encoder gives such latents directly,
deterministically (no posterior to sample). ``TinyAutoencoder.decode``/``encode`` apply the config's factor as
diffusers does. Shape comments are for a 512x512 image (64x64 latent), batch B.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model.single_file import CheckpointError

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
ENCODER_FILE, DECODER_FILE = "taesd_encoder.safetensors", "taesd_decoder.safetensors"
SD_LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TinyVAEConfig:
    """diffusers' AutoencoderTiny defaults, which every TAESD for SD 1.x uses."""

    channels: int = 64  # block_out_channels, equal at every level
    latent_channels: int = 4
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # blocks per level; levels after the first start with a /2 conv
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # blocks per level; levels before the last end with a x2 conv
    scaling_factor: float = 1.0


class Block(nn.Module):
    """Three 3x3 convolutions with a residual connection, fused by a ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.skip = nn.Identity()  # in = out channels in every TAESD block: no 1x1 projection, no weights
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    def __init__(self, c: TinyVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for level, blocks in enumerate(c.encoder_blocks):
            if level == 0:
                layers.append(nn.Conv2d(3, c.channels, 3, padding=1))
            else:
                layers.append(nn.Conv2d(c.channels, c.channels, 3, padding=1, stride=2, bias=False))
            layers.extend(Block(c.channels) for _ in range(blocks))
        layers.append(nn.Conv2d(c.channels, c.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels.add(1).div(2))  # [B, 3, 512, 512] in [-1, 1] -> TAESD's [0, 1] -> [B, 4, 64, 64]


class TinyDecoder(nn.Module):
    def __init__(self, c: TinyVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, c.channels, 3, padding=1), nn.ReLU()]
        last = len(c.decoder_blocks) - 1
        for level, blocks in enumerate(c.decoder_blocks):
            layers.extend(Block(c.channels) for _ in range(blocks))
            if level != last:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(c.channels, c.channels, 3, padding=1, bias=False)]
        layers.append(nn.Conv2d(c.channels, 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # soft clamp to [-3, 3], as TAESD was trained
        return self.layers(x).mul(2).sub(1)  # [B, 3, 512, 512], TAESD's [0, 1] -> [-1, 1]


class TinyAutoencoder(nn.Module):
    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> UNet latents [B, 4, H/8, W/8] (x scaling_factor, as diffusers' pipelines)."""
        return self.encoder(pixels) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(latents / self.config.scaling_factor)


def load_tiny_vae(path: str | Path, *, device: torch.device, dtype: torch.dtype) -> TinyAutoencoder:
    """Load TAESD from a diffusers ``AutoencoderTiny`` folder, or from ``taesd_encoder/decoder.safetensors`` (the
    folder holding both, or either file with the other beside it). Strict: missing or unexpected tensors are named."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    scaling_factor = 1.0
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        state = load_file(folder / DIFFUSERS_WEIGHTS)
        config_file = folder / "config.json"
        if config_file.is_file():
            scaling_factor = float(json.loads(config_file.read_text()).get("scaling_factor", 1.0))
    elif path.is_file() or (folder / DECODER_FILE).is_file() or (folder / ENCODER_FILE).is_file():
        missing = [name for name in (ENCODER_FILE, DECODER_FILE) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"tiny VAE {path}: {' and '.join(missing)} missing next to it (TAESD needs both)")
        state = _from_single_files(load_file(folder / ENCODER_FILE), load_file(folder / DECODER_FILE))
    else:
        raise CheckpointError(f"tiny VAE {path}: expected a diffusers AutoencoderTiny folder ({DIFFUSERS_WEIGHTS}) "
                              f"or {ENCODER_FILE} and {DECODER_FILE}")
    config = _infer_config(state, scaling_factor, path)
    model = TinyAutoencoder(config)
    _load_strict(model, state, path)
    log.info("tiny VAE %s: %d encoder and %d decoder blocks, %d channels", path, sum(config.encoder_blocks),
             sum(config.decoder_blocks), config.channels)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _from_single_files(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Sequential keys as AutoencoderTiny names them: ``1.conv.0.weight`` of the encoder is
    ``encoder.layers.1.conv.0.weight``; the decoder's ``3.conv.0.weight`` is ``decoder.layers.2.conv.0.weight``."""
    state = {f"encoder.layers.{key}": t for key, t in encoder.items()}
    for key, tensor in decoder.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1:
            raise CheckpointError(f"{DECODER_FILE}: unexpected tensor {key!r} (TAESD decoder keys start at 1.)")
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = tensor
    return state


def _infer_config(state: dict[str, torch.Tensor], scaling_factor: float, source: Path) -> TinyVAEConfig:
    """Channels and blocks per level from the tensor names and shapes (a conv between runs of blocks)."""
    try:
        first = state["encoder.layers.0.weight"]  # [channels, 3, 3, 3]
        latent = state["decoder.layers.0.weight"]  # [channels, latent_channels, 3, 3]
    except KeyError as exc:
        raise CheckpointError(f"tiny VAE {source}: no tensor {exc.args[0]!r}; is this a TAESD checkpoint?") from None
    if latent.shape[1] != SD_LATENT_CHANNELS:
        raise CheckpointError(f"tiny VAE {source} has {latent.shape[1]} latent channels; SD 1.x latents have "
                              f"{SD_LATENT_CHANNELS} (use the TAESD made for SD 1.x, not TAESDXL/SD3/FLUX ones)")
    return TinyVAEConfig(
        channels=int(first.shape[0]), latent_channels=int(latent.shape[1]),
        encoder_blocks=tuple(_block_runs(state, "encoder.layers.")),
        decoder_blocks=tuple(_block_runs(state, "decoder.layers.")), scaling_factor=scaling_factor,
    )


def _block_runs(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Blocks per level: runs of layers that hold ``conv.0.weight``, split by the plain convs between them (the
    first layer with weights, the input conv, starts no level)."""
    indices = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    runs, count = [], 0
    for i in indices[1:]:
        if f"{prefix}{i}.conv.0.weight" in state:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs + ([count] if count else [])


def _load_strict(model: TinyAutoencoder, state: dict[str, torch.Tensor], source: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k}: shape {list(have[k])}, expected {list(want[k])}" for k in sorted(want.keys() & have.keys())
                 if have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"tiny VAE {source} does not fit TAESD: {shown}")
    model.load_state_dict(state, strict=True)
