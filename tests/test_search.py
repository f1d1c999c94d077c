"""The search: samplers by name, auto's choice, Wilcoxon pruning, bootstrap intervals, selection
that never reads the test split, the refusal to search on test, multi-objective studies."""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml
from click.testing import CliRunner

from search.cli import main
from search.config import load_config
from search.report import leaderboard_rows, selected_trial
from search.samplers import GP_MAX_PARAMS, SAMPLERS, auto_sampler, gp_startup, make_sampler, sampler_name
from evaluation.suite import SuiteResult
from search.pruning import PairedWilcoxonPruner, stopped_estimate
from search.selection import ROBUST_RADII, ROBUST_RADIUS, pareto_front, robust_radius, select, selection_radius, smoothed
from search.space import MergeSpace
from search.study import Searcher, run_search
from search.uncertainty import paired_bootstrap, weighted_score
from tiny import make_family

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ samplers


def _proposals(name: str, seed: int, n: int = 12) -> list[tuple[float, float]]:
    study = optuna.create_study(direction="maximize", sampler=make_sampler(name, seed, n_params=2))
    out = []
    for _ in range(n):
        t = study.ask()
        x, y = t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)
        study.tell(t, -((x - 0.3) ** 2) - (y - 0.6) ** 2)
        out.append((x, y))
    return out


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "auto"])
def test_each_sampler_name_builds_that_sampler_and_is_seeded(name):
    assert sampler_name(make_sampler(name, 0, n_params=2)) == name
    first = _proposals(name, seed=3)
    assert first == _proposals(name, seed=3)  # same seed, same proposals
    assert first != _proposals(name, seed=4)


def test_auto_picks_gp_for_small_spaces_tpe_beyond_and_for_several_objectives():
    assert [auto_sampler(n) for n in (1, 2, 8, GP_MAX_PARAMS, GP_MAX_PARAMS + 1, 192)] == \
        ["gp", "gp", "gp", "gp", "tpe", "tpe"]
    assert auto_sampler(2, n_objectives=2) == "tpe"
    assert sampler_name(make_sampler("auto", 0, n_params=24)) == "tpe"
    models = {f"m{i}": f"/m{i}" for i in range(3)}
    # the space sizes auto sees: 2 sticks globally; 4 layers one per layer: 8; x {self_attn, mlp, rest}: 24
    assert MergeSpace("linear", models, num_layers=4).n_params == 2
    assert MergeSpace("linear", models, num_layers=4, granularity=1).n_params == 8
    assert MergeSpace("linear", models, num_layers=4, granularity=1, filters=["self_attn", "mlp"]).n_params == 24
    assert MergeSpace("ties", models, base="/b", num_layers=4).n_params == 2 + 3  # sticks + one density each
    assert MergeSpace("task_arithmetic", models, base="/b", num_layers=4).n_params == 3


def test_gp_starts_modelling_after_two_trials_per_parameter_at_most_ten():
    assert [gp_startup(n) for n in (1, 2, 4, 5, 8, 16)] == [2, 4, 8, 10, 10, 10]
    # 2 sticks (3 models): GP right after the 4 baselines; the 5th trial is already modelled
    assert make_sampler("gp", 0, n_params=2)._n_startup_trials == 4
    assert make_sampler("auto", 0, n_params=8)._n_startup_trials == 10


# ------------------------------------------------------------------ pruning


class _FakeSuite:
    """A split of 120 examples in 8 shards; a candidate of quality q gets example i right when
    frac(0.618 * i) < q (the same examples are hard for every candidate)."""

    n_shards = 8

    def __init__(self):
        self.example_keys = [f"t/{i}" for i in range(120)]
        self.example_index = {k: i for i, k in enumerate(self.example_keys)}
        self.order = []

    def score_shards(self, model, order):
        self.order.append(list(order))
        self.seen = {}
        for index in order:
            keys = self.example_keys[index::self.n_shards]
            examples = {k: float((0.618 * self.example_index[k]) % 1 < model.q) for k in keys}
            self.seen.update(examples)
            mean = sum(self.seen.values()) / len(self.seen)
            yield SimpleNamespace(examples=examples, result=SuiteResult(score=mean, tasks={}, objective=mean))


