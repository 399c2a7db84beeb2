"""Closed-form real log canonical thresholds (RLCT) used as ground truth.

Reduced-rank regression (Aoyagi & Watanabe 2005)
------------------------------------------------
The model is a two-layer linear network ``y = B A x + noise`` with ``x`` in R^M,
``A`` (H x M), ``B`` (N x H): input ``M``, output ``N``, hidden (bottleneck) ``H``.
The true map ``B0 A0`` has rank ``r <= min(M, N, H)``. Writing ``K(A, B)`` for the
Kullback-Leibler divergence from the truth (``||BA - B0 A0||^2`` up to the input
covariance), the real log canonical threshold ``lambda`` and its multiplicity ``m``
are read from the largest pole ``-lambda`` (of order ``m``) of the zeta function
``zeta(z) = int K(w)^z phi(w) dw``; the Bayes free energy then grows as
``lambda log n - (m - 1) log log n`` (Watanabe 2009, Ch. 6).

M. Aoyagi and S. Watanabe, "Stochastic complexities of reduced rank regression in
Bayesian estimation", Neural Networks 18(7):924-933, 2005, Theorem 1, resolve the
singularities of ``K`` by blowing-ups and obtain four exclusive cases:

* Case 1, ``N + r <= M + H``, ``M + r <= N + H`` and ``H + r <= M + N``:
    - ``M + N + H + r`` even:
      ``lambda = [2(H + r)(M + N) - (M - N)^2 - (H + r)^2] / 8``, ``m = 1``;
    - ``M + N + H + r`` odd:
      ``lambda = [2(H + r)(M + N) - (M - N)^2 - (H + r)^2 + 1] / 8``, ``m = 2``.
* Case 2, ``M + H < N + r``:  ``lambda = (H M - H r + N r) / 2``, ``m = 1``.
* Case 3, ``N + H < M + r``:  ``lambda = (H N - H r + M r) / 2``, ``m = 1``.
* Case 4, ``M + N < H + r``:  ``lambda = M N / 2``, ``m = 1``.

With ``r <= min(M, N, H)`` the four cases are exclusive and exhaustive: Cases 2 and 3
together would need ``H < r``, Cases 2 and 4 ``M < r``, Cases 3 and 4 ``N < r``, and
Case 1 is the complement of the other three.

Sanity anchors: a regular model has ``lambda = d / 2``; at ``r = H`` (no rank
deficit) every case reduces to ``H (M + N - H) / 2``, half the dimension of the
rank-``H`` matrices (``H(M + N)`` parameters less the ``H^2`` of the ``GL(H)`` gauge).
At ``M = N = H = 1, r = 0`` the model is ``y = b a x`` at ``a = b = 0``,
``K = (ab)^2``, whose RLCT is the textbook ``1/2`` with multiplicity 2.

Example::

    >>> rrr_rlct(10, 5, 2, 1)   # the DDS paper's 14-cell grid is all Case 3
    (9.0, 1)
    >>> rrr_rlct(1, 1, 1, 0)
    (0.5, 2)
"""

from __future__ import annotations

import logging
import operator

__all__ = ("rrr_rlct", "rrr_rlct_case")

logger = logging.getLogger(__name__)


def _check_cell(M: int, N: int, H: int, r: int) -> None:
    for name, value in (("M", M), ("N", N), ("H", H), ("r", r)):
        try:
            operator.index(value)
        except TypeError:
            raise ValueError(
                f"reduced-rank regression cell: {name} must be an integer, got {value!r}"
            ) from None
        if isinstance(value, bool):
            raise ValueError(f"reduced-rank regression cell: {name} must be an integer, got bool")
    for name, value in (("M (input)", M), ("N (output)", N), ("H (hidden)", H)):
        if value <= 0:
            raise ValueError(f"reduced-rank regression cell: {name} must be positive, got {value}")
    if r < 0:
        raise ValueError(f"reduced-rank regression cell: true rank r must be >= 0, got {r}")
    if r > H:
        raise ValueError(
            f"reduced-rank regression cell (M={M}, N={N}, H={H}, r={r}): "
            f"true rank r={r} exceeds the hidden width H={H}; the model cannot realise it"
        )
    if r > min(M, N):
        raise ValueError(
            f"reduced-rank regression cell (M={M}, N={N}, H={H}, r={r}): "
            f"true rank r={r} exceeds min(M, N)={min(M, N)}; no N x M matrix has that rank"
        )


def rrr_rlct_case(M: int, N: int, H: int, r: int) -> int:
    """Which of Aoyagi & Watanabe's (2005) four cases the cell ``(M, N, H, r)`` is in.

    Raises ValueError on an invalid cell (see :func:`rrr_rlct`).
    """
    _check_cell(M, N, H, r)
    if M + H < N + r:
        return 2
    if N + H < M + r:
        return 3
    if M + N < H + r:
        return 4
    return 1


def rrr_rlct(M: int, N: int, H: int, r: int) -> tuple[float, int]:
    """RLCT ``lambda`` and multiplicity ``m`` of reduced-rank regression.

    Args:
        M: input dimension (> 0).
        N: output dimension (> 0).
        H: hidden (bottleneck) width (> 0).
        r: rank of the true map, ``0 <= r <= min(M, N, H)``.

    Returns:
        ``(lambda, m)``: Aoyagi & Watanabe (2005), Theorem 1 (the four cases are
        spelled out in this module's docstring).

    Raises:
        ValueError: a size that is not a positive integer, ``r < 0``, ``r > H``
            (the model cannot realise the truth) or ``r > min(M, N)``.
    """
    case = rrr_rlct_case(M, N, H, r)
    if case == 2:
        return (H * M - H * r + N * r) / 2.0, 1
    if case == 3:
        return (H * N - H * r + M * r) / 2.0, 1
    if case == 4:
        return M * N / 2.0, 1
    num = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + N + H + r) % 2 == 0:
        return num / 8.0, 1
    return (num + 1) / 8.0, 2
