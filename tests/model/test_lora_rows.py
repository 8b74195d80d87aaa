"""LoRA side paths per batch row: the stacked path (every set's pair in one batched product) gives each row what
running its own set alone gives, for linear layers, 1x1 and 3x3 convolutions, tiled and shuffled row layouts, sets
of different ranks and sets that leave a layer out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model.lora import Adapter, LoraWeights
from model.lora_names import Target
from model.lora_rows import RowAdapters, _Layout


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.proj = nn.Conv2d(10, 6, 1)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 16, 12] -> [B, 5, 4, 4]
        h = self.lin(x).transpose(1, 2).reshape(x.shape[0], 10, 4, 4)
        return self.conv(self.proj(h))


TARGETS = {
    "lin": Target("lin", False, 12, 10),
    "proj": Target("proj", True, 10, 6),
    "conv": Target("conv", True, 6, 5, kernel=(3, 3), padding=(1, 1)),
}


def lora(seed: int, rank: int, layers: tuple[str, ...]) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    weights = LoraWeights(Path(f"l{seed}.safetensors"))
    for name in layers:
        t = TARGETS[name]
        down_shape = (rank, t.in_features, *t.kernel) if t.conv else (rank, t.in_features)
        down = torch.randn(down_shape, generator=g) * 0.3
        weights.unet[name] = Adapter(t, down, torch.randn(t.out_features, rank, generator=g) * 0.3, 0.5)
    return weights


SETS = [
    [(lora(1, 4, ("lin", "proj", "conv")), 0.8)],
    [(lora(2, 2, ("lin", "conv")), 1.0), (lora(3, 3, ("proj",)), -0.6)],  # two LoRAs, ranks summing per layer
    [],  # a request without LoRA
    [(lora(4, 6, ("proj",)), 1.2)],
]


def run(net: Net, adapters: RowAdapters, x: torch.Tensor, owners: list[int]) -> torch.Tensor:
    with torch.no_grad(), adapters.rows(owners):
        return net(x)


@pytest.mark.parametrize(("owners", "tiled"), [
    ([0, 1, 2, 3, 0, 1, 2, 3], True),  # the CFG rows of four one-image requests
    ([2, 0, 1, 2, 0, 1], True),
    ([3, 0, 0, 2, 1, 3, 2, 1], False),  # the same counts in any order: gathered into set order and back
])
def test_stacked_rows_equal_each_set_alone(owners: list[int], tiled: bool) -> None:
    torch.manual_seed(0)
    net = Net()
    adapters = RowAdapters(net, SETS, "unet")
    x = torch.randn(len(owners), 16, 12)
    batched = run(net, adapters, x, owners)
    layout = _Layout.of(owners, torch.device("cpu"))
    assert layout.order is not None and (layout.perm is None) == tiled
    for b, owner in enumerate(owners):
        alone = run(net, RowAdapters(net, [SETS[owner]], "unet"), x[b:b + 1], [0])
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = net(x)
    no_lora = [b for b, o in enumerate(owners) if o == 2]
    torch.testing.assert_close(batched[no_lora], plain[no_lora])


def test_unequal_groups_run_one_set_at_a_time_with_the_same_result() -> None:
    torch.manual_seed(0)
    net = Net()
    owners = [0, 1, 1, 3, 0, 1]
    assert _Layout.of(owners, torch.device("cpu")).order is None
    adapters = RowAdapters(net, SETS, "unet")
    x = torch.randn(len(owners), 16, 12)
    batched = run(net, adapters, x, owners)
    for b, owner in enumerate(owners):
        alone = run(net, RowAdapters(net, [SETS[owner]], "unet"), x[b:b + 1], [0])
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)


def test_the_side_paths_change_the_rows_they_belong_to() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 16, 12)
    with torch.no_grad():
        plain = net(x)
    out = run(net, RowAdapters(net, SETS, "unet"), x, [0, 1, 2, 3])
    changed = (out - plain).abs().amax(dim=(1, 2, 3))
    assert changed[2] == 0 and bool((changed[[0, 1, 3]] > 1e-3).all())
    assert not net._forward_hooks and not net.lin._forward_hooks  # hooks leave with the context
