"""The search: an Optuna study whose trials merge in memory and score on the eval suite.

    suggest -> merger.apply -> suite.score -> value (+ weights, per-task scores, timings)

The Optuna storage is the single source of truth: every trial keeps its derived weights and
per-task scores as user attributes, held-out (test) re-scores are study user attributes, and
running again with the same storage and study name resumes the study.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from transformers import AutoTokenizer

from evaluation.suite import EvalSuite, SuiteResult
from evaluation.tasks import ANY_SPLIT, load_suite
from search.checkpoints import Checkpoint, assert_aligned, open_checkpoint, resolve_model_path
from search.config import RunConfig
from search.errors import MergeSearchError
from search.merger import InMemoryMerger, resolve_device
from search.methods import DTYPES, METHODS
from search.samplers import make_sampler, sampler_name
from search.selection import complete_trials, select
from search.space import MergeSpace, collapsed_stick
from search.pruning import PairedWilcoxonPruner, stopped_estimate
from search.storage import _file_path, load_existing_study, mask_url, open_storage, report_many, storage_kind  # noqa: F401

log = logging.getLogger(__name__)

from search.attrs import BASELINE_METHOD, BOOTSTRAP_ATTR, EVAL_ATTR, EXAMPLES_ATTR, MERGE_ATTR, SCORE, SELECT_ATTR, SOURCES_ATTR, TEST_ATTR

SET_CONSTRAINT = hasattr(optuna.Trial, "set_constraint")  # optuna >= 5: constraints_func is deprecated
PRUNE_MIN_EXAMPLES = 50  # `pruner: null` prunes when the search split has at least this many examples



def source_path(path: str, base_dir: Path | None) -> Path:
    """A model path from the config: `demo:<name>` (built on first use), a folder, or a cached hub id."""
    if path.startswith("demo:"):
        from search.demo import MODEL_NAMES, ensure_demo_family

        name = path.removeprefix("demo:")
        if name not in (*MODEL_NAMES, "base"):
            raise MergeSearchError(f"unknown demo model {path!r}; the demo family has base, {', '.join(MODEL_NAMES)}")
        return ensure_demo_family()[name]
    return resolve_model_path(path, base_dir)


def open_sources(cfg: RunConfig) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Open every model of the config (and the base) and check they can be merged."""
    ckpts = [open_checkpoint(m.name, source_path(m.path, cfg.base_dir)) for m in cfg.models]
    base = None
    wants_base = METHODS[cfg.merge.method].base_row or any(METHODS[m].base_row for m in cfg.baseline_methods)
    if cfg.merge.base_model and wants_base:  # slerp's base is one of its models
        base = open_checkpoint("base", source_path(cfg.merge.base_model, cfg.base_dir))
    assert_aligned(ckpts + ([base] if base else []))
    return ckpts, base


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraints_func: `min - value` per constraint (<= 0 is feasible)."""
    return trial.user_attrs.get("constraints", [0.0])


def create_study(cfg: RunConfig, space: MergeSpace, pruning: bool = False) -> optuna.Study:
    """Create or load the study named in `cfg` (resume = load), with its sampler and pruner."""
    storage = open_storage(cfg.storage_url, create=True,
                           heartbeat=(cfg.study.heartbeat_interval, cfg.study.grace_period))
    n_objectives = len(cfg.eval.objectives or [None])

    def sampler(n_existing: int) -> optuna.samplers.BaseSampler:
        # Offset the seed by the trials already stored so a resumed study does not replay its
        # first proposals.
        return make_sampler(cfg.study.sampler, cfg.study.seed + n_existing, n_params=space.n_params,
                            n_objectives=n_objectives,
                            constraints=_constraints if cfg.eval.constraints and not SET_CONSTRAINT else None)

    pruner = PairedWilcoxonPruner(cfg.study.prune_threshold) if pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=storage, study_name=cfg.study_name, directions=["maximize"] * n_objectives,
        sampler=sampler(0), pruner=pruner, load_if_exists=True,
    )
    if study.trials:
        study.sampler = sampler(len(study.trials))
    return study


class SurplusTrial(Exception):
    """A trial past the study's budget (another worker took the last slot first): it is failed
    at once, unscored, with the user attr `surplus`, and this worker stops."""


WORKERS_ENV = "MERGE_SEARCH_WORKERS"  # set by `run --workers K` for its worker processes
_LIVE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING,
         optuna.trial.TrialState.WAITING)  # trials that count toward the budget, or will
_COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


def _check_budget(trial: optuna.Trial, n_trials: int, grace_period: float) -> None:
    """Workers share one study and `study.n_trials` counts its finished trials, whoever ran them:
    the trials in the budget are the first n_trials by number among the finished and running
    ones (numbers are handed out by the storage, so every worker agrees), running ones that are
    known dead left out. A later one, or a second copy of a baseline that two workers enqueued
    at once, is surplus. A running trial that has not reached its objective yet (no `worker`:
    its sampler is still proposing) counts until it is older than the grace period."""
    import datetime

    now, host = datetime.datetime.now(), socket.gethostname()
    others = [t for t in trial.study.get_trials(deepcopy=False, states=_COUNTED)
              if t.number < trial.number and not _dead(t, now, host, grace_period)]
    label = trial.user_attrs.get("label")
    duplicate = label is not None and any(t.user_attrs.get("label") == label for t in others)
    over = label != LEARNED and sum(in_budget(t) for t in others) >= n_trials  # learned: one trial past the budget
    if over or duplicate:
        trial.set_user_attr("surplus", "duplicate baseline" if duplicate else "over the budget")
        raise SurplusTrial(f"trial {trial.number} is surplus")


def _dead(t: optuna.trial.FrozenTrial, now, host: str, grace_period: float) -> bool:
    """A RUNNING trial whose process is gone: a local worker pid that no longer exists, or no
    worker recorded and older than the grace period. Other states are never dead."""
    if t.state != optuna.trial.TrialState.RUNNING:
        return False
    w = t.user_attrs.get("worker")
    if not w:
        return t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_period
    return w.get("host") == host and w.get("pid") != os.getpid() and not _alive(int(w["pid"]))


def _stop_when_done(n_trials: int):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get("surplus") == "over the budget":
            study.stop()
        elif len(budget_finished(study)) >= n_trials:
            study.stop()
    return callback


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study, grace_period: float) -> list[int]:
    """A trial left RUNNING by a process of this machine that no longer exists is failed, and its
    candidate re-queued once. Journal files have no heartbeat, so this is how they recover; on
    RDB storages it also catches a worker that died before its trial's first heartbeat (Optuna
    never marks such a trial stale) and one that died less than the grace period ago. Returns
    the numbers of the trials recovered. A dead worker of another machine cannot be told from a
    slow one here: across machines, RDB heartbeats do it. A trial that never reached the
    objective (no `worker` attr) is dead once it is older than the grace period."""
    import datetime

    host, out = socket.gethostname(), []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _dead(t, now, host, grace_period):
            continue
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if not t.user_attrs.get("retried_from") and not t.user_attrs.get("surplus"):
            attrs = {k: v for k, v in t.user_attrs.items() if k in ("label", BASELINE_METHOD)} | {"retried_from": t.number}
            study.enqueue_trial(t.params, user_attrs=attrs, skip_if_exists=False)
        out.append(t.number)
    if out:
        log.warning("trials %s were left running by a worker that died: failed, their candidates re-queued", out)
    return out


def finished_count(cfg: RunConfig) -> int:
    """Finished trials already in the study of `cfg` (0 when there is no such study yet); reads
    the storage without creating anything."""
    url = cfg.storage_url
    if storage_kind(url) in ("sqlite", "journal") and not _file_path(url, storage_kind(url)).is_file():
        return 0
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(url, create=False))
    except KeyError:
        return 0
    return len(budget_finished(study))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


LEARNED = "learned"  # the label of the trial `study.learner` produces


def in_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Whether `t` counts toward `study.n_trials`: every trial but the learned one, which the
    learner adds after the search."""
    return t.user_attrs.get("label") != LEARNED


