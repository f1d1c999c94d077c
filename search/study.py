"""The search: an Optuna study whose trials merge in memory and score on the eval suite.

    suggest -> merger.apply -> suite.score -> value (+ weights, per-task scores, timings)

The Optuna storage is the single source of truth: every trial keeps its derived weights and
per-task scores as user attributes, held-out (test) re-scores are study user attributes, and
running again with the same storage and study name resumes the study.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from transformers import AutoTokenizer

from evaluation.suite import EvalSuite, SuiteResult
from evaluation.tasks import load_suite
from search.checkpoints import Checkpoint, assert_aligned, open_checkpoint, resolve_model_path
from search.config import RunConfig
from search.errors import MergeSearchError
from search.merger import DTYPES, InMemoryMerger, resolve_device
from search.space import MergeSpace

log = logging.getLogger(__name__)

TEST_ATTR = "test/"  # study user attr prefix: "test/<trial number>" -> held-out re-score
MERGE_ATTR = "merge"  # study user attr: the merge setup (models, method, space), checked on resume
EVAL_ATTR = "eval"  # study user attr: what the trial values are (suite, split, prompts, score terms), checked on resume


# Methods whose base is a model of its own (slerp's base is one of its two models).
NEEDS_BASE_ROW = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


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
    if cfg.merge.base_model and cfg.merge.method in NEEDS_BASE_ROW:
        base = open_checkpoint("base", source_path(cfg.merge.base_model, cfg.base_dir))
    assert_aligned(ckpts + ([base] if base else []))
    return ckpts, base


def make_sampler(cfg: RunConfig, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already stored so a resumed study does not replay its first
    # proposals.
    if cfg.study.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.study.seed + n_existing, multivariate=True)
    return optuna.samplers.RandomSampler(seed=cfg.study.seed + n_existing)


def create_study(cfg: RunConfig) -> optuna.Study:
    """Create or load the study named in `cfg` (resume = load)."""
    url = cfg.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage: str | optuna.storages.BaseStorage = url
    if url.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
        # A worker that dies leaves its trial RUNNING; with heartbeats, the next worker marks it
        # failed after the grace period and re-queues its parameters once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **retry)
    study = optuna.create_study(
        storage=storage, study_name=cfg.study_name, direction="maximize",
        sampler=make_sampler(cfg), load_if_exists=True,
    )
    if study.trials:
        study.sampler = make_sampler(cfg, len(study.trials))
    return study


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise MergeSearchError(
            f"no study {study_name!r} in {storage}; studies there: {', '.join(names) or '(none)'}"
        ) from None


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


@dataclass
class Searcher:
    """Everything a trial needs, built once: sources, the merger, the tokenized suites."""

    cfg: RunConfig
    sources: list[Checkpoint]
    merger: InMemoryMerger
    space: MergeSpace
    search_suite: EvalSuite
    test_suite: EvalSuite | None

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
            num_layers=merger.num_layers, dtype=cfg.dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(sources[0].path)
        suite = load_suite(cfg.eval.suite)
        kw = dict(batch_size=cfg.eval.batch_size, device=device, system=cfg.eval.system, chat=cfg.eval.chat)
        search_suite = EvalSuite(suite, tokenizer, cfg.eval.search_split, **kw)
        test_suite = EvalSuite(suite, tokenizer, cfg.eval.test_split, **kw) if cfg.eval.test_split else None
        return cls(cfg, sources + ([base] if base else []), merger, space, search_suite, test_suite)

    def scoring(self) -> dict:
        """What a trial's value is: the suite, the split, the prompt settings and the score terms."""
        e = self.cfg.eval
        return {"suite": self.search_suite.suite.name, "split": e.search_split, "system": e.system,
                "chat": e.chat, "terms": self.search_suite.score_terms()}

    def evaluate(self, merge_config: dict, suite: EvalSuite) -> SuiteResult:
        self.merger.apply(merge_config)
        return suite.score(self.merger.model)

    def objective(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        config = self.space.to_config(values)
        t0 = time.perf_counter()
        self.merger.apply(config)
        t1 = time.perf_counter()
        result = self.search_suite.score(self.merger.model)
        t2 = time.perf_counter()
        trial.set_user_attr("weights", self.space.summary(values))
        trial.set_user_attr("merge_config", config)
        trial.set_user_attr("scores", result.tasks)
        trial.set_user_attr("timing", {"merge_s": t1 - t0, "eval_s": t2 - t1})
        return result.score

    def enqueue_baselines(self, study: optuna.Study) -> None:
        """Each source alone and the uniform average, unless already in the study."""
        have = {t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)}
        for label, values in self.space.baselines():
            if label not in have:
                study.enqueue_trial(self.space.params_for(values), user_attrs={"label": label})

    def rescore_test(self, study: optuna.Study) -> None:
        """Re-score the baselines and the top candidates on the held-out split."""
        if self.test_suite is None:
            return
        done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        top = sorted(done, key=lambda t: -t.value)[: self.cfg.eval.rescore_top]
        chosen = {t.number: t for t in done if t.user_attrs.get("label")} | {t.number: t for t in top}
        for number, t in sorted(chosen.items()):
            if f"{TEST_ATTR}{number}" in study.user_attrs:
                continue  # a trial's candidate never changes: scored once, kept across resumes
            result = self.evaluate(t.user_attrs["merge_config"], self.test_suite)
            study.set_user_attr(f"{TEST_ATTR}{number}", {"split": self.cfg.eval.test_split, **result.as_dict()})

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


def run_search(
    cfg: RunConfig, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
) -> optuna.Study:
    """Run (or resume) the study of `cfg` until it has `study.n_trials` finished trials."""
    searcher = Searcher.build(cfg)  # every input is checked before the study is created
    try:
        study = create_study(cfg)
        remaining = cfg.study.n_trials - len(finished(study))
        merge = {"models": list(searcher.space.names), "dtype": cfg.dtype,
                 **cfg.merge.model_dump(mode="json", by_alias=True, exclude={"base_model"})}
        scoring = searcher.scoring()
        _check_setup(study, cfg, MERGE_ATTR, merge, "was run with another merge setup")
        _check_setup(study, cfg, EVAL_ATTR, scoring, "was scored with another eval setup",
                     ", so its trial values would not compare")
        study.set_user_attr(MERGE_ATTR, merge)
        study.set_user_attr(EVAL_ATTR, scoring)
        searcher.enqueue_baselines(study)
        if remaining > 0:
            log.info("study %r: %d finished trials, running %d more", cfg.study_name,
                     cfg.study.n_trials - remaining, remaining)
            callbacks = [on_trial] if on_trial else []
            study.optimize(searcher.objective, n_trials=remaining, timeout=cfg.study.timeout, callbacks=callbacks)
        else:
            log.info("study %r already has %d finished trials: nothing to run", cfg.study_name, len(finished(study)))
        searcher.rescore_test(study)
    finally:
        searcher.close()
    return study
