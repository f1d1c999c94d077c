"""SimplexSpace: stick-breaking weights, its inverse, baselines."""

import optuna
import pytest

from search.errors import MergeSearchError
from search.space import SimplexSpace


@pytest.mark.parametrize("weights", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3] * 3, [0.2, 0.5, 0.3], [0.7, 0.0, 0.3]])
def test_params_round_trip(weights):
    space = SimplexSpace(["a", "b", "c"])
    params = space.params_from_weights(weights)
    assert all(0.0 <= v <= 1.0 for v in params.values())
    assert space.weights_from_params(params) == pytest.approx(weights, abs=1e-12)


def test_uniform_params_give_the_closed_form_weights():
    space = SimplexSpace(["a", "b", "c"])
    # Beta(1,2) inverse CDF at 5/9 is 1/3; Beta(1,1) at 1/2 is 1/2 of what is left.
    assert space.weights_from_params({"stick_0": 5 / 9, "stick_1": 0.5}) == pytest.approx([1 / 3] * 3)
    assert space.params_from_weights([1 / 3] * 3) == pytest.approx({"stick_0": 5 / 9, "stick_1": 0.5})


def test_uniform_parameters_cover_the_simplex_evenly():
    space = SimplexSpace(["a", "b", "c", "d"])
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    firsts, lasts = [], []
    for _ in range(4000):
        t = study.ask()
        w = space.suggest(t)
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
        firsts.append(w[0])
        lasts.append(w[-1])
        study.tell(t, 0.0)
    # Dirichlet(1,1,1,1): every coordinate has mean 1/4
    assert sum(firsts) / len(firsts) == pytest.approx(0.25, abs=0.015)
    assert sum(lasts) / len(lasts) == pytest.approx(0.25, abs=0.015)


def test_baselines_are_each_source_then_uniform():
    space = SimplexSpace(["x", "y"])
    assert space.baselines() == [("x", [1.0, 0.0]), ("y", [0.0, 1.0]), ("uniform", [0.5, 0.5])]


def test_bad_inputs():
    with pytest.raises(MergeSearchError, match="at least 2 models but got 1"):
        SimplexSpace(["only"])
    with pytest.raises(MergeSearchError, match="positive sum"):
        SimplexSpace(["a", "b"]).params_from_weights([0, 0])
