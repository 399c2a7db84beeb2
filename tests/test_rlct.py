"""Aoyagi & Watanabe (2005) RLCT of reduced-rank regression: hand-checked cells."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddsmon.rlct import rrr_rlct, rrr_rlct_case

# The DDS paper's 14-cell grid: M = 10, N = 5, H = 2..5, r = 1..H. All Case 3
# (N + H < M + r, i.e. 5 + H < 10 + r), lambda = (H N - H r + M r) / 2 = (5H - Hr + 10r) / 2.
PAPER_GRID = {
    (2, 1): 9.0,  # (10 - 2 + 10) / 2
    (2, 2): 13.0,  # (10 - 4 + 20) / 2
    (3, 1): 11.0,  # (15 - 3 + 10) / 2
    (3, 2): 14.5,  # (15 - 6 + 20) / 2
    (3, 3): 18.0,  # (15 - 9 + 30) / 2
    (4, 1): 13.0,  # (20 - 4 + 10) / 2
    (4, 2): 16.0,  # (20 - 8 + 20) / 2
    (4, 3): 19.0,  # (20 - 12 + 30) / 2
    (4, 4): 22.0,  # (20 - 16 + 40) / 2
    (5, 1): 15.0,  # (25 - 5 + 10) / 2
    (5, 2): 17.5,  # (25 - 10 + 20) / 2
    (5, 3): 20.0,  # (25 - 15 + 30) / 2
    (5, 4): 22.5,  # (25 - 20 + 40) / 2
    (5, 5): 25.0,  # (25 - 25 + 50) / 2
}


def test_textbook_cell_ab_squared() -> None:
    # M = N = H = 1, r = 0: K = (ab)^2. Case 1 (1 <= 2 three times), M+N+H+r = 3 odd:
    # [2*1*2 - 0 - 1 + 1] / 8 = 4/8 = 1/2, multiplicity 2 (the normal crossing a^2 b^2).
    assert rrr_rlct(1, 1, 1, 0) == (0.5, 2)
    assert rrr_rlct_case(1, 1, 1, 0) == 1


@pytest.mark.parametrize(("H", "r"), sorted(PAPER_GRID))
def test_paper_grid(H: int, r: int) -> None:
    assert rrr_rlct_case(10, 5, H, r) == 3
    assert rrr_rlct(10, 5, H, r) == (PAPER_GRID[(H, r)], 1)


@pytest.mark.parametrize(
    ("cell", "case", "expected"),
    [
        # Case 1, even: M=N=H=2, r=0. Conditions 2<=4, 2<=4, 2<=4; sum 6 even:
        # [2*2*4 - 0 - 4] / 8 = 12/8.
        ((2, 2, 2, 0), 1, (1.5, 1)),
        # Case 1, odd: M=3, N=2, H=2, r=0. Conditions 2<=5, 3<=4, 2<=5; sum 7 odd:
        # [2*2*5 - 1 - 4 + 1] / 8 = 16/8.
        ((3, 2, 2, 0), 1, (2.0, 2)),
        # Case 1, regular point: M=N=H=r=2: [2*4*4 - 0 - 16] / 8 = 2 = H(M+N-H)/2.
        ((2, 2, 2, 2), 1, (2.0, 1)),
        # Case 2: M=5, N=10, H=2, r=1: M+H=7 < N+r=11; (2*5 - 2*1 + 10*1) / 2 = 9
        # (the transpose of the paper's first cell).
        ((5, 10, 2, 1), 2, (9.0, 1)),
        # Case 3 outside the paper grid: M=8, N=3, H=3, r=2: N+H=6 < M+r=10;
        # (3*3 - 3*2 + 8*2) / 2 = 19/2.
        ((8, 3, 3, 2), 3, (9.5, 1)),
        # Case 4: M=2, N=3, H=5, r=1: M+N=5 < H+r=6; M N / 2 = 3.
        ((2, 3, 5, 1), 4, (3.0, 1)),
        # Case 4: M=N=1, H=2, r=1: {b.a = c} is a smooth hypersurface of R^4, codim 1.
        ((1, 1, 2, 1), 4, (0.5, 1)),
    ],
)
def test_hand_checked_cells(
    cell: tuple[int, int, int, int], case: int, expected: tuple[float, int]
) -> None:
    assert rrr_rlct_case(*cell) == case
    assert rrr_rlct(*cell) == expected


@pytest.mark.parametrize(
    ("cell", "needle"),
    [
        ((10, 5, 2, 3), "exceeds the hidden width H=2"),
        ((2, 5, 4, 3), "exceeds min(M, N)=2"),
        ((10, 5, 2, -1), "r must be >= 0"),
        ((0, 5, 2, 0), "M (input) must be positive"),
        ((10, -1, 2, 0), "N (output) must be positive"),
        ((10, 5, 0, 0), "H (hidden) must be positive"),
        ((10, 5, 2.5, 1), "H must be an integer"),
        ((10, 5, 2, True), "r must be an integer"),
    ],
)
def test_invalid_cells(cell: tuple, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        rrr_rlct(*cell)
    assert needle in str(info.value)


@st.composite
def cells(draw: st.DrawFn) -> tuple[int, int, int, int]:
    M = draw(st.integers(1, 30))
    N = draw(st.integers(1, 30))
    H = draw(st.integers(1, 30))
    r = draw(st.integers(0, min(M, N, H)))
    return M, N, H, r


@given(cells())
def test_properties(cell: tuple[int, int, int, int]) -> None:
    M, N, H, r = cell
    lam, m = rrr_rlct(M, N, H, r)
    # symmetric under transposing the map (M <-> N)
    assert rrr_rlct(N, M, H, r) == (lam, m)
    # bounded by half the parameter count and by the regular model of all N x M maps
    assert 0 < lam <= H * (M + N) / 2
    assert lam <= M * N / 2
    # multiplicity 2 only in Case 1 with an odd sum
    assert m == (2 if rrr_rlct_case(M, N, H, r) == 1 and (M + N + H + r) % 2 else 1)
    # more true rank, or a wider model, never lowers lambda
    if r < min(M, N, H):
        assert rrr_rlct(M, N, H, r + 1)[0] >= lam
    assert rrr_rlct(M, N, H + 1, r)[0] >= lam
    # no deficit (r = H): half the dimension of rank-H maps, H(M+N) - H^2
    if r == H:
        assert (lam, m) == (H * (M + N - H) / 2, 1)


def test_docstring_examples_run() -> None:
    import doctest

    import ddsmon.rlct

    result = doctest.testmod(ddsmon.rlct)
    assert result.attempted >= 2
    assert result.failed == 0
