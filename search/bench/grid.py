"""Exhaustive grids over the weight simplex: every point merged and scored on every split.

    points = simplex_grid(3, 0.05)                      # 231 weight triples
    rows = score_grid(merger, space, {"dev": dev, "test": test}, points)

What the search benchmark compares a search against: the true optimum of a (global, linear)
merge space, and per-example scores for paired comparisons between points.
"""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.suite import EvalSuite
from search.errors import MergeSearchError
from search.merger import InMemoryMerger
from search.space import MergeSpace


def simplex_grid(n_models: int = 3, step: float = 0.05) -> list[tuple[float, ...]]:
    """Every weight vector of `n_models` non-negative multiples of `step` that sum to 1.

    Lexicographic order, first weight largest first; `step` must divide 1 (0.05: 231 points
    for 3 models). Weights are k * step rounded to 10 decimals, so (0.35, ...) prints as such.
    """
    if n_models < 1:
        raise MergeSearchError(f"n_models must be at least 1 but got {n_models}")
    n = round(1 / step) if step > 0 else 0
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise MergeSearchError(f"step must divide 1 (e.g. 0.05, 0.1) but got {step}")

    def parts(total: int, k: int):
        if k == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in parts(total - first, k - 1):
                yield (first, *rest)

    return [tuple(round(c / n, 10) for c in counts) for counts in parts(n, n_models)]


def score_grid(merger: InMemoryMerger, space: MergeSpace, suites: dict[str, EvalSuite],
               points: Sequence[Sequence[float]] | None = None) -> list[dict]:
    """Merge each point (global weights, one per source in `space.names` order) and score it.

    points: default `simplex_grid(len(space.names))`. Returns one dict per point, in order:
    {"weights": tuple, split: {"score": float, "examples": [per-example primary metric, in
    the suite's fixed `example_keys` order]} for each split in `suites`}.
    """
    if points is None:
        points = simplex_grid(len(space.names))
    rows = []
    for weights in points:
        if len(weights) != len(space.names):
            raise MergeSearchError(
                f"a grid point needs {len(space.names)} weights ({', '.join(space.names)}) "
                f"but got {len(weights)}: {tuple(weights)}")
        merger.apply(space.to_config(space.uniform_values(list(weights))))
        row: dict = {"weights": tuple(weights)}
        for split, suite in suites.items():
            result = suite.score(merger.model)
            row[split] = {"score": result.score,
                          "examples": [result.examples[k] for k in suite.example_keys]}
        rows.append(row)
    return rows
