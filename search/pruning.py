"""Pruning on partial evaluation: a Wilcoxon signed-rank test on the examples seen so far.

    study: {pruner: wilcoxon, prune_threshold: 0.1, shard_size: 16}

Each trial reports every example's score at the example's stable index (Optuna's
WilcoxonPruner contract: `trial.report(value, step=index)`), shard by shard in an order seeded by
the trial number. After each shard, `PairedWilcoxonPruner` takes the differences to the best
trial's scores on the same examples and stops the trial when the one-sided signed-rank test says
it is worse with p below the threshold.

It is Optuna's `WilcoxonPruner` with one change, which the demo measures as the difference
between saving examples and not (`merge-search bench search`): Optuna's safety check keeps a
trial whose mean over the examples it has seen is at least the best trial's mean over all of
its examples. With a random subset of examples that check is about the subset's difficulty, not
the trial's quality: half the time the first shard is easier than average, and a trial worse on
every one of its examples is kept. Here the check is paired: a trial is kept while its mean
difference to the best on the same examples is >= 0. A stopped trial's value is then
`stopped_estimate`: the best trial's value plus that (negative) mean difference, a paired
estimate of its full score that is below the best's, so a stopped trial never becomes the best
trial the next ones are compared with.
"""

from __future__ import annotations

import numpy as np
import optuna
import scipy.stats as ss

N_STARTUP_STEPS = 2  # as Optuna's WilcoxonPruner: no test on fewer examples


class PairedWilcoxonPruner(optuna.pruners.BasePruner):
    """Stop a trial whose per-example scores are below the best trial's on the same examples
    (one-sided Wilcoxon signed-rank, zeros split, p < `p_threshold`); one objective, maximised."""

    def __init__(self, p_threshold: float = 0.1, n_startup_steps: int = N_STARTUP_STEPS) -> None:
        if not 0 < p_threshold < 1:
            raise ValueError(f"p_threshold must be in (0, 1) but got {p_threshold}")
        if n_startup_steps < 0:
            raise ValueError(f"n_startup_steps must be >= 0 but got {n_startup_steps}")
        self.p_threshold = p_threshold
        self.n_startup_steps = n_startup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        diff = paired_differences(study, trial.intermediate_values)
        if diff is None or len(diff) < max(2, self.n_startup_steps) or diff.mean() >= 0:
            return False
        return bool(ss.wilcoxon(diff, alternative="less", zero_method="zsplit").pvalue < self.p_threshold)


def paired_differences(study: optuna.Study, values: dict[int, float]) -> np.ndarray | None:
    """`values` (step -> score) minus the best trial's scores at the steps both have (None: no
    best trial with reported scores yet, or a non-finite score)."""
    if not values:
        return None
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    common = sorted(set(values) & set(best.intermediate_values))
    if not common:
        return None
    diff = np.array([values[s] - best.intermediate_values[s] for s in common], float)
    return diff if np.isfinite(diff).all() else None


def stopped_estimate(study: optuna.Study, values: dict[int, float], seen_mean: float) -> float:
    """A stopped trial's value: the best trial's value plus the mean paired difference on the
    examples seen (`seen_mean`, its own mean over them, when there is nothing to pair with)."""
    diff = paired_differences(study, values)
    return seen_mean if diff is None else float(study.best_trial.value + diff.mean())
