"""`merge-search bench learn --quick` runs end to end and its figures hold together.

What the learner achieves is measured by the full benchmark (README), not asserted here: one
seed of 3 steps decides nothing."""

import json

import pytest
from click.testing import CliRunner


@pytest.mark.slow
def test_bench_learn_quick_reports_every_figure(demo_family):
    from search.cli import main

    result = CliRunner().invoke(main, ["bench", "learn", "--quick", "--params", "3M", "--json"])
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output.strip().splitlines()[-1])
    row = fig["per_seed"]["global"][0]
    assert fig["spaces"] == ["global"] and row["learner_steps"] <= 3 and row["blackbox_trials"] >= 4
    # one seed: the pooled paired difference is the difference of the two test scores
    diff, low, high = fig["learned_minus_blackbox"]["global"]
    assert diff == pytest.approx(fig["learned"]["global"] - fig["blackbox"]["global"], abs=1e-12)
    assert low <= diff <= high and row["learned_minus_blackbox"] == [diff, low, high]
    assert 0 < fig["learned"]["global"] <= 1 and 0 < fig["blackbox"]["global"] <= 1
    # the learner wall time bounds the black-box search's, up to its last trial
    assert row["blackbox_s"] >= row["learner_s"] * 0.9
    step = fig["step"]["batch 8 + checkpoint"]
    for run in (step, step["unmapped"]):
        assert run["peak_memory_ratio"] >= run["resident_ratio"] > 0.5 and run["s"] > 0
    assert step["batches"] == 30 and fig["step_peak_memory_ratio_glibc"] == step["peak_memory_ratio"]
    assert fig["step_peak_memory_ratio"] == step["unmapped"]["peak_memory_ratio"] and set(fig["goals"]) == {
        "finest_space_not_below_blackbox", "coarser_within_1_point", "step_peak_memory_le_1.3"}


def test_bench_learn_refuses_no_seeds():
    from search.cli import main

    result = CliRunner().invoke(main, ["bench", "learn", "--seeds", "0"])
    assert result.exit_code != 0 and "seeds must be at least 1" in result.output + str(result.exception)
