"""dying_directions is at most the active rank whatever number type carries the rank: a
numpy integer (an array's element, ``np.int64``) was not taken for a number and the
count was left above it (17.4 directions dying of a rank of 10)."""

from __future__ import annotations

import numpy as np
import pytest

from ddsmon.signature import dying_directions


@pytest.mark.parametrize("rank", [10, 10.0, np.int64(10), np.int32(10), np.float64(10)])
def test_the_count_is_at_most_the_rank_of_any_number_type(rank: object) -> None:
    prev = {"lambda_min": 1e-2, "logdet": -20.0, "g_rank": rank, "finite": True}
    cur = {"lambda_min": 1e-3, "logdet": -60.0, "g_rank": rank, "finite": True}
    assert dying_directions(prev, cur) == 10.0
    # below the rank, the estimate itself
    cur["logdet"] = -20.0 - 3 * np.log(10.0)
    assert dying_directions(prev, cur) == pytest.approx(3.0)


def test_no_rank_leaves_the_estimate_as_it_is() -> None:
    prev = {"lambda_min": 1e-2, "logdet": -20.0, "finite": True}
    cur = {"lambda_min": 1e-3, "logdet": -60.0, "finite": True}
    assert dying_directions(prev, cur) == pytest.approx(40.0 / np.log(10.0))
