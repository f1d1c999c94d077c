"""Paired-bootstrap intervals of the difference between two candidates' scores.

    iv = paired_bootstrap(a, b, strata, weights)   # a, b: per-example scores, same examples
    iv.diff, iv.low, iv.high, iv.significant       # score(a) - score(b) and its 95% interval

A suite score is a weighted mean of task means, so the bootstrap resamples examples within each
task (stratum) with replacement, the same draw for both candidates (paired: an example's
difficulty cancels), and recomputes the weighted mean of the per-task mean differences. It is
seeded, so an interval read back from the study is the same every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    diff: float  # score(a) - score(b) on the examples given
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "significant": self.significant}


def weighted_score(values: Sequence[float], strata: Sequence[int], weights: Sequence[float]) -> float:
    """sum_s weights[s] * mean(values of stratum s) / sum of the weights of the strata present."""
    v, s, w = np.asarray(values, float), np.asarray(strata), np.asarray(weights, float)
    present = np.unique(s)
    means = np.array([v[s == k].mean() for k in present])
    return float((w[present] * means).sum() / w[present].sum())


def paired_bootstrap(a: Sequence[float], b: Sequence[float], strata: Sequence[int] | None = None,
                     weights: Sequence[float] | None = None, *, n: int = N_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> Interval:
    """Percentile interval of score(a) - score(b) over `n` paired, stratified resamples.

    a, b: per-example values of the two candidates on the same examples, in the same order;
    strata: each example's stratum (task) index, default one stratum; weights: per stratum.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"a and b must be non-empty 1-d and of one length but got {a.shape} and {b.shape}")
    if n < 1:
        raise ValueError(f"n must be at least 1 but got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) but got {level}")
    strata = np.zeros(len(a), int) if strata is None else np.asarray(strata)
    weights = np.ones(int(strata.max()) + 1) if weights is None else np.asarray(weights, float)
    d = a - b
    rng = np.random.default_rng(seed)
    present = np.unique(strata)
    total = weights[present].sum()
    boot = np.zeros(n)
    for k in present:
        dk = d[strata == k]
        draws = rng.integers(0, len(dk), size=(n, len(dk)))
        boot += weights[k] / total * dk[draws].mean(axis=1)
    diff = weighted_score(d, strata, weights)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Interval(diff, float(low), float(high))
