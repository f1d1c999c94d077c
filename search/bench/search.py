"""`merge-search bench search`: how well the search finds good weights on the demo family.

    merge-search bench search --json      # 5 seeds, about 10 minutes on 2 CPU cores
    merge-search bench search --quick     # 2 seeds, coarse grid, short studies (the test)

Every study runs in memory with the 4 baselines (each source, uniform) enqueued first, as `run`
does; seed i seeds the sampler of every study of seed i. Figures (acc is the demo suite's
primary score; medians over seeds):

- grid: dev and test acc on a dense grid over the 3-model simplex (`grid.py`; step 0.05, 231
  points, plus the uniform point), cached in the demo cache folder per DEMO_VERSION.
  `uniform_dev`, `uniform_test`; `dev_optimum` {value, weights}; `test_optimum` (the target
  every regret is measured from) and `test_optimum_weights`. A candidate off the grid may beat
  it: a negative regret.
- `trials_to_99pct` {sampler: trials}: trials (baselines included) until one reaches 99% of
  the grid's dev optimum, each study stopped there; `sampler_budget` + 1 when never reached
  (`trials_to_99pct_reached` counts the seeds that did). `auto` is `auto_sampler`'s pick
  (`auto_sampler`), measured once under its own name. The studies optimise the demo config's
  `eval.search_metric` (`search_metric`; the target is always dev acc);
  `auto_trials_to_99pct_by_metric` has auto's figure on either metric.
- pruning, sampler auto, `study_trials` trials on the demo's search metric, Wilcoxon vs none. `pruning_examples_fraction`
  and `pruning_same_winner` replay each unpruned study's candidates, in its order and with its
  trial numbers, with the pruner on: the examples scored over those without (a stopped trial
  counts the share it saw), and the share of seeds whose best fully scored candidate is the
  same (or scores the same). `pruning_free_*`: the same for a study that runs with the pruner
  from the start; its sampler sees the stopped trials' estimates and proposes other points, so
  its winner can differ without the pruner having stopped the other study's winner;
  `pruning_winner_not_worse` is the share of seeds whose free-running winner is not
  significantly below the unpruned one on dev (paired bootstrap, 95%). `report_ms_per_trial`:
  the per-trial time spent reporting per-example values and asking the pruner (SQLite, as in
  `run`; `_in_memory` alongside). `pruning_random_*`: the replayed figures for studies of the
  random sampler, which keeps proposing candidates the pruner can stop. `pruning_floor` (and
  `pruning_random_floor`): the least share any pruner could score on the unpruned studies
  without stopping the winner or a running best (a pruner cannot tell one that will be overtaken
  later from the winner), as those are scored in full (median
  over the seeds; each other trial counted at one shard). A GP study's new bests cannot be
  stopped, and its converged tail of near-copies of the best could be only by luck.
- `selection` {policy: {test_median, regret_median}}: the candidate each policy picks from a
  sampler-auto study (best_dev, robust: the study that optimises acc; +smooth: the one that
  optimises the mean answer log-probability), scored on test; regret = `test_optimum` - its
  test acc.
  `selection_layerwise`: the same with one weight set per layer (granularity 1).
- `trial_overhead_ms`: per trial, wall time minus merge and eval (sampler, storage, reports)
  in a SQLite study like `run`'s (the demo setup, pruning on); `_in_memory` for the unpruned
  studies.
- `goals`: auto within 15 trials; pruning at most half the examples with the same winner on
  every seed; robust's regret at most 1 point and not above best_dev's, globally and per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import optuna
import torch

log = logging.getLogger(__name__)

SAMPLERS = ("gp", "tpe", "cmaes", "qmc", "random")
POLICIES = ("best_dev", "robust", "best_dev+smooth", "robust+smooth")
TARGET = 0.99  # share of the grid's dev optimum a sampler must reach


@dataclass(frozen=True)
class Budget:
    grid_step: float
    sampler_budget: int  # trials per sampler study, baselines included
    study_trials: int  # pruning and global selection studies
    layer_trials: int  # layer-wise selection studies (8 parameters)
    overhead_trials: int  # the SQLite study


FULL = Budget(grid_step=0.05, sampler_budget=60, study_trials=30, layer_trials=60, overhead_trials=30)
QUICK = Budget(grid_step=0.5, sampler_budget=5, study_trials=6, layer_trials=6, overhead_trials=5)


def _score(s, config: dict, split: str) -> float:
    """Primary acc of the merge `config` on the search ("dev") or test split."""
    s.merger.apply(config)
    o = s.objectives[0]
    return (o.search if split == "dev" else o.test).score(s.merger.model).score


def _grid(s, step: float) -> tuple[dict, bool]:
    """{"points": [[*weights, dev, test]], "uniform": [dev, test]}, from the cache when there."""
    from search.bench.grid import score_grid, simplex_grid
    from search.demo import DEMO_VERSION, cache_root

    o = s.objectives[0]
    keys = json.dumps([s.space.names, o.search.example_keys, o.test.example_keys])
    key = f"step={step:g}/{hashlib.sha1(keys.encode()).hexdigest()[:12]}"  # another suite: another entry
    path = cache_root() / f"bench-grid-v{DEMO_VERSION}.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return cache[key], True
    n = len(s.space.names)
    rows = score_grid(s.merger, s.space, {"dev": o.search, "test": o.test}, [*simplex_grid(n, step), [1 / n] * n])
    points = [[*r["weights"], r["dev"]["score"], r["test"]["score"]] for r in rows]
    entry = {"points": points[:-1], "uniform": points[-1][-2:]}
    cache = json.loads(path.read_text()) if path.is_file() else {}  # another run may have added keys
    cache[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    return entry, False


def _study(s, sampler: str, seed: int, prune_threshold: float | None = None) -> optuna.Study:
    """An in-memory study with the baselines enqueued, as `run` starts one (Wilcoxon pruning if a threshold)."""
    from search.samplers import make_sampler

    from search.pruning import PairedWilcoxonPruner

    pruner = PairedWilcoxonPruner(prune_threshold) if prune_threshold else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=make_sampler(sampler, seed, n_params=s.space.n_params))
    s.enqueue_baselines(study)
    return study


def _trials_to(s, sampler: str, seed: int, target: float, budget: int) -> int:
    """Trials until one's dev acc reaches `target` (the study stops there); budget + 1 if never."""
    study = _study(s, sampler, seed)

    def stop(study, trial):
        if trial.user_attrs.get("dev_score", 0.0) >= target:
            study.stop()

    study.optimize(s.objective, n_trials=budget, callbacks=[stop])
    hit = [t.number + 1 for t in study.trials if t.user_attrs.get("dev_score", 0.0) >= target]
    return min(hit) if hit else budget + 1


