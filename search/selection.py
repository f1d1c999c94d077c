"""Which candidate is exported: chosen from search-split information only, never the test split.

    study: {select: robust}     # or best_dev

- `best_dev`: the arg-max of the search score (ties: the earlier trial). It is what a search
  over a noisy score over-fits: among many candidates, the top one is the one whose examples
  happened to fall its way.
- `robust` (default): the arg-max of a smoothed search score, smoothed as much as the search
  split itself says helps. Each fully scored candidate's value is replaced by a kernel-weighted
  mean of the values of the candidates around it (a Gaussian in the derived weights, radius r
  in RMS weight units per cell), so that a spike among low neighbours is pulled down and a
  point on a broad high plateau is preferred; a candidate with no neighbours keeps its value
  (nothing says it is luck: an earlier pull towards the median value demoted the best of a
  short study's few candidates for having fewer neighbours than `uniform`). r is chosen among
  `ROBUST_RADII` (0: no smoothing, the arg-max) by cross-validation over the search split's
  examples: over `CV_REPEATS` seeded random halvings, the candidates are ranked on one half's
  examples and the pick is scored on the other half (plain means of the per-example scores,
  user attr `examples`); the radius whose picks score best there wins (ties: the smaller).
  So the demo's sharp dev peak keeps r near 0, and a noisy fine-grained space gets the smoothing
  it needs. Without per-example scores on every candidate (a study from before they were kept)
  r is `ROBUST_RADIUS`. `merge-search bench search` measures what this does to the held-out
  score against `best_dev`.
- several objectives: among the Pareto front (all objectives maximised, on raw values), the
  candidate with the highest mean of its objective values (smoothed as above for `robust`).

Pruned and failed trials are never candidates, nor infeasible ones (`eval.constraints`) while a
feasible one exists. Only trial values, weights and constraint values are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna

POLICIES = ("best_dev", "robust")
ROBUST_RADIUS = 0.1  # RMS distance over the cells' weight vectors at which a neighbour counts e^-1/2
ROBUST_RADII = (0.0, 0.02, 0.05, 0.1, 0.2)  # the radii cross-validation chooses from
CV_REPEATS = 10  # random halvings of the search split (each half ranks, the other scores)
CV_SEED = 0


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fully scored candidates: complete and not stopped by the pruner (user attr `seen`)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not is_pruned(t)]


def is_pruned(trial: optuna.trial.FrozenTrial) -> bool:
    """Stopped by the pruner: PRUNED, or complete with the estimate over the examples it saw."""
    return trial.state == optuna.trial.TrialState.PRUNED or trial.user_attrs.get("seen", 1.0) < 1.0


def weight_vector(trial: optuna.trial.FrozenTrial) -> np.ndarray:
    """The trial's derived values (weights, densities, t of every cell) in one flat vector (a
    parameter-free method's row: its display weights, never compared; see `smoothed`)."""
    cells = trial.user_attrs.get("cells") or {"all": {"weight": list(trial.user_attrs["weights"].values())}}
    return np.array([x for cell in cells.values() for key in sorted(cell) for x in cell[key]], float)


def _kernel(trials: Sequence[optuna.trial.FrozenTrial], radius: float) -> np.ndarray:
    """The trials' kernel weights to each other (a parameter-free method's row: to itself only)."""
    alone = np.array([bool(t.user_attrs.get("baseline_method")) for t in trials])  # no place in weight space
    placed = [weight_vector(t) for t, a in zip(trials, alone) if not a]
    width = len(placed[0]) if placed else 1
    it = iter(placed)
    x = np.stack([np.zeros(width) if a else next(it) for a in alone])
    n_cells = max(1, max((len(t.user_attrs.get("cells") or [0]) for t in trials), default=1))
    sq = (x * x).sum(1)  # |a-b|^2 = |a|^2 + |b|^2 - 2ab: n x n memory, not n x n x parameters
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / n_cells  # squared distance, per cell
    k = np.exp(-d2 / (2 * radius ** 2))
    k[alone, :] = 0.0
    k[:, alone] = 0.0
    k[np.diag_indices_from(k)] = 1.0
    return k