def budget_finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The finished trials that count toward `study.n_trials`."""
    return [t for t in finished(study) if in_budget(t)]


@dataclass
class Objective:
    """One scored quantity: a suite (or a subset of its tasks) on the search split, and on test."""

    name: str
    search: EvalSuite
    test: EvalSuite | None


def _suite_for(cfg: RunConfig, index: int | None):
    """The suite of objective `index` (None: the eval section's own), restricted to its tasks."""
    spec = cfg.eval.objectives[index] if index is not None else None
    suite = load_suite(spec.suite if spec and spec.suite else cfg.eval.suite)
    if spec and spec.tasks is not None:
        names = [t.name for t in suite.tasks]
        unknown = [t for t in spec.tasks if t not in names]
        if unknown or not spec.tasks:
            raise MergeSearchError(f"eval.objectives[{index}].tasks: unknown task(s) {unknown or '(none given)'} "
                                   f"of suite {suite.name!r}; its tasks: {', '.join(names)}")
        suite = dataclasses.replace(suite, tasks=[t for t in suite.tasks if t.name in spec.tasks])
    return suite, (spec.split if spec and spec.split else cfg.eval.search_split)


def n_examples(suite, split: str) -> int:
    """Examples with a score of their own on `split` (lm-eval tasks count none)."""
    return sum(len(t.items(split)) for t in suite.tasks if t.kind != "lmeval"
               and (split in t.files or ANY_SPLIT in t.files))


@dataclass
class Searcher:
    """Everything a trial needs, built once: sources, the merger, the tokenized suites."""

    cfg: RunConfig
    sources: list[Checkpoint]
    merger: InMemoryMerger
    space: MergeSpace
    objectives: list[Objective]
    pruning: bool  # score in shards in a per-trial order and let the Wilcoxon pruner stop a trial
    on_batch: Callable[[int, int], None] | None = None  # (batches done, of) during a trial's eval

    @classmethod
    def build(cls, cfg: RunConfig) -> Searcher:
        sources, base = open_sources(cfg)
        device = resolve_device(cfg.device)
        t0 = time.perf_counter()
        merger = InMemoryMerger(sources, base=base, device=device, dtype=DTYPES[cfg.dtype])
        log.info("loaded %d sources (%d parameters each) on %s in %.1fs",
                 len(merger.keys), merger.numel, device, time.perf_counter() - t0)
        m = cfg.merge
        space = MergeSpace(
            m.method, {spec.name: str(ck.path.resolve()) for spec, ck in zip(cfg.models, sources)},
            base=str(base.path.resolve()) if base else None, normalize=m.normalize, granularity=m.granularity,
            filters=m.filters, weight_range=m.weight_range, density_range=m.density_range, lambda_=m.lambda_,
            ranges=dict(m.ranges),
            num_layers=merger.num_layers, dtype=cfg.dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(sources[0].path)
        specs = [(o.name, _suite_for(cfg, i)) for i, o in enumerate(cfg.eval.objectives)] if cfg.eval.objectives \
            else [(SCORE, _suite_for(cfg, None))]
        single = len(specs) == 1
        wanted = cfg.study.pruner
        if wanted == "wilcoxon" and not single:
            log.warning("pruning is off for multi-objective studies (Optuna's pruners take one objective)")
        count = n_examples(*specs[0][1])
        pruning = single and (wanted == "wilcoxon" or (wanted is None and count >= PRUNE_MIN_EXAMPLES))
        kw = dict(batch_size=cfg.eval.batch_size, device=device, system=cfg.eval.system, chat=cfg.eval.chat)
        objectives = []
        for name, (suite, split) in specs:
            shards = max(1, math.ceil(n_examples(suite, split) / cfg.study.shard_size)) if pruning else 1
            search = EvalSuite(suite, tokenizer, split, shards=shards, metric=cfg.eval.search_metric, **kw)
            test = None
            if cfg.eval.test_split and (cfg.eval.test_split in suite.splits() or not suite.splits()):
                test = EvalSuite(suite, tokenizer, cfg.eval.test_split, **kw)
            objectives.append(Objective(name, search, test))
        return cls(cfg, sources + ([base] if base else []), merger, space, objectives, pruning)

    def scoring(self) -> dict:
        """What a trial's value is: the suites, splits, prompt settings, metric and score terms."""
        e = self.cfg.eval
        one = self.objectives[0].search
        out = {"suite": one.suite.name, "split": one.split, "system": e.system, "chat": e.chat,
               "terms": one.score_terms(), "metric": e.search_metric}
        if len(self.objectives) > 1:
            out["objectives"] = {o.name: {"suite": o.search.suite.name, "split": o.search.split,
                                          "terms": o.search.score_terms()} for o in self.objectives}
            out["constraints"] = [c.model_dump() for c in e.constraints]
        return out

    def example_keys(self) -> dict:
        """split -> objective -> the examples in their fixed order (per-example lists follow it)."""
        keys = {"search": {o.name: o.search.example_keys for o in self.objectives}}
        if any(o.test for o in self.objectives):
            keys["test"] = {o.name: o.test.example_keys for o in self.objectives if o.test}
        return keys

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        _check_budget(trial, self.cfg.study.n_trials, self.cfg.study.grace_period)
        method = trial.user_attrs.get(BASELINE_METHOD)
        values = self.space.suggest(trial)  # a method's row: its enqueued uniform point, recorded
        config = self.method_config(method) if method else self.space.to_config(values)
        t0 = time.perf_counter()
        self.merger.apply(config)
        t1 = time.perf_counter()
        if method:  # weights are for display only: the method has none
            trial.set_user_attr("weights", {n: 1.0 / len(self.space.names) for n in self.space.names})
        else:
            trial.set_user_attr("cells", values)
            trial.set_user_attr("weights", self.space.summary(values))
        trial.set_user_attr("merge_config", config)
        results, report_s = {}, [0.0]
        try:
            for o in self.objectives:
                results[o.name] = self._score(trial, o.search, report_s)
        finally:
            t2 = time.perf_counter()
            trial.set_user_attr("timing", {"merge_s": t1 - t0, "eval_s": t2 - t1 - report_s[0], "report_s": report_s[0]})
        trial.set_user_attr("dev", {name: {"score": r.score, "tasks": r.tasks} for name, r in results.items()})
        trial.set_user_attr("dev_score", sum(r.score for r in results.values()) / len(results))
        if "seen" not in trial.user_attrs:  # per-example lists of fully scored candidates only
            trial.set_user_attr("examples", {name: [r.examples[k] for k in o.search.example_keys]
                                             for (name, r), o in zip(results.items(), self.objectives)})
        if self.cfg.eval.constraints:
            violations = [c.min - results[c.objective].score for c in self.cfg.eval.constraints]  # <= 0: feasible
            trial.set_user_attr("constraints", violations)
            if SET_CONSTRAINT:  # optuna >= 5; earlier ones read _constraints
                for c, v in zip(self.cfg.eval.constraints, violations):
                    trial.set_constraint(f"{c.objective} >= {c.min:g}", v)
        objective_values = [r.objective for r in results.values()]
        return objective_values[0] if len(objective_values) == 1 else objective_values

    def _score(self, trial: optuna.Trial, suite: EvalSuite, report_s: list[float]) -> SuiteResult:
        """Score the live merge; with pruning, shard by shard in an order seeded by the trial
        number, each example's value reported at its stable index, stopping when the pruner says.

        A stopped trial returns its estimate over the examples seen (the WilcoxonPruner's own
        advice) instead of raising TrialPruned: it stays COMPLETE, so model-based samplers (GP
        sees only complete trials) learn where the bad region is, and it is marked by the user
        attr `seen` < 1, never selected, and shown as pruned on the leaderboard."""
        tick = self._ticker(suite)
        listen = {"on_batch": tick} if tick else {}
        if not self.pruning:
            return suite.score(self.merger.model, **listen)
        order = random.Random(trial.number).sample(range(suite.n_shards), suite.n_shards)
        baseline = trial.user_attrs.get("label") is not None  # always scored fully
        reported, result = {}, None
        for shard in suite.score_shards(self.merger.model, order, **listen):
            t0 = time.perf_counter()
            values = {suite.example_index[k]: v for k, v in shard.examples.items()}
            report_many(trial, values)
            reported.update(values)
            result = shard.result
            stop = not baseline and len(reported) < len(suite.example_keys) and trial.should_prune()
            report_s[0] += time.perf_counter() - t0
            if stop:
                trial.set_user_attr("seen", len(reported) / len(suite.example_keys))
                log.info("trial %d stopped after %d of %d examples", trial.number, len(reported),
                         len(suite.example_keys))
                # its value: the paired estimate, below the best trial's (pruning.py)
                return dataclasses.replace(result, objective=stopped_estimate(trial.study, reported, result.objective))
        return result

    def _ticker(self, suite: EvalSuite):
        """The per-batch callback of one scoring, or None without a listener."""
        if self.on_batch is None:
            return None
        done, total = [0], suite.n_batches
        self.on_batch(0, total)

        def tick():
            done[0] += 1
            self.on_batch(done[0], total)

        return tick

    def enqueue_baselines(self, study: optuna.Study) -> None:
        """Each source alone and the uniform average, unless already in the study. The
        parameter-free methods' rows come last (`enqueue_method_rows`), so that they never
        steer the search."""
        trials = study.get_trials(deepcopy=False)
        have = {t.user_attrs.get("label") for t in trials}
        room = self.cfg.study.n_trials - sum(t.state in _LIVE and in_budget(t) for t in trials)  # a budget below the baselines: the first
        collapsed = collapsed_stick(study.sampler)
        for label, values in self.space.baselines():
            if label not in have and room > 0:
                study.enqueue_trial(self.space.params_for(values, collapsed), user_attrs={"label": label})
                room -= 1
        self.enqueue_method_rows(study)

    def learn_candidate(self, study: optuna.Study, callbacks=()) -> None:
        """Learn parameters by gradient (`study.learner`, search/learn.py) on the search split and
        score them as the trial labelled `learned`, unless the study has it: one trial past
        `study.n_trials`, after the search, scored as every candidate (the leaderboard, the
        re-score on test, the intervals and the export treat it as one). It starts from uniform
        or from the selected candidate so far (`start: best`), and reads the search split only."""
        from search.learn import WeightGradient, held_out_examples, learn

        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("label") == LEARNED]
        if any(t.state in _COUNTED for t in mine):
            return  # learned already (a failed one is learned again)
        if any(t.state == optuna.trial.TrialState.WAITING for t in mine):  # enqueued, never scored
            study.optimize(self.objective, n_trials=1, callbacks=list(callbacks))
            return
        spec = self.cfg.study.learner
        learner = WeightGradient(self.merger, self.space, checkpoint=spec.checkpoint,
                                 sign_bandwidth=spec.sign_bandwidth)
        uniform = dict(self.space.baselines())["uniform"]
        start, start_trial = uniform, None
        if spec.start == "best":
            done = [t for t in complete_trials(study) if BASELINE_METHOD not in t.user_attrs and "cells" in t.user_attrs]
            if done:
                best = select(done, self.cfg.study.select)
                start, start_trial = best.user_attrs["cells"], best.number
        learner.hold(start)  # what is not learned (TIES' densities) stays the start's
        theta0 = learner.encode(start)
        anchor = learner.encode(uniform) if spec.l2_to == "uniform" else theta0
        suite = self.objectives[0].search
        if spec.batch_size is not None or spec.checkpoint:  # its own batches of the same rows
            e = self.cfg.eval
            suite = EvalSuite(suite.suite, suite.tokenizer, suite.split, metric=suite.metric, device=suite.device,
                              batch_size=spec.batch_size or e.batch_size, system=e.system, chat=e.chat,
                              share_prefix=not spec.checkpoint)
        holdout = held_out_examples(suite, spec.early_stop, self.cfg.study.seed, spec.loss) if spec.early_stop else set()
        held_parts: list[float] = []

        def loss(model):
            return suite.loss_parts(model, loss=spec.loss, holdout=holdout, held=held_parts)

        def held() -> float | None:
            value = sum(held_parts)
            held_parts.clear()
            return value if holdout else None

        t0 = time.perf_counter()
        result = learn(learner, loss, steps=spec.steps, lr=spec.lr, l2=spec.l2, start=theta0, anchor=anchor,
                       held=held if holdout else None, patience=spec.patience)
        seconds = time.perf_counter() - t0
        log.info("learned %s in %d steps (%.1fs): loss %.4f -> %.4f%s", self.space.method, result.steps, seconds,
                 result.losses[0], result.losses[-1],
                 f"; lowest held-out loss at step {result.best_step}" if result.best_step is not None else "")
        params = self.space.params_for(learner.values(result.logits), collapsed_stick(study.sampler))
        info = {**spec.model_dump(), "start_trial": start_trial, "steps_run": result.steps, "seconds": round(seconds, 2),
                "loss_first": result.losses[0], "loss_last": result.losses[-1], "held_out": len(holdout)}
        if result.best_step is not None:
            info.update(best_step=result.best_step, held_best=min(result.held))
        study.enqueue_trial(params, user_attrs={"label": LEARNED, "learner": info})
        study.optimize(self.objective, n_trials=1, callbacks=list(callbacks))

    def enqueue_method_rows(self, study: optuna.Study) -> None:
        """The rows of `cfg.baseline_methods` not in the study yet, once the budget has just room
        for them (at the end of the search; at once when the budget is that small).

        Such a row carries the uniform point's parameters: samplers model the intersection of the
        trials' search spaces, which one trial without parameters would empty (GP, CMA-ES and
        multivariate TPE would then sample at random)."""
        trials = study.get_trials(deepcopy=False)
        have = {t.user_attrs.get("label") for t in trials}
        todo = [m for m in self.cfg.baseline_methods if m not in have]
        room = self.cfg.study.n_trials - sum(t.state in _LIVE and in_budget(t) for t in trials)
        # workers of one `run --workers K` may each take a slot between two of these checks
        others = max(0, int(os.environ.get(WORKERS_ENV, "1")) - 1)
        if not todo or room > len(todo) + others:
            return
        uniform = dict(self.space.baselines()).get("uniform") or self.space.baselines()[-1][1]
        for method in todo[:max(room, 0)]:
            study.enqueue_trial(self.space.params_for(uniform), user_attrs={"label": method, BASELINE_METHOD: method})

    def method_config(self, method: str) -> dict:
        """The mergekit configuration of parameter-free `method` over every source (and the base)."""
        config: dict = {"merge_method": method}
        if METHODS[method].needs_base:
            config["base_model"] = str(self.sources[len(self.cfg.models)].path.resolve())
        config["models"] = [{"model": path} for path in self.space.models.values()]
        config["dtype"] = self.cfg.dtype
        return config

    def rescore_test(self, study: optuna.Study) -> None:
        """Re-score the baselines, the top candidates and the selected one on the held-out split."""
        if not any(o.test for o in self.objectives):
            return
        done = complete_trials(study)
        if not done:
            return
        top = sorted(done, key=lambda t: (-t.user_attrs.get("dev_score", 0.0), t.number))[: self.cfg.eval.rescore_top]
        chosen = {t.number: t for t in done if t.user_attrs.get("label")} | {t.number: t for t in top}
        best = select(done, self.cfg.study.select)
        chosen[best.number] = best
        for number, t in sorted(chosen.items()):
            if f"{TEST_ATTR}{number}" in study.user_attrs:
                continue  # a trial's candidate never changes: scored once, kept across resumes
            self.merger.apply(t.user_attrs["merge_config"])
            per = {}
            for o in (o for o in self.objectives if o.test):
                r = o.test.score(self.merger.model)
                per[o.name] = {"score": r.score, "tasks": r.tasks, "examples": [r.examples[k] for k in o.test.example_keys]}
            score = sum(p["score"] for p in per.values()) / len(per)
            study.set_user_attr(f"{TEST_ATTR}{number}", {"split": self.cfg.eval.test_split, "score": score,
                                                         "objectives": per})

    def fingerprints(self) -> dict:
        """model name (and `base`) -> its Checkpoint.fingerprint()."""
        names = [m.name for m in self.cfg.models] + (["base"] if len(self.sources) > len(self.cfg.models) else [])
        return {name: ck.fingerprint() for name, ck in zip(names, self.sources)}

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _check_setup(study: optuna.Study, cfg: RunConfig, attr: str, now: dict, what: str, why: str = "") -> None:
    """Refuse to resume a study whose stored setup `attr` differs from `now`, naming the keys."""
    before = study.user_attrs.get(attr)
    if before and before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise MergeSearchError(f"study {cfg.study_name!r} in {cfg.storage_url} {what} "
                               f"({', '.join(changed)} differ){why}: use another --study-name")


def _check_sources(study: optuna.Study, cfg: RunConfig, now: dict) -> None:
    """Refuse to resume a study whose sources changed on disk (same names, other weights)."""
    before = study.user_attrs.get(SOURCES_ATTR)
    if not before:
        return
    for name in now:
        if name in before and before[name] != now[name]:
            was, is_ = before[name], now[name]
            what = ("moved from " + was["path"]) if was["path"] != is_["path"] else "its weight files changed"
            raise MergeSearchError(f"study {cfg.study_name!r} in {mask_url(cfg.storage_url)} was run with other "
                                   f"weights for model {name!r} ({is_['path']}: {what}): its trial scores would "
                                   f"not hold; use another --study-name")


def check_search_split(cfg: RunConfig, search_on_test: bool = False) -> None:
    """Refuse to optimise on the held-out split (its score would no longer be held out)."""
    if search_on_test:
        return
    splits = [("eval.search_split", cfg.eval.search_split)]
    splits += [(f"eval.objectives[{i}].split", o.split) for i, o in enumerate(cfg.eval.objectives or []) if o.split]
    for field, split in splits:
        if split == "test" or split == cfg.eval.test_split:
            raise MergeSearchError(
                f"{field} is {split!r}, the held-out split: a search on it leaves no honest test score; "
                f"search another split, or pass --search-on-test to do it anyway")


def _quiet_surplus(record) -> bool:
    """Optuna logs a caught exception as a failed trial; a surplus trial is no failure."""
    return "is surplus" not in record.getMessage() and "SurplusTrial" not in record.getMessage()


def run_search(
    cfg: RunConfig, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    *, search_on_test: bool = False, on_batch: Callable[[int, int], None] | None = None, rescore: bool = True,
) -> optuna.Study:
    """Run (or resume) the study of `cfg` until it has `study.n_trials` finished trials.
    on_batch(done, total): after every eval batch of a trial (a progress bar for long evals).
    rescore=False: a worker of `run --workers`, which leaves the held-out re-scores to the parent."""
    check_search_split(cfg, search_on_test)
    storage_kind(cfg.storage_url)  # a malformed URL fails before the sources are read
    searcher = Searcher.build(cfg)  # every input is checked before the study is created
    searcher.on_batch = on_batch
    try:
        study = create_study(cfg, searcher.space, searcher.pruning)
        remaining = cfg.study.n_trials - len(budget_finished(study))
        merge = {"models": list(searcher.space.names), "dtype": cfg.dtype,
                 **cfg.merge.model_dump(mode="json", by_alias=True,
                                        exclude={"base_model"} | (set() if cfg.merge.ranges else {"ranges"}))}
        scoring = searcher.scoring()
        _check_setup(study, cfg, MERGE_ATTR, merge, "was run with another merge setup")
        _check_setup(study, cfg, EVAL_ATTR, scoring, "was scored with another eval setup",
                     ", so its trial values would not compare")
        _check_setup(study, cfg, EXAMPLES_ATTR, searcher.example_keys(), "was scored on other examples",
                     ", so its per-example scores would not pair")
        fingerprints = searcher.fingerprints()  # a few hundred KiB read per source file
        _check_sources(study, cfg, fingerprints)
        study.set_user_attr(SOURCES_ATTR, fingerprints)
        study.set_user_attr(MERGE_ATTR, merge)
        study.set_user_attr(EVAL_ATTR, scoring)
        study.set_user_attr(EXAMPLES_ATTR, searcher.example_keys())
        study.set_user_attr(SELECT_ATTR, cfg.study.select)
        study.set_user_attr(BOOTSTRAP_ATTR, cfg.eval.bootstrap)
        searcher.enqueue_baselines(study)
        if remaining > 0:
            log.info("study %r: %d finished trials, running %d more with %s", cfg.study_name,
                     cfg.study.n_trials - remaining, remaining, sampler_name(study.sampler))
            # journal: the only way; RDB: also a death before the first heartbeat
            recover_dead_trials(study, cfg.study.grace_period)
            callbacks = [_stop_when_done(cfg.study.n_trials), lambda study, _: searcher.enqueue_method_rows(study)]
            callbacks += [on_trial] if on_trial else []
            optuna.logging.get_logger("optuna.study._optimize").addFilter(_quiet_surplus)
            study.optimize(searcher.objective, n_trials=remaining, timeout=cfg.study.timeout, callbacks=callbacks,
                           catch=(SurplusTrial,))
        else:
            log.info("study %r already has %d finished trials: nothing to run", cfg.study_name, len(budget_finished(study)))
        if rescore and cfg.study.learner is not None:
            searcher.learn_candidate(study, [on_trial] if on_trial else [])
        if rescore:
            searcher.rescore_test(study)
    finally:
        searcher.close()
    return study
