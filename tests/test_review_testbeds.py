"""Review of the row layouts and the per-sample K path: a named block's channel-first
output, and the vmap warning switch leaving other threads' warnings filters alone."""

from __future__ import annotations

import copy

import numpy as np
import torch
from reference import assert_close_report
from torch import nn

from ddsmon import compute_signatures

TOL = 1e-10


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def test_a_named_block_of_a_conv_net_reads_its_channels_as_features() -> None:
    """A block (conv -> bn -> relu) named in ``layers`` hands on its relu's channel-
    first output; before, only a block keeping its input's shape inherited the layout,
    so a block changing channels or stride (ResNet's ``layer2.0``) was read with the
    image's width as d (block 0: d = 12, block 1: d = 6), its relu with d = C."""
    torch.manual_seed(3)
    model = nn.Sequential(
        _Block(3, 8, 1), _Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
    ).eval()
    x = torch.randn(6, 3, 12, 12)
    y = torch.randint(0, 4, (6,))
    sig = compute_signatures(
        model, x, y, loss="ce", layers=["0", "1", "1.relu"], fisher="activation", device="cpu"
    )
    got = {k: (v.N, v.d) for k, v in sig.layers.items()}
    assert got == {"0": (6 * 144, 8), "1": (6 * 36, 16), "1.relu": (6 * 36, 16)}
    with torch.no_grad():
        h0 = copy.deepcopy(model[0]).double()(x.double())
    rows = h0.movedim(1, -1).reshape(-1, 8).numpy()  # (sample, position) rows x C
    sv = np.linalg.svd(rows, compute_uv=False)
    b0 = sig.layers["0"]
    assert_close_report(b0.x_spectrum[: len(sv)], sv, atol=TOL * sv[0], what="block 0 X")
    # block 1's output is its relu's: the same X and Delta, so the same spectra
    b1, relu = sig.layers["1"], sig.layers["1.relu"]
    top_x = relu.x_spectrum[0]
    assert_close_report(b1.x_spectrum, relu.x_spectrum, atol=TOL * top_x, what="block 1 X")
    top_g = relu.g_spectrum[0]
    assert_close_report(b1.g_spectrum, relu.g_spectrum, atol=TOL * top_g, what="block 1 G")
