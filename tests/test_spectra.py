"""``ddsmon.spectra`` against closed forms: matrices built from chosen singular values.

X = U diag(s) V^T with orthonormal U (N x r), V (d x r) drawn at random and s chosen, so
the singular values, the rank above the floor and the dead direction (the column of V at
the smallest resolved value) are known exactly. Every shape path of
``read_singular_values`` runs: tall (QR, then the d x d SVD), square, wide (QR of X^T,
the dead direction mapped back through the Householder Q).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddsmon.spectra import gram_of_rows, read_gram, read_singular_values

EPS = float(np.finfo(np.float64).eps)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q


def _matrix(n_rows: int, d: int, s: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = _orthonormal(n_rows, len(s), gen)
    v = _orthonormal(d, len(s), gen)
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T, v


@pytest.mark.parametrize(
    ("n_rows", "d"),
    [(300, 40), (90, 40), (41, 40), (40, 40), (39, 40), (12, 40), (5, 700)],
    ids=["tall", "tall-1.5", "tall+1", "square", "wide-1", "wide", "very-wide"],
)
def test_singular_values_and_dead_direction_match_the_construction(n_rows: int, d: int) -> None:
    r = min(n_rows, d) - 2  # two exact zeros below the floor
    s = np.logspace(0, -6, r).tolist()  # distinct, down to 1e-6: far above the ~1e-13 floor
    x, v = _matrix(n_rows, d, s, seed=n_rows * 1000 + d)
    got = read_singular_values(x, EPS)
    assert got.rank == r and got.sigma_max == pytest.approx(1.0, rel=1e-12)
    assert got.floor == pytest.approx(max(n_rows, d) * EPS * 1.0, rel=1e-12)
    np.testing.assert_allclose(got.values[:r].numpy(), s, rtol=1e-6, atol=0)
    assert got.sigma_min == pytest.approx(s[-1], rel=1e-6)
    assert (got.values[r:] <= got.floor).all()
    # the dead direction is the column of V at sigma_min, up to sign
    u_dead = got.u_dead
    assert u_dead is not None and u_dead.shape == (d,)
    assert float(u_dead.norm()) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(u_dead @ v[:, -1])) == pytest.approx(1.0, abs=1e-8)
    # and it is a right singular vector: |X u| = sigma_min
    assert float((x @ u_dead).norm()) == pytest.approx(s[-1], rel=1e-6)


def test_all_zero_and_empty_matrices_have_no_resolved_value() -> None:
    for shape in [(6, 3), (3, 6), (4, 4)]:
        got = read_singular_values(torch.zeros(shape, dtype=torch.float64), EPS)
        assert got.rank == 0 and got.sigma_min is None and got.u_dead is None
    empty = read_singular_values(torch.zeros(0, 5, dtype=torch.float64), EPS)
    assert empty.rank == 0 and empty.values.numel() == 0


@pytest.mark.parametrize(("n_rows", "d"), [(50, 8), (8, 50)])
def test_gram_of_rows_is_built_on_the_smaller_side_with_one_positive_spectrum(
    n_rows: int, d: int
) -> None:
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(n_rows, d, dtype=torch.float64, generator=gen)
    gram = gram_of_rows(rows, n=n_rows)
    assert gram.shape == (min(n_rows, d),) * 2
    reading = read_gram(gram, EPS)
    expected = np.linalg.eigvalsh((rows.T @ rows / n_rows).numpy())[::-1][: min(n_rows, d)]
    np.testing.assert_allclose(reading.values.numpy(), expected, rtol=1e-10)
    assert reading.rank == min(n_rows, d)
    assert reading.logdet == pytest.approx(float(np.log(expected).sum()), rel=1e-12)
    log_volume = reading.logdet - reading.rank * math.log(reading.lambda_max)
    assert reading.log_volume == pytest.approx(log_volume, rel=1e-12)


def test_rows_sets_the_floor_of_a_factor_that_stands_for_a_taller_matrix() -> None:
    """R (40 x 40) of a 300 x 40 X has X's singular values; with ``rows=300`` its floor
    is X's, ``max(N, d) eps sigma_max`` with N = 300, not R's own 40 rows."""
    x, _ = _matrix(300, 40, [3.0, 2.0, 1.0], seed=7)
    r = torch.linalg.qr(x, mode="r").R
    want = read_singular_values(x, EPS)
    got = read_singular_values(r, EPS, rows=300)
    assert got.floor == pytest.approx(want.floor, rel=1e-12, abs=0)
    assert got.floor == pytest.approx(300 * EPS * 3.0, rel=1e-12, abs=0)
    assert got.rank == want.rank == 3
    assert read_singular_values(r, EPS).floor == pytest.approx(40 * EPS * 3.0, rel=1e-12, abs=0)
    np.testing.assert_allclose(got.values.numpy(), want.values.numpy(), rtol=0, atol=1e-14)
