"""The rank-multiplicative volume identity (DDS paper, Figure 4) read by the engine.

Deep linear network, L = 4 bias-free layers of width D = 20, MSE on noisy targets
(noise 0.1) from a rank-(D - r) teacher. Every layer is ``W_l = Q_l diag(s) Q_{l-1}^T``
with random orthogonal ``Q``'s (so the singular directions chain-align), ``s = 1`` except
its r smallest entries, which are ``t``; the teacher is ``Q_L diag(1, .., 1, 0 x r) Q_0^T``.

At the first hidden layer ``h_1 = W_1 x`` the per-sample gradient is
``Delta_i = (2/D) W_2^T W_3^T W_4^T e_i`` with residual ``e_i``, so in the ``Q_1`` basis
``G = (4/D^2) S^3 M S^3`` with ``M`` the residual covariance (noise-dominated, nearly
t-independent). The r dead eigenvalues go as ``t^6``: ``log lambda_min`` has slope 6
against ``log t`` for every r (rank-blind), while ``log det+(G)`` has slope ``6 r``.
The engine must show both, and agree with the closed-form G built here in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import assert_close_report, spectrum_readings
from torch import nn

from ddsmon import compute_signatures, dying_directions

D, L, N_SAMPLES, NOISE = 20, 4, 120, 0.1
TS = np.logspace(-0.5, -2.0, 8)
EPS = float(np.finfo(np.float64).eps)


def _orthogonal(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((D, D)))
    return q * np.sign(np.diag(r))


def _bridge(r: int, t: float, seed: int = 0):
    """The deep-linear noisy bridge at rank-deficit r and dead singular value t.

    Returns (model, x, y, weights); the same seed gives the same Q's, data and noise for
    every (r, t), so only the dead singular values move along a sweep.
    """
    rng = np.random.default_rng(seed)
    qs = [_orthogonal(rng) for _ in range(L + 1)]
    s = np.ones(D)
    s[D - r :] = t
    weights = [qs[i + 1] @ np.diag(s) @ qs[i].T for i in range(L)]
    s_teacher = np.ones(D)
    s_teacher[D - r :] = 0.0
    teacher = qs[L] @ np.diag(s_teacher) @ qs[0].T
    x = rng.standard_normal((N_SAMPLES, D))
    y = x @ teacher.T + NOISE * rng.standard_normal((N_SAMPLES, D))
    model = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(L)]).double()
    with torch.no_grad():
        for layer, w in zip(model, weights):
            layer.weight.copy_(torch.from_numpy(w))
    return model, torch.from_numpy(x), torch.from_numpy(y), weights, x, y


def _closed_form_spectrum(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Eigenvalues of G at h_1 from the chain rule written out, to full relative accuracy.

    ``Delta = (2/D) E W_4 W_3 W_2`` (rows), and the eigenvalues of ``G = Delta^T Delta / n``
    are the squared singular values of ``Delta / sqrt(n)``: an SVD resolves each of them to
    relative accuracy ~ eps * sigma_max / sigma_i, far better than any eigensolve of G.
    """
    f = x
    for w in weights:
        f = f @ w.T
    delta = 2.0 / D * (f - y) @ weights[3] @ weights[2] @ weights[1]
    return np.linalg.svd(delta / math.sqrt(N_SAMPLES), compute_uv=False) ** 2


@pytest.fixture(scope="module")
def sweep() -> dict[int, list]:
    """Engine readings of layer '0' (h_1) for r = 1..4 over the t sweep, with references."""
    out: dict[int, list] = {}
    for r in (1, 2, 3, 4):
        rows = []
        for t in TS:
            model, xt, yt, weights, x, y = _bridge(r, float(t))
            sig = compute_signatures(
                model, xt, yt, loss="mse", layers=["0"], device="cpu", fisher="activation"
            ).layers["0"]
            g_ref = _closed_form_spectrum(weights, x, y)
            ref = spectrum_readings(g_ref, D * EPS * g_ref[0])
            rows.append((float(t), sig, ref, g_ref))
        out[r] = rows
    return out


def _slope(ts: np.ndarray, values: list[float]) -> float:
    return float(np.polyfit(np.log(ts), np.asarray(values), 1)[0])


def test_engine_matches_closed_form_g_along_the_sweep(sweep: dict[int, list]) -> None:
    """Every point: full rank, and each eigenvalue within the trust floor of the exact one.

    The floor ``floor_g = D eps lambda_max`` is what the engine promises: a float64
    eigensolve of G moves each eigenvalue by at most ~floor_g. So ``|lambda_i - exact_i|
    <= floor_g`` for every i, and logdet within ``sum_i floor_g / lambda_i``. At t = 0.01
    lambda_min is ~4e-13 lambda_max, about 100 floors up.
    """
    for r, rows in sweep.items():
        for t, sig, ref, g_ref in rows:
            what = f"r={r} t={t:.4g}"
            assert sig.finite, what
            assert sig.g_rank == D == ref["rank"], (what, sig.g_rank, ref["rank"])
            assert sig.floor_g == pytest.approx(D * EPS * sig.lambda_max, rel=1e-12, abs=0), what
            assert sig.lambda_max == pytest.approx(ref["lambda_max"], rel=1e-12, abs=0), what
            assert_close_report(sig.g_spectrum, g_ref, atol=sig.floor_g, what=f"g_spectrum {what}")
            assert abs(sig.lambda_min - ref["lambda_min"]) <= sig.floor_g, what
            log_tol = float(np.sum(sig.floor_g / g_ref))
            assert sig.logdet == pytest.approx(ref["logdet"], abs=log_tol), (what, log_tol)


def test_logdet_slope_counts_the_dead_directions(sweep: dict[int, list]) -> None:
    """Slope of log det+(G) vs log t is r times the r = 1 slope (ratios within 0.05)."""
    slopes = {r: _slope(TS, [sig.logdet for _, sig, _, _ in rows]) for r, rows in sweep.items()}
    assert slopes[1] == pytest.approx(6.0, abs=0.1), slopes  # t^6: three t's downstream, squared
    for r in (2, 3, 4):
        ratio = slopes[r] / slopes[1]
        assert abs(ratio - r) <= 0.05, f"r={r}: logdet slope ratio {ratio:.4f} (slopes {slopes})"


def test_lambda_min_slope_is_rank_blind(sweep: dict[int, list]) -> None:
    """Slope of log lambda+_min vs log t is the same for every r (ratios within 0.05 of 1)."""
    slopes = {
        r: _slope(TS, [math.log(sig.lambda_min) for _, sig, _, _ in rows])
        for r, rows in sweep.items()
    }
    assert slopes[1] == pytest.approx(6.0, abs=0.1), slopes
    for r in (2, 3, 4):
        ratio = slopes[r] / slopes[1]
        assert abs(ratio - 1.0) <= 0.05, f"r={r}: lambda_min slope ratio {ratio:.4f} ({slopes})"


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_dying_directions_between_two_checkpoints_reads_r(sweep: dict[int, list], r: int) -> None:
    """dying_directions(t = 10^-1, t = 10^-2) ~ r; reversed (lambda_min rising) is None."""
    rows = sweep[r]
    prev = min(rows, key=lambda row: abs(row[0] - 0.1))[1]
    cur = rows[-1][1]
    got = dying_directions(prev, cur)
    assert got is not None and abs(got - r) <= 0.05, (r, got)
    assert dying_directions(cur, prev) is None
