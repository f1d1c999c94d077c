"""MergeSpace: stick-breaking weights, cells for layer groups and filters, configs, baselines."""

import optuna
import pytest

from search.errors import MergeSearchError
from search.mergeconfig import parse_merge_config, resolve
from search.space import MergeSpace, collapsed_stick, simplex_from_sticks, sticks_from_simplex

MODELS = {"a": "/m/a", "b": "/m/b", "c": "/m/c"}


@pytest.mark.parametrize("weights", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3] * 3, [0.2, 0.5, 0.3], [0.7, 0.0, 0.3]])
def test_sticks_round_trip(weights):
    sticks = sticks_from_simplex(weights)
    assert all(0.0 <= v <= 1.0 for v in sticks)
    assert simplex_from_sticks(sticks) == pytest.approx(weights, abs=1e-12)


def test_a_vertex_collapses_its_later_sticks_to_the_value_asked_for():
    """Once the weights so far sum to 1, later sticks do not change the merge."""
    assert sticks_from_simplex([1, 0, 0]) == [1.0, 0.0]
    assert sticks_from_simplex([1, 0, 0], collapsed=0.5) == [1.0, 0.5]
    assert sticks_from_simplex([0, 1, 0], collapsed=0.5) == [0.0, 1.0]
    assert sticks_from_simplex([0.4, 0.6, 0, 0], collapsed=0.5) == pytest.approx([1 - 0.6 ** 3, 1.0, 0.5])
    for tail in (0.0, 0.3, 1.0):  # the whole edge is the one vertex
        assert simplex_from_sticks([1.0, tail]) == [1.0, 0.0, 0.0]


def test_gp_gets_vertex_baselines_in_the_middle_of_their_edge_and_tpe_at_its_end():
    space = MergeSpace("linear", MODELS)
    vertex = space.baselines()[0][1]
    for sampler, tail in ((optuna.samplers.GPSampler(seed=0), 0.5), (optuna.samplers.TPESampler(seed=0), 0.0),
                          (optuna.samplers.RandomSampler(seed=0), 0.0)):
        assert space.params_for(vertex, collapsed_stick(sampler)) == {"g0.rest.stick_0": 1.0, "g0.rest.stick_1": tail}


def test_uniform_sticks_give_the_closed_form_weights():
    # Beta(1,2) inverse CDF at 5/9 is 1/3; Beta(1,1) at 1/2 is 1/2 of what is left.
    assert simplex_from_sticks([5 / 9, 0.5]) == pytest.approx([1 / 3] * 3)
    assert sticks_from_simplex([1 / 3] * 3) == pytest.approx([5 / 9, 0.5])


def test_uniform_parameters_cover_the_simplex_evenly():
    space = MergeSpace("linear", {"a": "a", "b": "b", "c": "c", "d": "d"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    firsts, lasts = [], []
    for _ in range(4000):
        t = study.ask()
        w = space.suggest(t)["g0.rest"]["weight"]
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
        firsts.append(w[0])
        lasts.append(w[-1])
        study.tell(t, 0.0)
    # Dirichlet(1,1,1,1): every coordinate has mean 1/4
    assert sum(firsts) / len(firsts) == pytest.approx(0.25, abs=0.015)
    assert sum(lasts) / len(lasts) == pytest.approx(0.25, abs=0.015)


def test_global_linear_config_and_baselines():
    space = MergeSpace("linear", MODELS)
    labels = [label for label, _ in space.baselines()]
    assert labels == ["a", "b", "c", "uniform"]
    config = space.to_config(dict(space.baselines())["b"])
    assert config == {
        "merge_method": "linear",
        "models": [{"model": "/m/a", "parameters": {"weight": 0.0}}, {"model": "/m/b", "parameters": {"weight": 1.0}},
                   {"model": "/m/c", "parameters": {"weight": 0.0}}],
        "parameters": {"normalize": True}, "dtype": "float32",
    }
    values = dict(space.baselines())["uniform"]
    assert space.params_for(values) == pytest.approx({"g0.rest.stick_0": 5 / 9, "g0.rest.stick_1": 0.5})


def test_layer_groups_and_filters_resolve_to_their_cell_values():
    space = MergeSpace("ties", MODELS, base="/m/base", granularity=2, filters=["self_attn"], num_layers=4)
    assert space.cells == ["g0.self_attn", "g0.rest", "g1.self_attn", "g1.rest"]
    values = {cell: {"weight": [0.1 * (k + 1), 0.2, 0.3], "density": [0.5, 0.6, 0.7 - 0.1 * k]}
              for k, cell in enumerate(space.cells)}
    cfg = parse_merge_config(space.to_config(values))
    # the merge that is run resolves each tensor to its cell's values
    for layer, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        for part, f in (("self_attn.q_proj", "self_attn"), ("mlp.up_proj", "rest")):
            k = space.cells.index(f"g{group}.{f}")
            rec = resolve(cfg, f"model.layers.{layer}.{part}.weight", 4)
            assert rec.params[0]["weight"] == pytest.approx(values[space.cells[k]]["weight"][0])
            assert rec.params[2]["density"] == pytest.approx(values[space.cells[k]]["density"][2])


def test_round_trip_through_trial_params():
    for method, kw in (("linear", {}), ("task_arithmetic", {"base": "/m/base"}), ("dare_ties", {"base": "/m/base"})):
        space = MergeSpace(method, MODELS, granularity=1, filters=["mlp"], num_layers=2, **kw)
        values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask())
        study = optuna.create_study()
        study.enqueue_trial(space.params_for(values))
        again = space.suggest(study.ask())
        for cell in values:
            for key in values[cell]:
                assert again[cell][key] == pytest.approx(values[cell][key], abs=1e-12), (method, cell, key)


def test_slerp_space():
    space = MergeSpace("slerp", {"a": "/m/a", "b": "/m/b"})
    baselines = dict(space.baselines())
    assert space.summary(baselines["a"]) == {"a": 1.0, "b": 0.0}
    config = space.to_config(baselines["uniform"])
    assert config["base_model"] == "/m/a" and config["parameters"] == {"t": 0.5}
    assert config["models"] == [{"model": "/m/a"}, {"model": "/m/b"}]


def test_bad_inputs():
    with pytest.raises(MergeSearchError, match="at least 2 models but got 1"):
        MergeSpace("linear", {"a": "a"})
    with pytest.raises(MergeSearchError, match="ties needs a base model"):
        MergeSpace("ties", MODELS)
    with pytest.raises(MergeSearchError, match="slerp merges exactly 2 models but got 3"):
        MergeSpace("slerp", MODELS)
    with pytest.raises(MergeSearchError, match="granularity must divide the layer count 4 but got 3"):
        MergeSpace("linear", MODELS, granularity=3, num_layers=4)
    with pytest.raises(MergeSearchError, match="unknown merge method 'average'; known: linear"):
        MergeSpace("average", MODELS)
    with pytest.raises(MergeSearchError, match="positive sum"):
        sticks_from_simplex([0, 0])
