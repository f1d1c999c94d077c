"""Sampler choice: one name in the config -> one seeded Optuna sampler.

    study: {sampler: auto}     # gp | tpe | cmaes | qmc | random | nsga2

`auto` follows what `merge-search bench search` measures on the demo (trials to reach 99% of the
dense-grid optimum, median over seeds): GP for single-objective spaces of up to
`GP_MAX_PARAMS` parameters (a Gaussian process models a few weights well from a dozen trials),
multivariate TPE beyond that (GP's per-trial fitting grows with trials x parameters and its
model of a step-shaped acc surface stops paying), and multi-objective TPE for several
objectives (NSGA-II's population of 50 is more trials than a merge search usually has). TPE
runs with `constant_liar`, so workers sharing a study do not all propose the same point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import optuna

SAMPLERS = ("auto", "gp", "tpe", "cmaes", "qmc", "random", "nsga2")
GP_MAX_PARAMS = 16
GP_STARTUP_MAX = 10  # Optuna's default number of random trials before the GP models


def gp_startup(n_params: int) -> int:
    """Trials before GP starts modelling, baselines included: two per searched parameter, at
    most Optuna's 10. On the demo's 2-parameter space GP then starts right after the 4
    baselines (demo family v2: median 16.5 trials to 99% of the optimum over 10 seeds, against 23.5 with 10);
    on its 8-parameter layer-wise space an earlier start fitted noise (test 0.946 against 0.963)."""
    return min(GP_STARTUP_MAX, 2 * max(1, n_params))


def auto_sampler(n_params: int, n_objectives: int = 1) -> str:
    """The sampler `auto` picks for a space of `n_params` searched parameters."""
    if n_objectives > 1:
        return "tpe"
    return "gp" if n_params <= GP_MAX_PARAMS else "tpe"


def make_sampler(name: str, seed: int, *, n_params: int, n_objectives: int = 1,
                 constraints: Callable[[optuna.trial.FrozenTrial], Sequence[float]] | None = None,
                 ) -> optuna.samplers.BaseSampler:
    """A seeded sampler by name (`auto` resolved by `auto_sampler`); the same seed proposes the same points.

    constraints: Optuna's constraints_func (values <= 0 are feasible), for the samplers that take it.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if name == "auto":
        name = auto_sampler(n_params, n_objectives)
    with warnings.catch_warnings():  # multivariate TPE, constant_liar, constraints: "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make(name, seed, constraints, n_params)


def _make(name: str, seed: int, constraints, n_params: int) -> optuna.samplers.BaseSampler:
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=gp_startup(n_params), constraints_func=constraints,
                                         warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          constraints_func=constraints)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":  # scrambled, so the seed matters
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    return optuna.samplers.RandomSampler(seed=seed)


def sampler_name(sampler: optuna.samplers.BaseSampler) -> str:
    """The config name of a sampler made by `make_sampler` (for logs and the bench)."""
    return {optuna.samplers.GPSampler: "gp", optuna.samplers.TPESampler: "tpe", optuna.samplers.CmaEsSampler: "cmaes",
            optuna.samplers.QMCSampler: "qmc", optuna.samplers.NSGAIISampler: "nsga2",
            optuna.samplers.RandomSampler: "random"}[type(sampler)]
