"""How trial parameters map to merge weights, and back.

`SimplexSpace` proposes N weights on the probability simplex from N-1 parameters in [0, 1]
by stick-breaking. Each parameter goes through the inverse CDF of Beta(1, k) (k = sticks left
after it), so uniform parameters give weights uniform on the simplex — no corner of the
simplex is favoured, and a sampler's uniform start explores it evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from search.errors import MergeSearchError


class SimplexSpace:
    """N weights >= 0 summing to 1, from parameters `stick_0 .. stick_{N-2}`."""

    def __init__(self, model_names: Sequence[str]):
        if len(model_names) < 2:
            raise MergeSearchError(f"a simplex needs at least 2 models but got {len(model_names)}")
        self.model_names = list(model_names)
        self.param_names = [f"stick_{i}" for i in range(len(model_names) - 1)]

    def weights_from_params(self, params: dict[str, float]) -> list[float]:
        n, left, weights = len(self.model_names), 1.0, []
        for i, name in enumerate(self.param_names):
            frac = 1.0 - (1.0 - params[name]) ** (1.0 / (n - 1 - i))
            weights.append(left * frac)
            left -= left * frac
        return weights + [max(left, 0.0)]

    def params_from_weights(self, weights: Sequence[float]) -> dict[str, float]:
        """Inverse of `weights_from_params` (weights are normalized first)."""
        if len(weights) != len(self.model_names):
            raise MergeSearchError(f"expected {len(self.model_names)} weights but got {len(weights)}")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise MergeSearchError(f"weights must be >= 0 with a positive sum but got {list(weights)}")
        n, left, params = len(self.model_names), 1.0, {}
        for i, name in enumerate(self.param_names):
            w = weights[i] / total
            frac = min(w / left, 1.0) if left > 1e-12 else 0.0
            params[name] = 1.0 - (1.0 - frac) ** (n - 1 - i)
            left -= w
        return params

    def suggest(self, trial: optuna.Trial) -> list[float]:
        params = {name: trial.suggest_float(name, 0.0, 1.0) for name in self.param_names}
        return self.weights_from_params(params)

    def baselines(self) -> list[tuple[str, list[float]]]:
        """(label, weights): each source alone, then the uniform average."""
        n = len(self.model_names)
        out = [(name, [1.0 if j == i else 0.0 for j in range(n)]) for i, name in enumerate(self.model_names)]
        return out + [("uniform", [1.0 / n] * n)]
