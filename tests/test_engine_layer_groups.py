"""The layers read in groups under ``factor_budget`` (:class:`ddsmon.streaming.LayerStreams`).

A reading holds every read layer's state through its pass (X's and Delta's R factors,
the A and Delta rows of K from structure). With a budget, the first pass keeps the layers
that fit, first fit in model order, and every other layer is read by a further pass, a
group within the budget at a time. Tested here against the whole reading in one pass:

* every layer is read exactly once, in model order, and its readings equal the one-pass
  readings (1e-10 of each spectrum's scale, ranks exactly), ``loss_spread`` included,
  on the layer the one-pass reading puts it on;
* what each pass's streams actually hold (the bytes of their tensors at the pass's end)
  is within each layer's projected bytes, and a pass's projected bytes are within the
  budget (one layer over it alone in its pass);
* the number of passes is the number of groups, for every fisher family.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
import torch
from test_engine_streaming import _assert_same_readings
from torch import nn

from ddsmon import compute_signatures
from ddsmon.streaming import LayerStream, LayerStreams, RowFactor, StreamedProbe, factor_bytes


def _held_bytes(stream: LayerStream) -> int:
    """Bytes of the tensors one layer's stream holds now."""
    tensors: list[torch.Tensor] = [*stream._inputs, *stream._grads]
    for factor in (stream.x, stream.delta):
        if factor is not None:
            tensors.extend(factor._parts)
    return sum(t.numel() * t.element_size() for t in tensors)


class Passes:
    """Each run of the reading's StreamedProbe: the layers its sink kept, what they held
    at the run's end, and their projected bytes."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.kept: list[list[str]] = []
        self.held: list[dict[str, int]] = []
        self.projected: list[dict[str, int]] = []
        self.budgets: list[int | None] = []


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    seen = Passes()
    run = StreamedProbe.run

    def spied(self: StreamedProbe, names: Any, sink: LayerStreams, **kwargs: Any) -> Any:
        out = run(self, names, sink, **kwargs)
        seen.kept.append(list(sink.layers))
        seen.held.append({name: _held_bytes(s) for name, s in sink.layers.items()})
        seen.projected.append({name: sink.layer_bytes[name] for name in sink.layers})
        seen.budgets.append(sink.budget)
        return out

    monkeypatch.setattr(StreamedProbe, "run", spied)
    return seen


def _deep_mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for a, b in pairwise(widths):
        mods += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*mods[:-1], nn.LayerNorm(widths[-1])).double()


def _probe(n: int, d: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, d, dtype=torch.float64), torch.randint(0, classes, (n,))


@pytest.mark.parametrize("fisher", ["both", "activation", "parameter", "none"])
@pytest.mark.parametrize("probe_batch", [4, 30])
def test_groups_read_every_layer_once_with_the_one_pass_readings(
    fisher: str, probe_batch: int, passes: Passes
) -> None:
    model = _deep_mlp([6, 12, 20, 9, 14, 5])
    x, y = _probe(30, 6, 5)
    whole = compute_signatures(model, x, y, device="cpu", fisher=fisher, probe_batch=probe_batch)
    assert len(passes.kept) == 1  # the default budget holds this model at once
    one_pass_layers = passes.kept[0]
    first_projected = passes.projected[0]
    budget = max(first_projected.values()) + min(first_projected.values())
    passes.clear()
    got = compute_signatures(
        model,
        x,
        y,
        device="cpu",
        fisher=fisher,
        probe_batch=probe_batch,
        factor_budget=budget,
    )
    assert len(passes.kept) > 2  # a budget of about two layers: several groups
    read = [name for kept in passes.kept for name in kept]
    assert read == one_pass_layers == list(got.layers) == list(whole.layers)
    for i, (held, projected) in enumerate(zip(passes.held, passes.projected)):
        for name, bytes_held in held.items():
            assert bytes_held <= projected[name], (i, name, bytes_held, projected[name])
        assert len(projected) == 1 or sum(projected.values()) <= budget, (i, projected)
    assert passes.budgets[0] == budget
    for name, layer in got.layers.items():
        _assert_same_readings(layer, whole.layers[name], name)
        assert layer.loss_spread == whole.layers[name].loss_spread, name
    assert got.output_layer == whole.output_layer is not None


def test_a_layer_over_the_budget_is_read_alone(passes: Passes) -> None:
    model = _deep_mlp([4, 8, 4])
    x, y = _probe(10, 4, 4)
    whole = compute_signatures(model, x, y, device="cpu")
    passes.clear()
    got = compute_signatures(model, x, y, device="cpu", factor_budget=1)
    assert passes.kept == [[name] for name in whole.layers]
    for name, layer in got.layers.items():
        _assert_same_readings(layer, whole.layers[name], name)


@pytest.mark.parametrize(
    ("rows", "width", "block"), [(10, 4, 10), (4096, 768, 512), (100, 16, 90), (5, 64, 1)]
)
def test_factor_bytes_bounds_what_a_row_factor_holds(rows: int, width: int, block: int) -> None:
    """Blocks of ``block`` rows (a last one smaller) into a RowFactor: what it holds
    after every block is within :func:`factor_bytes`, and the bound is reached within
    a block's rows (it is not loose by more than one block)."""
    torch.manual_seed(0)
    factor = RowFactor(width)
    most = 0
    left = rows
    while left:
        k = min(block, left)
        factor.add(torch.randn(k, width, dtype=torch.float64))
        left -= k
        most = max(most, sum(p.numel() * 8 for p in factor._parts))
    bound = factor_bytes(rows, width, block)
    assert most <= bound
    assert bound - most <= 8 * width * block