def test_the_wilcoxon_pruner_stops_a_clearly_worse_candidate_and_never_a_baseline():
    suite, model = _FakeSuite(), SimpleNamespace(q=0.0)
    searcher = Searcher(cfg=None, sources=[], merger=SimpleNamespace(model=model), space=None, objectives=[],
                        pruning=True)

    def objective(trial):
        model.q = trial.suggest_float("q", 0, 1)
        return searcher._score(trial, suite, [0.0]).objective

    study = optuna.create_study(direction="maximize", pruner=PairedWilcoxonPruner(0.1))
    study.enqueue_trial({"q": 0.9})
    study.enqueue_trial({"q": 0.2}, user_attrs={"label": "m0"})  # a baseline: scored fully
    study.enqueue_trial({"q": 0.2})  # the same candidate, not a baseline: stopped early
    study.enqueue_trial({"q": 0.88})  # close to the best: not clearly worse, scored fully
    study.optimize(objective, n_trials=4)
    # a stopped trial stays COMPLETE with its estimate (so GP learns from it), marked by `seen`
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [t.user_attrs.get("seen", 1.0) < 1 for t in study.trials] == [False, False, True, False]
    assert len(study.trials[1].intermediate_values) == 120  # every example reported at its stable index
    assert sorted(study.trials[0].intermediate_values) == list(range(120))
    seen = study.trials[2].user_attrs["seen"]
    stopped, best = study.trials[2], study.trials[0]
    assert 0 < seen < 0.5 and len(stopped.intermediate_values) == round(seen * 120)
    # its value: the best's plus the mean difference to the best on the examples it saw
    diff = [v - best.intermediate_values[s] for s, v in stopped.intermediate_values.items()]
    assert stopped.value == pytest.approx(best.value + sum(diff) / len(diff), abs=1e-12)
    assert stopped.value < best.value and study.best_trial.number == 0
    # each trial ran the shards in an order seeded by its number: reproducible, not all alike
    assert suite.order[0] != suite.order[1] and len({tuple(o) for o in suite.order}) > 1
    assert all(sorted(o) == list(range(8)) for o in suite.order)


def test_a_pruned_trial_is_marked_and_never_exported():
    study = optuna.create_study(direction="maximize")
    cells = lambda w: {"g0.rest": {"weight": w}}  # noqa: E731
    for number, (w, state, value, seen) in enumerate([
        ([0.5, 0.5], "COMPLETE", 0.6, None), ([0.9, 0.1], "PRUNED", 1.0, 0.25), ([0.2, 0.8], "COMPLETE", 0.7, None),
            ([0.1, 0.9], "COMPLETE", 0.99, 0.5)]):  # stopped, kept COMPLETE with its estimate
        attrs = {"cells": cells(w), "weights": {"a": w[0], "b": w[1]}, "dev_score": value, "merge_config": {"n": number}}
        if seen:
            attrs["seen"] = seen
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state), value=value if state == "COMPLETE" else None,
            params={"x": w[0]}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, user_attrs=attrs))
    rows = leaderboard_rows(study)
    assert [(r["trial"], r["state"]) for r in rows] == [
        (2, "complete"), (0, "complete"), (1, "pruned (25% seen)"), (3, "pruned (50% seen)")]
    assert selected_trial(study).number == 2 and [r["selected"] for r in rows] == [True, False, False, False]


# ------------------------------------------------------------------ intervals