def _smooth(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (k @ v) / k.sum(1)


def smoothed(trials: Sequence[optuna.trial.FrozenTrial], values: Sequence[float],
             radius: float = ROBUST_RADIUS) -> np.ndarray:
    """Each trial's value as the kernel-weighted mean of the values around it (itself included)."""
    if radius <= 0:
        raise ValueError(f"radius must be positive but got {radius}")
    return _smooth(_kernel(trials, radius), np.asarray(values, float))


def _pick(k: np.ndarray | None, v: np.ndarray) -> int:
    """Index of the highest smoothed value (k None: raw), then highest raw value, then the earliest."""
    s = v if k is None else _smooth(k, v)
    return max(range(len(v)), key=lambda i: (s[i], v[i], -i))


def robust_radius(trials: Sequence[optuna.trial.FrozenTrial], radii: Sequence[float] = ROBUST_RADII,
                  repeats: int = CV_REPEATS, seed: int = CV_SEED) -> float:
    """The smoothing radius (0: none) whose picks score best on held-out halves of the search
    split's examples (module docstring); `ROBUST_RADIUS` when a trial has no per-example scores."""
    lists = [t.user_attrs.get("examples") for t in trials]
    if len(trials) < 2 or not all(lists):
        return ROBUST_RADIUS
    names = list(lists[0])
    per = [np.array([e[name] for e in lists], float) for name in names]  # objective -> candidates x examples
    if any(p.ndim != 2 or p.shape[1] < 2 for p in per):
        return ROBUST_RADIUS
    kernels = [None if r == 0 else _kernel(trials, r) for r in radii]
    rng = np.random.default_rng(seed)
    gain = np.zeros(len(radii))
    for _ in range(repeats):
        halves = [np.array_split(rng.permutation(p.shape[1]), 2) for p in per]
        for a, b in ((0, 1), (1, 0)):  # rank on one half, score the pick on the other
            rank = np.mean([p[:, h[a]].mean(1) for p, h in zip(per, halves)], axis=0)
            held = np.mean([p[:, h[b]].mean(1) for p, h in zip(per, halves)], axis=0)
            for j, k in enumerate(kernels):
                gain[j] += held[_pick(k, rank)]
    best = max(range(len(radii)), key=lambda j: (round(gain[j], 9), -radii[j]))  # ties: the smaller radius
    return float(radii[best])


def pareto_front(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The non-dominated trials, every objective maximised, in trial order."""
    vals = np.array([t.values for t in trials], float)
    keep = [i for i in range(len(trials))
            if not any((vals[j] >= vals[i]).all() and (vals[j] > vals[i]).any() for j in range(len(trials)))]
    return [trials[i] for i in keep]


def select(trials: Sequence[optuna.trial.FrozenTrial], policy: str = "robust",
           radius: float | None = None) -> optuna.trial.FrozenTrial:
    """The candidate to export among fully scored `trials` (values maximised); `robust` smooths
    with `radius`, or with the cross-validated `robust_radius` when None."""
    trials = _candidates(trials, policy)
    raw = np.array([np.mean(t.values) for t in trials])
    if policy == "robust" and radius is None:
        radius = robust_radius(trials)
    value = smoothed(trials, raw, radius) if policy == "robust" and radius > 0 else raw
    pool = pareto_front(trials) if len(trials[0].values) > 1 else trials
    index = {t.number: i for i, t in enumerate(trials)}
    # highest (smoothed) value, then highest raw value, then the earliest trial
    return max(pool, key=lambda t: (value[index[t.number]], raw[index[t.number]], -t.number))


def selection_radius(trials: Sequence[optuna.trial.FrozenTrial], policy: str) -> float | None:
    """The smoothing radius `select(trials, policy)` uses (None for `best_dev`), for best.json."""
    return robust_radius(_candidates(trials, policy)) if policy == "robust" else None


def _candidates(trials: Sequence[optuna.trial.FrozenTrial], policy: str) -> list[optuna.trial.FrozenTrial]:
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; known: {', '.join(POLICIES)}")
    trials = sorted(trials, key=lambda t: t.number)
    if not trials:
        raise ValueError("no fully scored trial to select from")
    # with constraints (eval.constraints), only feasible candidates are chosen when there are any
    feasible = [t for t in trials if all(c <= 0 for c in t.user_attrs.get("constraints", []))]
    return feasible or trials