def _replay(s, plain: optuna.Study, threshold: float) -> optuna.Study:
    """`plain`'s candidates again, in the same order and with the same trial numbers (so the same
    example orders), scored with Wilcoxon pruning: what pruning saves and whether it stops the
    winner, with the sampler's reaction to pruned estimates taken out."""
    from search.attrs import BASELINE_METHOD
    from search.pruning import PairedWilcoxonPruner

    study = optuna.create_study(direction="maximize", pruner=PairedWilcoxonPruner(threshold),
                                sampler=optuna.samplers.RandomSampler(0))
    trials = sorted(_finished(plain), key=lambda t: t.number)
    for t in trials:
        attrs = {k: v for k, v in t.user_attrs.items() if k in ("label", BASELINE_METHOD)}
        study.enqueue_trial(t.params, user_attrs=attrs)
    study.optimize(s.objective, n_trials=len(trials))
    return study


def _examples(study: optuna.Study, n: int) -> float:
    """Examples scored in the study: `n` per fully scored trial, its `seen` share of `n` per stopped one."""
    return sum(n * t.user_attrs.get("seen", 1.0) for t in _finished(study))  # stopped: PRUNED or COMPLETE


def _floor(study: optuna.Study, n: int, shard: int) -> float:
    """The least share of `study`'s examples that any pruner can score without stopping its winner
    or a running best: every baseline and every trial that beat all before it in full (a pruner
    cannot tell a candidate that will be overtaken later from the winner), one shard of each other."""
    from search.attrs import BASELINE_METHOD

    best, full, trials = float("-inf"), 0, sorted(_finished(study), key=lambda t: t.number)
    for t in trials:
        if BASELINE_METHOD in t.user_attrs or t.user_attrs.get("label") or t.value > best:
            full += 1
        best = max(best, t.value)
    return (full * n + (len(trials) - full) * min(shard, n)) / (len(trials) * n)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from search.study import finished

    return finished(study)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    from search.selection import complete_trials

    return max(complete_trials(study), key=lambda t: (t.value, -t.number))  # the study's objective