def test_paired_bootstrap_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.random(90)
    strata = np.arange(90) % 3
    same = paired_bootstrap(a, a, strata)
    assert (same.diff, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    shifted = paired_bootstrap(a + 0.25, a, strata, [1.0, 2.0, 1.0])
    assert shifted.diff == pytest.approx(0.25, abs=1e-12)
    assert shifted.low == pytest.approx(0.25, abs=1e-12) and shifted.high == pytest.approx(0.25, abs=1e-12)
    assert shifted.significant
    # the difference is the weighted mean of the task means, as the suite score is
    b = rng.random(90)
    iv = paired_bootstrap(a, b, strata, [1.0, 2.0, 1.0], n=2000, seed=1)
    means = [(a - b)[strata == k].mean() for k in range(3)]
    assert iv.diff == pytest.approx((means[0] + 2 * means[1] + means[2]) / 4, abs=1e-12)
    assert iv.diff == pytest.approx(weighted_score(a, strata, [1, 2, 1]) - weighted_score(b, strata, [1, 2, 1]))
    assert iv.low < iv.diff < iv.high
    assert iv == paired_bootstrap(a, b, strata, [1.0, 2.0, 1.0], n=2000, seed=1)  # seeded
    # the interval's half-width is about 1.96 standard errors of the weighted mean difference
    se = math.sqrt(sum((w / 4) ** 2 * (a - b)[strata == k].var() / 30 for k, w in enumerate([1, 2, 1])))
    assert (iv.high - iv.low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="of one length"):
        paired_bootstrap([1.0], [1.0, 2.0])


# ------------------------------------------------------------------ selection


def _trials(points: list[tuple[list[float], float]]) -> list[optuna.trial.FrozenTrial]:
    trials = [optuna.trial.create_trial(value=v, user_attrs={"cells": {"g0.rest": {"weight": w}}}) for w, v in points]
    for i, t in enumerate(trials):
        t.number = i
    return trials


def test_robust_selection_prefers_a_plateau_to_a_spike_among_low_neighbours():
    spike = ([0.62, 0.0, 0.38], 0.95)
    plateau = [([0.3, 0.3, 0.4], 0.90), ([0.32, 0.3, 0.38], 0.90), ([0.3, 0.32, 0.38], 0.91)]
    # the rest of a study: sources alone and explored points, well below the top, two of them by the spike
    low = [([0.05, 0.9, 0.05], 0.5), ([0.05, 0.05, 0.9], 0.6), ([0.6, 0.0, 0.4], 0.55), ([0.64, 0.0, 0.36], 0.5)]
    trials = _trials([spike, *plateau, *low])
    assert select(trials, "best_dev").number == 0
    assert select(trials, "robust").number == 3  # no per-example scores: the fixed radius 0.1
    values = [t.value for t in trials]
    s = smoothed(trials, values)
    # the spike: the kernel-weighted mean with its two neighbours (distances 0.028 and 0.028)
    k = math.exp(-(0.02 ** 2 * 2) / (2 * 0.1 ** 2))
    assert s[0] == pytest.approx((0.95 + k * 0.55 + k * 0.5) / (1 + 2 * k), abs=2e-3)
    # a candidate with no neighbours keeps its value
    assert smoothed(_trials([([1.0, 0.0, 0.0], 0.4), ([0.0, 1.0, 0.0], 0.8)]), [0.4, 0.8]) == pytest.approx([0.4, 0.8])


def _line_trials(per_example: np.ndarray) -> list[optuna.trial.FrozenTrial]:
    """Candidates on the edge (x, 1 - x, 0) of the simplex, x evenly spaced, with their per-example scores."""
    xs = np.linspace(0.2, 0.8, len(per_example))
    trials = [optuna.trial.create_trial(value=float(e.mean()), user_attrs={
        "cells": {"g0.rest": {"weight": [float(x), float(1 - x), 0.0]}}, "examples": {"score": e.tolist()}})
        for x, e in zip(xs, per_example)]
    for i, t in enumerate(trials):
        t.number = i
    return trials


def test_robust_radius_is_cross_validated_on_the_search_examples():
    xs = np.linspace(0.2, 0.8, 40)
    truth = 0.75 + 0.1 * np.exp(-((xs - 0.5) ** 2) / (2 * 0.1 ** 2))  # a broad hill, peak 0.85 at x = 0.5
    picked = {"robust": [], "best_dev": []}
    for seed in range(8):
        # noisy: each candidate's 60 examples drawn on their own, so its dev arg-max is partly luck
        rng = np.random.default_rng(seed)
        noisy = _line_trials((rng.random((40, 60)) < truth[:, None]).astype(float))
        r = robust_radius(noisy)
        assert r > 0 and r in ROBUST_RADII, seed
        assert robust_radius(noisy) == selection_radius(noisy, "robust") == r  # seeded
        for policy in picked:
            picked[policy].append(truth[select(noisy, policy).number])
    # smoothing as much as cross-validation says finds points truly nearer the peak
    assert np.mean(picked["robust"]) > np.mean(picked["best_dev"]) + 0.005
    # noiseless: every example of a candidate scores its true value; smoothing can only lose
    exact = _line_trials(np.repeat(truth[:, None], 200, axis=1))
    assert robust_radius(exact) == 0.0
    assert select(exact, "robust").number == select(exact, "best_dev").number == int(np.argmax(truth))
    assert selection_radius(exact, "robust") == 0.0 and selection_radius(exact, "best_dev") is None
    # without per-example scores on every candidate: the fixed radius
    bare = _trials([([0.5, 0.5, 0.0], 0.9), ([0.4, 0.6, 0.0], 0.8)])
    assert robust_radius(bare) == ROBUST_RADIUS


def test_the_paired_pruner_stops_a_trial_worse_on_every_example_of_an_easy_subset():
    # the best trial: 16 easy examples at 1.0, 84 hard ones at 0.5 (mean 0.58)
    values = {i: 1.0 if i < 16 else 0.5 for i in range(100)}
    best = optuna.trial.create_trial(value=sum(values.values()) / 100, intermediate_values=values)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        optunas = optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    for pruner, stops in ((PairedWilcoxonPruner(0.1), True), (optunas, False)):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        study.add_trial(best)
        trial = study.ask()
        for i in range(16):  # the easy examples first: 0.9 each, below the best on every one
            trial.report(0.9, i)
        # Optuna's safety check compares 0.9 (this subset) with 0.58 (all of the best's) and keeps it
        assert trial.should_prune() is stops, type(pruner).__name__
        assert stopped_estimate(study, {i: 0.9 for i in range(16)}, 0.9) == pytest.approx(0.58 - 0.1)
    # not worse on the examples seen, or too few of them: kept
    study = optuna.create_study(direction="maximize", pruner=PairedWilcoxonPruner(0.1))
    study.add_trial(best)
    trial = study.ask()
    trial.report(0.4, 50)
    assert not trial.should_prune()  # one example: no test
    for i in range(16):
        trial.report(1.0, i)
    assert not trial.should_prune()  # 16 ties and one worse: mean diff < 0, but p is far above 0.1
    with pytest.raises(ValueError, match="p_threshold"):
        PairedWilcoxonPruner(1.5)


def test_pareto_front_is_the_non_dominated_set():
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.6), (0.9, 0.1)]
    trials = [SimpleNamespace(number=i, values=list(p)) for i, p in enumerate(pts)]
    assert [t.number for t in pareto_front(trials)] == [0, 3, 4, 5]


