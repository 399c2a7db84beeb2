"""The probe pass's special cases (ddsmon.probe): an output overwritten in place, a module
that runs twice, an output that does not require grad.

Each is held to the same model without the special case, whose readings the per-sample
tests already hold to the reference loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close_report
from torch import nn

from ddsmon import compute_signatures
from ddsmon.errors import ProbeError

REL = 1e-12


def _same_readings(got, want, layers) -> None:
    for layer in layers:
        a, b = got.layers[layer], want.layers[layer]
        for field in ("x_spectrum", "g_spectrum", "param_spectrum"):
            va, vb = getattr(a, field), getattr(b, field)
            assert va is not None and vb is not None, (layer, field)
            assert_close_report(va, vb, atol=REL * float(np.max(vb)), what=f"{layer} {field}")
        assert (a.x_rank, a.g_rank, a.param_rank) == (b.x_rank, b.g_rank, b.param_rank), layer


def _mlp(inplace: bool) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3))


def _deep(inplace: bool) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3)
    )


@pytest.mark.parametrize("where", ["first", "second"])
def test_an_output_overwritten_in_place_is_read_before_the_overwrite(where: str) -> None:
    """ReLU(inplace=True) overwrites a Linear's output: X and Delta are still the Linear's,
    as with inplace=False. The first layer read is re-rooted (parameters are frozen during
    the pass), so downstream already gets a copy; a later one, whose output requires
    grad, is caught by its version counter and the pass runs again handing a copy on."""
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    make, layers = (_mlp, ["0", "2"]) if where == "first" else (_deep, ["0", "2", "4"])
    got = compute_signatures(make(True), x, y, loss="ce", layers=layers, device="cpu")
    want = compute_signatures(make(False), x, y, loss="ce", layers=layers, device="cpu")
    _same_readings(got, want, layers)
    if where == "first":  # pre-activation, an affine map of 4 inputs: rank 5 (after a ReLU, 8)
        assert got.layers["0"].x_rank == want.layers["0"].x_rank == 5
    else:  # after the ReLU, about half of the entries would be 0: X would differ
        assert got.layers["2"].x_rank == want.layers["2"].x_rank == 8


class Twice(nn.Module):
    """One Linear applied twice, then a head: ``fc`` has two outputs per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_a_module_that_runs_twice_is_skipped_by_default_and_refused_by_name() -> None:
    torch.manual_seed(5)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    sig = compute_signatures(Twice(), x, y, loss="ce", device="cpu")
    assert list(sig.layers) == ["head"]
    with pytest.raises(ProbeError, match=r"'fc' runs more than once"):
        compute_signatures(Twice(), x, y, loss="ce", layers=["fc", "head"], device="cpu")


def test_an_output_that_needs_no_grad_is_rerooted() -> None:
    """A frozen first layer on a plain input: its output needs no grad, yet Delta, G and
    K (frozen parameters included) are those of the same layer unfrozen."""
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    frozen = _mlp(False)
    frozen[0].requires_grad_(False)
    layers = ["0", "2"]
    got = compute_signatures(frozen, x, y, loss="ce", layers=layers, device="cpu")
    want = compute_signatures(_mlp(False), x, y, loss="ce", layers=layers, device="cpu")
    _same_readings(got, want, layers)
    assert got.layers["0"].lambda_max is not None and got.layers["0"].lambda_max > 0
