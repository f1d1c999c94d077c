"""search/bench/grid.py: the simplex grid (closed forms) and its validation."""

import pytest

from search.bench.grid import simplex_grid
from search.errors import MergeSearchError


def test_simplex_grid_counts_and_sums():
    points = simplex_grid(3, 0.05)
    assert len(points) == 231  # C(20 + 2, 2)
    assert len(set(points)) == 231
    assert all(len(p) == 3 and abs(sum(p) - 1) < 1e-9 and min(p) >= 0 for p in points)
    assert points[0] == (1.0, 0.0, 0.0) and points[-1] == (0.0, 0.0, 1.0)
    assert (0.35, 0.3, 0.35) in points  # rounded: no 0.35000000000000003
    assert len(simplex_grid(4, 0.1)) == 286  # C(10 + 3, 3)


def test_simplex_grid_small_cases():
    assert simplex_grid(2, 0.5) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert simplex_grid(1, 0.25) == [(1.0,)]
    assert simplex_grid(3, 1.0) == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


@pytest.mark.parametrize("step", [0.3, 0.0, -0.1, 1.5])
def test_simplex_grid_refuses_a_step_that_does_not_divide_one(step):
    with pytest.raises(MergeSearchError, match=f"step must divide 1 .* but got {step}"):
        simplex_grid(3, step)


def test_simplex_grid_refuses_no_models():
    with pytest.raises(MergeSearchError, match="n_models must be at least 1 but got 0"):
        simplex_grid(0)
