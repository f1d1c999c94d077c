"""`merge-search bench search --quick` runs end to end on the demo family and reports sane figures.

What the search achieves is measured by the full benchmark, not asserted here (2 seeds of short
studies decide nothing); these tests hold the figures to the bounds they must satisfy."""

import json
import math

import pytest
from click.testing import CliRunner

from search.bench.search import POLICIES, SAMPLERS


def test_the_pruning_floor_counts_baselines_and_running_bests_in_full():
    """Baselines 0.5 and 0.4, then 0.6 (a running best), 0.55, 0.7 (best), 0.65: 4 trials in
    full and 2 at one shard of 10 out of 100 examples: (4 * 100 + 2 * 10) / 600."""
    import optuna

    from search.attrs import BASELINE_METHOD
    from search.bench.search import _floor

    study = optuna.create_study(direction="maximize")
    for i, v in enumerate([0.5, 0.4, 0.6, 0.55, 0.7, 0.65]):
        attrs = {"label": f"b{i}"} if i == 0 else {BASELINE_METHOD: "x"} if i == 1 else {}
        study.add_trial(optuna.trial.create_trial(value=v, user_attrs=attrs))
    assert _floor(study, 100, 10) == pytest.approx(420 / 600)
    assert _floor(study, 5, 10) == pytest.approx(1.0)  # a shard larger than the split: everything


@pytest.mark.slow
def test_bench_search_quick_reports_every_figure(demo_family, tmp_path, monkeypatch):
    from search.demo import DEMO_VERSION, demo_family_dir
    from search.samplers import auto_sampler

    # a cache of our own (the grid is written there), holding the already built family
    demo_family_dir(tmp_path).symlink_to(demo_family["base"].parent)
    monkeypatch.setenv("MERGE_SEARCH_CACHE", str(tmp_path))
    from search.cli import main

    result = CliRunner().invoke(main, ["bench", "search", "--quick", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output.strip().splitlines()[-1])
    assert "trials to 99%" in result.output and "goals:" in result.output

    assert fig["seeds"] == 2 and fig["quick"] is True
    n, budget = fig["dev_examples"], fig["budget"]
    # the grid: C(2 + 2, 2) points at step 0.5, accs are counts over the examples
    assert fig["grid_points"] == 6 and fig["grid_cached"] is False
    cache = json.loads((tmp_path / f"bench-grid-v{DEMO_VERSION}.json").read_text())
    assert [len(e["points"]) for e in cache.values()] == [6]
    for acc in (fig["uniform_dev"], fig["dev_optimum"]["value"]):
        assert 0 <= acc <= 1 and math.isclose(acc * n, round(acc * n), abs_tol=1e-6)
    assert fig["dev_optimum"]["value"] >= fig["uniform_dev"]
    assert 0 <= fig["uniform_test"] <= fig["test_optimum"] <= 1
    assert math.isclose(sum(fig["dev_optimum"]["weights"].values()), 1, abs_tol=1e-3)
    assert math.isclose(sum(fig["test_optimum_weights"].values()), 1, abs_tol=1e-3)

    # trials to 99%: at least one trial, at most the cap; auto is the sampler it names
    assert set(fig["trials_to_99pct"]) == {*SAMPLERS, "auto"}
    assert fig["auto_sampler"] == auto_sampler(2) and fig["auto_sampler_layerwise"] == auto_sampler(8)
    assert fig["trials_to_99pct"]["auto"] == fig["trials_to_99pct"][fig["auto_sampler"]]
    for name, v in fig["trials_to_99pct"].items():
        assert 1 <= v <= budget["sampler_budget"] + 1, name
        reached = fig["trials_to_99pct_reached"][name]
        assert 0 <= reached <= 2
        if reached == 0:
            assert v == budget["sampler_budget"] + 1, name

    for kind in ("", "free_", "random_"):
        assert 0 < fig[f"pruning_{kind}examples_fraction"] <= 1
        assert fig[f"pruning_{kind}same_winner"] in (0.0, 0.5, 1.0)
    assert fig["pruning_winner_not_worse"] >= fig["pruning_free_same_winner"]  # the same winner is never worse
    for kind in ("", "random_"):  # the floor counts the 4 baselines in full
        assert 4 / budget["study_trials"] <= fig[f"pruning_{kind}floor"] <= 1
    # on SQLite each shard's reports are one commit: a real cost, well under a second a trial
    assert 0 < fig["report_ms_per_trial"] < 1000 and fig["report_ms_per_trial_in_memory"] >= 0
    assert 0 < fig["trial_overhead_ms"] < 5000 and fig["trial_overhead_ms_in_memory"] >= 0

    for key in ("selection", "selection_layerwise"):
        assert list(fig[key]) == list(POLICIES)
        for policy, v in fig[key].items():
            assert 0 <= v["test_median"] <= 1, (key, policy)
            # regrets are from the grid's test optimum; a candidate off the grid may beat it
            assert math.isclose(v["regret_median"], fig["test_optimum"] - v["test_median"], abs_tol=1e-12)

    goals = fig["goals"]
    assert goals["auto_trials_le_15"] == (fig["trials_to_99pct"]["auto"] <= min(15, budget["sampler_budget"]))
    assert goals["pruning_le_50pct_same_winner"] == (fig["pruning_examples_fraction"] <= 0.5
                                                     and fig["pruning_same_winner"] == 1.0)
    assert isinstance(goals["robust_regret_le_1pt_and_below_best_dev"], bool)
