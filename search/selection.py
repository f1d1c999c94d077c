"""Which candidate is exported: chosen from search-split information only, never the test split.

    study: {select: robust}     # or best_dev

- `best_dev`: the arg-max of the search score (ties: the earlier trial). It is what a search
  over a noisy score over-fits: among many candidates, the top one is the one whose examples
  happened to fall its way.
- `robust` (default): the arg-max of a smoothed search score. Each fully scored candidate's
  value is replaced by a kernel-weighted mean of the values of the candidates around it (a
  Gaussian in the derived weights, radius `ROBUST_RADIUS` in RMS weight units per cell), with one
  pseudo-neighbour at the median value, so that a lone spike is pulled down and a point on a
  broad high plateau is preferred. `merge-search bench search` measures what this does to the
  held-out score against `best_dev`.
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
PRIOR_WEIGHT = 1.0  # pseudo-neighbours at the median value (shrinks candidates with no neighbours)


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


def smoothed(trials: Sequence[optuna.trial.FrozenTrial], values: Sequence[float],
             radius: float = ROBUST_RADIUS) -> np.ndarray:
    """Each trial's value as the kernel-weighted mean of the values around it (itself included)."""
    if radius <= 0:
        raise ValueError(f"radius must be positive but got {radius}")
    alone = np.array([bool(t.user_attrs.get("baseline_method")) for t in trials])  # no place in weight space
    placed = [weight_vector(t) for t, a in zip(trials, alone) if not a]
    width = len(placed[0]) if placed else 1
    it = iter(placed)
    x = np.stack([np.zeros(width) if a else next(it) for a in alone])
    v = np.asarray(values, float)
    n_cells = max(1, max((len(t.user_attrs.get("cells") or [0]) for t in trials), default=1))
    sq = (x * x).sum(1)  # |a-b|^2 = |a|^2 + |b|^2 - 2ab: n x n memory, not n x n x parameters
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / n_cells  # squared distance, per cell
    k = np.exp(-d2 / (2 * radius ** 2))
    k[alone, :] = 0.0
    k[:, alone] = 0.0
    k[np.diag_indices_from(k)] = 1.0
    return (k @ v + PRIOR_WEIGHT * np.median(v)) / (k.sum(1) + PRIOR_WEIGHT)


def pareto_front(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The non-dominated trials, every objective maximised, in trial order."""
    vals = np.array([t.values for t in trials], float)
    keep = [i for i in range(len(trials))
            if not any((vals[j] >= vals[i]).all() and (vals[j] > vals[i]).any() for j in range(len(trials)))]
    return [trials[i] for i in keep]


def select(trials: Sequence[optuna.trial.FrozenTrial], policy: str = "robust",
           radius: float = ROBUST_RADIUS) -> optuna.trial.FrozenTrial:
    """The candidate to export among fully scored `trials` (values maximised)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; known: {', '.join(POLICIES)}")
    trials = sorted(trials, key=lambda t: t.number)
    if not trials:
        raise ValueError("no fully scored trial to select from")
    # with constraints (eval.constraints), only feasible candidates are chosen when there are any
    feasible = [t for t in trials if all(c <= 0 for c in t.user_attrs.get("constraints", []))]
    trials = feasible or trials
    raw = np.array([np.mean(t.values) for t in trials])
    value = smoothed(trials, raw, radius) if policy == "robust" else raw
    pool = pareto_front(trials) if len(trials[0].values) > 1 else trials
    index = {t.number: i for i, t in enumerate(trials)}
    # highest (smoothed) value, then highest raw value, then the earliest trial
    return max(pool, key=lambda t: (value[index[t.number]], raw[index[t.number]], -t.number))
