"""The references in tests/reference.py checked on their own, against closed forms.

The engine tests compare ddsmon to these references, so the references must be right by
a route that owes nothing to either: torch's own loss functions, hand-derived gradients
of a linear model, ``torch.func`` per-sample gradients, and a diagonal Gram read by eye.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import Capture, assert_close_report, per_sample_capture, per_sample_loss, readings
from torch import nn
from torch.func import functional_call, grad, vmap


def test_per_sample_ce_and_mse_match_torch() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6, 4), generator=g)
    want = F.cross_entropy(z.reshape(-1, 5), y.reshape(-1), reduction="none").reshape(6, 4)
    assert_close_report(per_sample_loss(z, y, "ce"), want.mean(1), rtol=1e-14, what="ce (n,T,C)")
    want2 = F.cross_entropy(z[:, 0], y[:, 0], reduction="none")
    assert_close_report(per_sample_loss(z[:, 0], y[:, 0], "ce"), want2, rtol=1e-14, what="ce (n,C)")
    t = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    want3 = F.mse_loss(z, t, reduction="none").reshape(6, -1).mean(1)
    assert_close_report(per_sample_loss(z, t, "mse"), want3, rtol=1e-14, what="mse")


def test_capture_of_a_linear_model_matches_hand_gradients() -> None:
    """h = W x + b, MSE over k outputs: Delta_i = 2/k (h_i - y_i), J_i = [Delta_i x_i^T, Delta_i]."""
    torch.manual_seed(1)
    n, m, k = 7, 4, 3
    model = nn.Sequential(nn.Linear(m, k))
    x, y = torch.randn(n, m), torch.randn(n, k)
    cap = per_sample_capture(model, x, y, "mse", ["0"])["0"]
    W = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    xd, yd = x.double().numpy(), y.double().numpy()
    h = xd @ W.T + b
    delta = 2.0 / k * (h - yd)
    jac = np.concatenate([np.einsum("ni,nj->nij", delta, xd).reshape(n, -1), delta], axis=1)
    assert_close_report(cap.X, h, atol=1e-14, what="X")
    assert_close_report(cap.Delta, delta, atol=1e-14, what="Delta")
    assert cap.J is not None
    assert_close_report(cap.J, jac, atol=1e-14, what="J")
    assert model[0].weight.dtype == torch.float32  # the reference works on a copy


def test_capture_matches_torch_func_on_layernorm_and_sequence() -> None:
    """J of a LayerNorm in a token model from the loop equals vmap(grad) per sample."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(9, 6), nn.LayerNorm(6), nn.Linear(6, 4)).double()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    ids = torch.randint(0, 9, (5, 3))
    y = torch.randint(0, 4, (5, 3))
    cap = per_sample_capture(model, ids, y, "ce", ["1"])["1"]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(ln_params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        out = functional_call(model, {**params, **ln_params}, (xi[None],))
        return F.cross_entropy(out[0], yi, reduction="mean")

    ln = {"1.weight": params["1.weight"], "1.bias": params["1.bias"]}
    g = vmap(grad(loss_of), in_dims=(None, 0, 0))(ln, ids, y)
    jac = torch.cat([g["1.weight"], g["1.bias"]], dim=1).numpy()
    assert cap.J is not None
    assert_close_report(cap.J, jac, atol=1e-13, what="J of LayerNorm")
    assert cap.X.shape == (15, 6) and cap.Delta.shape == (15, 6)


def test_readings_of_a_diagonal_case_read_by_eye() -> None:
    """X = diag(4, 3, 0), G = diag(9, 4, 0): sigma_min 3, lambda_min 4, u = e_2, gain 4."""
    n = 3
    X = np.diag([4.0, 3.0, 0.0])
    Delta = np.diag([3.0, 2.0, 0.0]) * math.sqrt(n)
    r = readings(Capture(X=X, Delta=Delta, J=Delta.copy(), n=n))
    assert r["sigma_min"] == pytest.approx(3.0, rel=1e-15, abs=0)
    assert (r["x_rank"], r["x_dead"]) == (2, 1)
    assert r["lambda_min"] == pytest.approx(4.0, rel=1e-15, abs=0)
    assert (r["g_rank"], r["g_dead"]) == (2, 1)
    assert r["logdet"] == pytest.approx(math.log(36.0), rel=1e-15, abs=0)
    assert r["log_volume"] == pytest.approx(math.log(36.0) - 2 * math.log(9.0), rel=1e-14, abs=0)
    assert r["u_dead_gain"] == pytest.approx(4.0, rel=1e-14, abs=0)
    assert r["floor_g"] == pytest.approx(3 * np.finfo(np.float64).eps * 9.0, rel=1e-15, abs=0)
    assert r["floor_x"] == pytest.approx(3 * np.finfo(np.float64).eps * 4.0, rel=1e-15, abs=0)
    assert r["param_rank"] == 2 and r["param_lambda_min"] == pytest.approx(4.0, rel=1e-15, abs=0)


def test_assert_close_report_lists_each_miss() -> None:
    with pytest.raises(
        AssertionError, match=r"1 of 3 entries differ(.|\n)*\[1\] actual=2 expected=2.5"
    ):
        assert_close_report([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], rtol=1e-3, what="v")