# ------------------------------------------------------------------ end to end on tiny models

ITEMS = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate([
    ("一是？", ["大", "小"], 0), ("二是？", ["小", "大"], 1), ("三是？", ["大大", "小"], 0), ("四是？", ["一", "二", "三"], 2),
    ("五是？", ["是", "的"], 0), ("六是？", ["七", "八"], 1), ("七是？", ["九", "十"], 0), ("八是？", ["大", "是"], 1)])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    paths = make_family(root / "models", n=3)
    suite = root / "suite"
    suite.mkdir()
    for task, items in (("c", ITEMS[:6]), ("d", ITEMS[2:])):
        for split, part in (("dev", items[:4]), ("test", items[2:])):
            (suite / f"{task}.{split}.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in part))
    (suite / "suite.yaml").write_text(
        "name: s\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n"
        "  - {name: d, kind: choice, data: {dev: d.dev.jsonl, test: d.test.jsonl}}\n")
    cfg = {"name": "tiny", "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
           "eval": {"suite": str(suite), "rescore_top": 2, "batch_size": 4},
           "study": {"n_trials": 9, "seed": 0, "sampler": "tpe"}, "device": "cpu"}
    return root, cfg


def _config(root, data, name, **changes):
    data = json.loads(json.dumps(data)) | {"out": str(root / name)}
    for key, value in changes.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_selection_never_reads_the_test_split(tiny):
    root, data = tiny
    with_test = run_search(load_config(_config(root, data, "with-test")))
    without = run_search(load_config(_config(root, data, "no-test", **{"eval.test_split": None})))
    assert [t.params for t in with_test.trials] == [t.params for t in without.trials]
    assert any(k.startswith("test/") for k in with_test.user_attrs)
    assert not any(k.startswith("test/") for k in without.user_attrs)
    assert selected_trial(with_test).number == selected_trial(without).number


def test_searching_on_the_test_split_is_refused_unless_asked(tiny):
    root, data = tiny
    runner = CliRunner()
    for changes in ({"eval.search_split": "test"}, {"eval.search_split": "dev", "eval.test_split": "dev"}):
        path = _config(root, data, "on-test", **changes)
        r = runner.invoke(main, ["run", str(path)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "the held-out split: a search on it leaves no honest test score" in r.output
        assert r.output.strip().endswith("pass --search-on-test to do it anyway")
        assert not (root / "on-test").exists()  # refused before anything is written
    r = runner.invoke(main, ["run", str(_config(root, data, "on-test", **{"eval.search_split": "test",
                                                                          "eval.test_split": None,
                                                                          "study.n_trials": 4})),
                             "--search-on-test"])
    assert r.exit_code == 0, r.output


def test_a_two_objective_run_writes_the_pareto_column_and_the_front_is_non_dominated(tiny):
    root, data = tiny
    path = _config(root, data, "mo", **{"eval.objectives": [{"name": "c", "tasks": ["c"]}, {"name": "d", "tasks": ["d"]}],
                                       "study.sampler": "auto"})
    r = CliRunner().invoke(main, ["run", str(path)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(root / "mo" / "leaderboard.csv")))
    assert {"dev:c", "dev:d", "test:c", "test:d", "pareto"} <= set(rows[0])
    pts = {int(r["trial"]): (float(r["dev:c"]), float(r["dev:d"])) for r in rows}
    front = {int(r["trial"]) for r in rows if r["pareto"] == "True"}
    dominated = lambda p: any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts.values())  # noqa: E731
    assert front == {n for n, p in pts.items() if not dominated(p)} and front
    best = json.loads((root / "mo" / "best.json").read_text())
    assert best["trial"] in front and set(best["objectives"]) == {"c", "d"}
    # the rule: the front member with the highest mean of its objectives
    assert np.mean(pts[best["trial"]]) == max(np.mean(pts[n]) for n in front)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'mo' / 'study.db'}")
    assert len(study.directions) == 2 and all(len(t.values) == 2 for t in study.trials)
    e = CliRunner().invoke(main, ["export", str(root / "mo"), "--trial", "5", "-o", str(root / "mo5.yaml")])
    assert e.exit_code == 0 and yaml.safe_load((root / "mo5.yaml").read_text()) == study.trials[5].user_attrs["merge_config"]


def test_run_ends_with_one_sentence_on_the_gain_and_its_interval(tiny):
    root, data = tiny
    r = CliRunner().invoke(main, ["run", str(_config(root, data, "sentence"))])
    assert r.exit_code == 0, r.output
    best = json.loads((root / "sentence" / "best.json").read_text())
    line = next(x for x in r.output.splitlines() if x.startswith("best: "))
    dev, test = best["vs_uniform"]["dev"], best["vs_uniform"]["test"]
    verdict = "significant on test" if test["significant"] else "not significant on test"
    assert f"dev {dev['diff']:+.3f} vs uniform [{dev['low']:+.3f}, {dev['high']:+.3f}]" in line
    assert f"test {test['diff']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}]: {verdict}" in line
    assert best["significant_vs_uniform"] == test["significant"]
    assert best["vs_best_source"]["source"] in ("m0", "m1", "m2")
    assert best["significant_vs_best_source"] == best["vs_best_source"]["test"]["significant"]


def test_a_smooth_search_optimises_answer_logprob_and_the_leaderboard_shows_acc(tiny):
    root, data = tiny
    study = run_search(load_config(_config(root, data, "smooth", **{"eval.search_metric": "smooth",
                                                                   "study.n_trials": 5})))
    for t in study.trials:
        tasks = t.user_attrs["dev"]["score"]["tasks"]
        assert t.value == pytest.approx((tasks["c"]["answer_logprob"] + tasks["d"]["answer_logprob"]) / 2, abs=1e-12)
        assert t.user_attrs["dev_score"] == pytest.approx((tasks["c"]["acc"] + tasks["d"]["acc"]) / 2, abs=1e-12)
        assert t.value < 0  # a log-probability
    rows = leaderboard_rows(study)
    assert all(r["dev_objective"] == next(t.value for t in study.trials if t.number == r["trial"]) for r in rows)
    assert [r["dev_score"] for r in rows] == sorted((r["dev_score"] for r in rows), reverse=True)


def test_bad_search_settings_name_the_field(tmp_path):
    good = "name: t\nmodels: [{name: a, path: /a}, {name: b, path: /b}]\n"
    cases = {
        "study: {sampler: bayes}": "study.sampler: Input should be 'auto', 'gp', 'tpe', 'cmaes', 'qmc', 'random' or 'nsga2'",
        "study: {prune_threshold: 1.5}": "study.prune_threshold: Input should be less than 1",
        "study: {select: luck}": "study.select: Input should be 'best_dev' or 'robust'",
        "eval: {search_metric: soft}": "eval.search_metric: Input should be 'primary' or 'smooth'",
        "eval: {objectives: [{name: x}, {name: x}]}": "eval: objective names must be unique but got ['x', 'x']",
        "eval: {objectives: [{name: x}], constraints: [{objective: y, min: 0.5}]}":
            "eval: constraint on objective 'y', which is not one of the objectives ['x']",
        "eval: {bootstrap: 10}": "eval.bootstrap: Input should be greater than or equal to 100",
    }
    from search.errors import ConfigError

    for extra, message in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(good + extra + "\n")
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_an_objective_with_an_unknown_task_is_one_line_and_writes_nothing(tiny):
    root, data = tiny
    path = _config(root, data, "bad-objective", **{"eval.objectives": [{"name": "a", "tasks": ["c"]},
                                                                       {"name": "b", "tasks": ["zz"]}]})
    r = CliRunner().invoke(main, ["run", str(path)])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (
        "error: eval.objectives[1].tasks: unknown task(s) ['zz'] of suite 's'; its tasks: c, d")
    assert not (root / "bad-objective" / "study.db").exists()
