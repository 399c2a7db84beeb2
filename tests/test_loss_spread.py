"""Per-sample losses of the probe pass and the model-level ``loss_spread`` reading.

The oracle is a plain loop: one forward pass per sample on a float64 copy of the model,
its loss written out by :func:`reference.per_sample_loss` (no code shared with
:mod:`ddsmon.losses`), and the quantiles of :func:`_quantile` taken by hand from the
sorted losses.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference import per_sample_loss
from torch import nn

from ddsmon import compute_signatures
from ddsmon.losses import per_sample_loss_fn
from ddsmon.probe import run_probe_pass
from ddsmon.signature import LOSS_QUANTILES, loss_spread, resolved_samples

REL = 1e-12
EPS64 = float(np.finfo(np.float64).eps)


def _loop_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> np.ndarray:
    """loss_i for each sample i, one forward pass per sample, float64."""
    work = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            xi = xi.double() if xi.is_floating_point() else xi
            yi = y[i : i + 1]
            yi = yi.double() if yi.is_floating_point() else yi
            out.append(float(per_sample_loss(work(xi), yi, loss)[0]))
    return np.array(out)


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile by linear interpolation between order statistics, by hand."""
    s = sorted(float(v) for v in values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))


class _Tokens(nn.Module):
    """Token ids (n, T) -> logits (n, T, C): a loss averaged over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _case(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(11)
    if kind == "ce":
        return _mlp(), torch.randn(37, 5), torch.randint(0, 4, (37,)), "ce"
    if kind == "mse":
        return _mlp(), torch.randn(37, 5), torch.randn(37, 4), "mse"
    torch.manual_seed(2)
    model = _Tokens()
    return model, torch.randint(0, 7, (23, 5)), torch.randint(0, 7, (23, 5)), "ce"


@pytest.mark.parametrize("kind", ["ce", "mse", "tokens"])
@pytest.mark.parametrize("probe_batch", [None, 4])
def test_sample_losses_match_a_per_sample_loop(kind: str, probe_batch: int | None) -> None:
    """Whole probe and streamed micro-batches of 4 (the first of at least 2, a short
    last one): the losses the pass kept are the loop's, in probe order."""
    model, x, y, loss = _case(kind)
    want = _loop_losses(model, x, y, loss)
    sig = compute_signatures(model, x, y, loss=loss, device="cpu", probe_batch=probe_batch)
    assert sig.sample_losses is not None and sig.sample_losses.shape == (x.shape[0],)
    np.testing.assert_allclose(sig.sample_losses, want, rtol=REL, atol=0.0)


def test_the_whole_probe_pass_keeps_its_losses_and_output_layer() -> None:
    model, x, y, loss = _case("ce")
    work = copy.deepcopy(model).double().eval()
    run = run_probe_pass(
        work, x.double(), y, per_sample_loss_fn(loss), None, n=x.shape[0],
        keep_inputs=lambda _m: False,
    )  # fmt: skip
    assert run.losses is not None and run.output_layer == "2"
    np.testing.assert_allclose(run.losses.numpy(), _loop_losses(model, x, y, loss), rtol=REL)


@pytest.mark.parametrize("probe_batch", [None, 4])
def test_loss_spread_is_carried_by_the_output_layer_alone(probe_batch: int | None) -> None:
    """The output layer is the last read to run in the forward pass, whatever order the
    layers are named in; its loss_spread is q90 / q10 of the loop's losses."""
    model, x, y, loss = _case("tokens")
    want = _loop_losses(model, x, y, loss)
    lo, hi = (_quantile(want, q) for q in LOSS_QUANTILES)
    for layers in (None, ["head", "mix", "embed"]):
        sig = compute_signatures(
            model, x, y, loss=loss, device="cpu", layers=layers, probe_batch=probe_batch
        )
        assert sig.output_layer == "head", layers
        seen = sum(1 for v in want if v >= max(want) * math.sqrt(7 * EPS64))  # head: d = 7
        assert sig.layers["head"].samples_resolved == seen == x.shape[0]
        assert all(s.samples_resolved is None for n, s in sig.layers.items() if n != "head")
        spread = {name: s.loss_spread for name, s in sig.layers.items()}
        assert spread["head"] == pytest.approx(hi / lo, rel=1e-10), spread
        assert all(v is None for name, v in spread.items() if name != "head"), spread
        assert sig.layers["head"].to_dict()["loss_spread"] == spread["head"]
    inner = compute_signatures(model, x, y, loss=loss, device="cpu", layers=["embed", "mix"])
    assert inner.output_layer == "mix" and inner.layers["mix"].loss_spread is not None


def test_no_backward_pass_no_losses() -> None:
    model, x, y, _ = _case("ce")
    sig = compute_signatures(model, x, y, loss="ce", device="cpu", fisher="none")
    assert sig.sample_losses is None
    assert all(s.loss_spread is None for s in sig.layers.values())


def test_loss_spread_by_hand() -> None:
    rng = np.random.default_rng(0)
    values = 10.0 ** rng.uniform(-9, 1, size=101)
    lo, hi = _quantile(values, 0.1), _quantile(values, 0.9)
    assert loss_spread(values) == pytest.approx(hi / lo, rel=1e-12)
    assert math.log10(loss_spread(values) or 0) > 6  # about 8 decades in the middle 80%
    # exact zeros (rounded-away losses) are read at eps * q_hi: the spread is capped
    zeros = np.concatenate([np.zeros(50), np.ones(50)])
    assert loss_spread(zeros) == pytest.approx(1.0 / EPS64, rel=1e-12)
    assert loss_spread(zeros, eps=1e-7) == pytest.approx(1e7, rel=1e-12)
    assert loss_spread(np.full(10, 0.3)) == pytest.approx(1.0)
    assert loss_spread(np.zeros(10)) is None
    assert loss_spread(np.array([0.1, -0.2, 0.3])) is None
    assert loss_spread(np.array([0.1, np.nan])) is None
    assert loss_spread(np.zeros(0)) is None


def test_resolved_samples_by_hand() -> None:
    """Losses within sqrt(d eps) of the largest (here 1e-7 at d eps = 1e-14) count."""
    eps = 1e-14 / 64
    losses = np.array([3.0, 1.0, 3.0e-7 * 1.0001, 3.0e-7 * 0.9999, 1e-12, 0.0])
    assert resolved_samples(losses, 64, eps) == 3
    assert resolved_samples(losses, 64, eps * 1e-4) == 4  # 2 decades finer: 1e-9 of the top
    assert resolved_samples(np.zeros(4), 64) == 0
    assert resolved_samples(np.array([1.0, -1.0]), 64) is None
    assert resolved_samples(np.zeros(0), 64) is None
