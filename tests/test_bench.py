"""`merge-search bench merge` runs end to end on a small size and reports every figure.

Speed itself is measured by the benchmark, not asserted here (these machines are noisy)."""

import json

from click.testing import CliRunner

from search.cli import main


def test_bench_merge_reports_every_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_SEARCH_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["bench", "merge", "--params", "3M", "--device", "cpu", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output.strip().splitlines()[-1])
    for key in ("bound_fraction", "speedup_vs_mergekit", "speedup_vs_mergekit_yaml", "ties_speedup_vs_mergekit",
                "peak_memory_ratio"):
        assert fig[key] > 0, key
    assert 2_500_000 < fig["params"] < 3_500_000
    # the rows alone are (N+1)·P·2 bytes: the peak cannot be below them
    assert fig["peak_rss_bytes"] - fig["baseline_rss_bytes"] >= 0.95 * fig["rows_bytes"]
    assert "annotation relaxed" in fig["mergekit_note"]
    assert "of bound" in result.output and "x faster" in result.output


def test_bench_merge_times_every_method_it_is_asked_for(tmp_path, monkeypatch):
    from search.methods import METHODS

    monkeypatch.setenv("MERGE_SEARCH_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["bench", "merge", "--params", "3M", "--device", "cpu", "--repeats", "1",
                                       "--no-mergekit", "--methods", "all", "--json"])
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output.strip().splitlines()[-1])
    timed = fig["per_method"]
    takes_two = [m for m, s in METHODS.items() if s.max_models is None or s.max_models - s.base_row >= 2]
    assert sorted(timed) == sorted(takes_two)
    assert all(v["s"] > 0 and v["first_s"] > 0 and v["models"] >= 2 for v in timed.values())
    assert timed["linear"]["models"] == 3 and timed["slerp"]["models"] == 2
    bad = CliRunner().invoke(main, ["bench", "merge", "--methods", "linear,soup"])
    assert bad.exit_code == 2 and "--methods: unknown merge method 'soup'; known: all, linear" in bad.stderr