def _not_worse(s, plain: optuna.trial.FrozenTrial, pruned: optuna.trial.FrozenTrial) -> bool:
    """The pruned study's winner is not significantly worse on dev than the unpruned one's: the
    paired-bootstrap 95% interval of (pruned - plain) over the dev examples reaches 0."""
    from search.uncertainty import paired_bootstrap

    keys = s.objectives[0].search.example_keys
    tasks = list(dict.fromkeys(k.split("/", 1)[0] for k in keys))
    weights = {t.name: t.weight for t in s.objectives[0].search.suite.tasks}
    a, b = (t.user_attrs["examples"][next(iter(t.user_attrs["examples"]))] for t in (pruned, plain))
    iv = paired_bootstrap(a, b, [tasks.index(k.split("/", 1)[0]) for k in keys], [weights[t] for t in tasks])
    return iv.high >= 0


def _overhead_ms(trials) -> float:
    """Median per-trial wall time outside merge and eval, in ms."""
    return 1e3 * statistics.median(
        (t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["timing"]["merge_s"]
        - t.user_attrs["timing"]["eval_s"] for t in trials)


def _selection(s, studies: dict[str, list[optuna.Study]], test_optimum: float) -> dict:
    """{policy: {test_median, regret_median}} over the seeds' studies ({"": acc, "+smooth": smooth})."""
    from search.selection import complete_trials, select

    out = {}
    for suffix, per_seed in studies.items():
        scored: dict[tuple[int, int], float] = {}  # (seed, trial) -> test acc: both policies may pick one
        for policy in ("best_dev", "robust"):
            tests = []
            for i, study in enumerate(per_seed):
                t = select(complete_trials(study), policy)
                if (i, t.number) not in scored:
                    scored[i, t.number] = _score(s, t.user_attrs["merge_config"], "test")
                tests.append(scored[i, t.number])
            median = statistics.median(tests)
            out[policy + suffix] = {"test_median": median, "regret_median": test_optimum - median}
    return {p: out[p] for p in POLICIES}


def bench_search(*, seeds: int = 5, device: str = "cpu", quick: bool = False) -> dict:
    """Run every measurement of the module docstring on the demo family; returns the figures."""
    from search.config import load_config
    from search.errors import MergeSearchError
    from search.samplers import auto_sampler
    from search.study import Searcher, create_study

    if seeds < 1:
        raise MergeSearchError(f"seeds must be at least 1 but got {seeds}")
    b = QUICK if quick else FULL
    # the bench's studies run past the demo's n_trials: the budget check (for workers) must not stop them
    config = lambda **kw: load_config(None, **{"device": device, "study.pruner": "none",  # noqa: E731
                                               "study.n_trials": 10_000, **kw})
    built: dict[str, Searcher] = {}
    clock, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        clock[name] = round(time.perf_counter() - t0, 1)
        log.info("bench search: %s done in %.0fs", name, clock[name])
        t0 = time.perf_counter()

    try:
        metric = config().eval.search_metric  # the demo's: what `run` optimises
        for name, kw in {"primary": {"eval.search_metric": "primary"}, "smooth": {"eval.search_metric": "smooth"},
                         "pruned": {"study.pruner": "wilcoxon"},
                         "layer": {"merge.granularity": 1, "eval.search_metric": "primary"},
                         "layer+smooth": {"merge.granularity": 1, "eval.search_metric": "smooth"}}.items():
            built[name] = Searcher.build(config(**kw))  # sources and tokenized suites: once per setup
        g = built[metric]  # the samplers and the pruning run on the demo's setup
        other = "primary" if metric == "smooth" else "smooth"
        names = g.space.names
        lap("build")

        grid, cached = _grid(g, b.grid_step)
        uniform_dev, uniform_test = grid["uniform"]
        rows = grid["points"] + [[1 / len(names)] * len(names) + grid["uniform"]]  # uniform is a candidate too
        best_dev, best_test = max(rows, key=lambda r: r[-2]), max(rows, key=lambda r: r[-1])  # ties: the grid's
        dev_optimum, test_optimum = best_dev[-2], best_test[-1]
        lap("grid")

        auto = auto_sampler(g.space.n_params)
        target = TARGET * dev_optimum - 1e-9  # acc is a ratio of counts: no float near-misses
        runs = {name: [_trials_to(g, name, seed, target, b.sampler_budget) for seed in range(seeds)]
                for name in SAMPLERS}
        runs["auto"] = runs[auto]
        runs_other = [_trials_to(built[other], auto, seed, target, b.sampler_budget) for seed in range(seeds)]
        lap("samplers")

        ps = built["pruned"]
        plain, pruned = [], []  # the unpruned studies serve the selection too
        for seed in range(seeds):
            for s, out, threshold in ((g, plain, None), (ps, pruned, ps.cfg.study.prune_threshold)):
                out.append(_study(s, "auto", seed, threshold))
                out[-1].optimize(s.objective, n_trials=b.study_trials)
        replayed = [_replay(ps, a, ps.cfg.study.prune_threshold) for a in plain]
        n = len(g.objectives[0].search.example_keys)
        share = lambda pairs: statistics.median(_examples(w, n) / _examples(a, n) for a, w in pairs)  # noqa: E731
        same = lambda pairs: [_best(a).user_attrs["weights"] == _best(w).user_attrs["weights"]  # noqa: E731
                              or _best(a).value == _best(w).value for a, w in pairs]
        same_replayed, same_free = same(zip(plain, replayed)), same(zip(plain, pruned))
        not_worse = [_not_worse(g, _best(a), _best(w)) for a, w in zip(plain, pruned)]
        fraction_free = share(zip(plain, pruned))
        floor = statistics.median(_floor(a, n, ps.cfg.study.shard_size) for a in plain)
        explorer = []  # what pruning saves when the sampler keeps exploring: random, replayed
        for seed in range(seeds):
            explorer.append(_study(g, "random", seed))
            explorer[-1].optimize(g.objective, n_trials=b.study_trials)
        explorer_replayed = [_replay(ps, a, ps.cfg.study.prune_threshold) for a in explorer]
        same_explorer = same(zip(explorer, explorer_replayed))
        floor_random = statistics.median(_floor(a, n, ps.cfg.study.shard_size) for a in explorer)
        lap("pruning")

        def studies(s, n_trials):
            out = []
            for seed in range(seeds):
                out.append(_study(s, "auto", seed))
                out[-1].optimize(s.objective, n_trials=n_trials)
            return out

        by_metric = {metric: plain, other: studies(built[other], b.study_trials)}
        selection = _selection(g, {"": by_metric["primary"], "+smooth": by_metric["smooth"]}, test_optimum)
        lap("selection")
        layer = built["layer"]
        selection_layerwise = _selection(layer, {"": studies(layer, b.layer_trials),
                                                 "+smooth": studies(built["layer+smooth"], b.layer_trials)},
                                         test_optimum)
        lap("selection_layerwise")

        with tempfile.TemporaryDirectory() as tmp:  # a SQLite study as `run` makes it: the demo setup prunes
            cfg = config(**{"study.pruner": "wilcoxon", "out": tmp, "study.storage": f"sqlite:///{tmp}/study.db"})
            study = create_study(cfg, ps.space, pruning=True)
            ps.enqueue_baselines(study)
            study.optimize(ps.objective, n_trials=b.overhead_trials)
            trials = _finished(study)
            overhead = _overhead_ms(trials)
            report_ms = 1e3 * statistics.median(t.user_attrs["timing"]["report_s"] for t in trials)
        lap("overhead")
    finally:
        for s in built.values():
            s.close()

    trials_to = {name: statistics.median(v) for name, v in runs.items()}
    robust_ok = all(sel["robust"]["regret_median"] <= 0.01
                    and sel["robust"]["regret_median"] <= sel["best_dev"]["regret_median"]
                    for sel in (selection, selection_layerwise))
    fraction = share(zip(plain, replayed))
    same_winner = sum(same_replayed) / len(same_replayed)
    weights = lambda row: {m: round(w, 4) for m, w in zip(names, row)}  # noqa: E731
    return {
        "bench": "search",
        "seeds": seeds,
        "quick": quick,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "budget": asdict(b),
        "dev_examples": n,
        "grid_points": len(grid["points"]),
        "grid_cached": cached,
        "uniform_dev": uniform_dev,
        "uniform_test": uniform_test,
        "dev_optimum": {"value": dev_optimum, "weights": weights(best_dev)},
        "test_optimum": test_optimum,
        "test_optimum_weights": weights(best_test),
        "auto_sampler": auto,
        "search_metric": metric,
        "auto_trials_to_99pct_by_metric": {metric: trials_to["auto"], other: statistics.median(runs_other)},
        "trials_to_99pct": trials_to,
        "trials_to_99pct_reached": {name: sum(x <= b.sampler_budget for x in v) for name, v in runs.items()},
        "pruning_examples_fraction": fraction,
        "pruning_floor": floor,
        "pruning_random_floor": floor_random,
        "pruning_same_winner": same_winner,
        "pruning_random_examples_fraction": share(zip(explorer, explorer_replayed)),
        "pruning_random_same_winner": sum(same_explorer) / len(same_explorer),
        "pruning_free_examples_fraction": fraction_free,
        "pruning_free_same_winner": sum(same_free) / len(same_free),
        "pruning_winner_not_worse": sum(not_worse) / len(not_worse),
        "report_ms_per_trial": report_ms,
        "report_ms_per_trial_in_memory": 1e3 * statistics.median(
            t.user_attrs["timing"]["report_s"] for w in pruned for t in _finished(w)),
        "selection": selection,
        "auto_sampler_layerwise": auto_sampler(layer.space.n_params),
        "selection_layerwise": selection_layerwise,
        "trial_overhead_ms": overhead,
        "trial_overhead_ms_in_memory": _overhead_ms([t for a in plain for t in _finished(a)]),
        "seconds": clock,
        "goals": {
            "auto_trials_le_15": trials_to["auto"] <= min(15, b.sampler_budget),  # the cap is no hit
            "pruning_le_50pct_same_winner": fraction <= 0.5 and same_winner == 1.0,
            "robust_regret_le_1pt_and_below_best_dev": robust_ok,
        },
    }


def report(fig: dict) -> str:
    """Human-readable lines of `bench_search`'s figures."""
    w = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
    b = fig["budget"]
    lines = [
        f"demo family, {fig['seeds']} seeds, {fig['dev_examples']} dev examples, {fig['device']} "
        f"({fig['torch_threads']} threads); {sum(fig['seconds'].values()):.0f}s",
        f"grid ({fig['grid_points']} points, step {b['grid_step']}{', cached' if fig['grid_cached'] else ''}): "
        f"uniform dev {fig['uniform_dev']:.4f} test {fig['uniform_test']:.4f}; dev optimum "
        f"{fig['dev_optimum']['value']:.4f} at {w(fig['dev_optimum']['weights'])}; test optimum "
        f"{fig['test_optimum']:.4f} at {w(fig['test_optimum_weights'])}",
        f"trials to {TARGET:.0%} of the dev optimum (median; budget {b['sampler_budget']}, "
        f"{b['sampler_budget'] + 1} = not reached):",
    ]
    for name, v in fig["trials_to_99pct"].items():
        label = f"auto (= {fig['auto_sampler']})" if name == "auto" else name
        lines.append(f"  {label:<12} {v:>5g}  (reached on {fig['trials_to_99pct_reached'][name]}/{fig['seeds']} seeds)")
    lines += [
        f"  (the demo searches on {fig['search_metric']}; auto by search metric: "
        + ", ".join(f"{k} {v:g}" for k, v in fig["auto_trials_to_99pct_by_metric"].items()) + ")",
        f"pruning ({b['study_trials']} trials), the same candidates replayed: {fig['pruning_examples_fraction']:.0%} "
        f"of the examples, same winner on {fig['pruning_same_winner']:.0%} of seeds; free-running: "
        f"{fig['pruning_free_examples_fraction']:.0%}, same winner on {fig['pruning_free_same_winner']:.0%}, not "
        f"significantly worse on {fig['pruning_winner_not_worse']:.0%}; reports {fig['report_ms_per_trial']:.1f} "
        f"ms/trial on SQLite ({fig['report_ms_per_trial_in_memory']:.1f} in memory); random sampler, replayed: "
        f"{fig['pruning_random_examples_fraction']:.0%}, same winner on {fig['pruning_random_same_winner']:.0%}; "
        f"the floor (baselines and running bests in full, one shard of the rest): "
        f"{fig['pruning_floor']:.0%} for auto, {fig['pruning_random_floor']:.0%} for random",
    ]
    for key, what in (("selection", f"global, {b['study_trials']} trials"),
                      ("selection_layerwise", f"per layer, {b['layer_trials']} trials")):
        lines.append(f"selection ({what}): " + "; ".join(
            f"{p} test {v['test_median']:.4f} regret {v['regret_median']:+.4f}" for p, v in fig[key].items()))
    lines.append(f"trial overhead outside merge+eval: {fig['trial_overhead_ms']:.0f} ms on SQLite, "
                 f"{fig['trial_overhead_ms_in_memory']:.0f} ms in memory")
    lines.append("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in fig["goals"].items()))
    return "\n".join(lines)
