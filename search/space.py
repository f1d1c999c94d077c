"""How trial parameters map to merge configurations, and back.

A candidate is a set of values per *cell*: one cell per group of `granularity` layers (one group
when 0) and per filter (`self_attn`, `mlp`, ... as substring matches, plus `rest` for every other
tensor). In each cell:
- weights on the probability simplex when the method normalizes (linear, ties): N-1 parameters
  `stick_i` in [0, 1], each through the inverse CDF of Beta(1, k) (k = sticks left after it), so
  uniform parameters give weights uniform on the simplex;
- else one weight per model in `weight_range` (task_arithmetic, dare_*);
- one density per model in `density_range` for ties and dare_*; `t` in [0, 1] for slerp.

`to_config` turns the values into the mergekit configuration that the in-memory merger applies
and `export` writes: scalars for global weights, gradient lists with one value per layer for
layer groups, `{filter, value}` lists for filters.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from search.errors import MergeSearchError
from search.methods import METHODS

REST = "rest"  # the cell of tensors no filter matches


def _cell(group: int, filter_: str) -> str:
    return f"g{group}.{filter_}"


def simplex_from_sticks(sticks: Sequence[float]) -> list[float]:
    n, left, weights = len(sticks) + 1, 1.0, []
    for i, x in enumerate(sticks):
        frac = 1.0 - (1.0 - x) ** (1.0 / (n - 1 - i))
        weights.append(left * frac)
        left -= left * frac
    return weights + [max(left, 0.0)]


def sticks_from_simplex(weights: Sequence[float]) -> list[float]:
    """Inverse of `simplex_from_sticks` (weights are normalized first)."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise MergeSearchError(f"weights must be >= 0 with a positive sum but got {list(weights)}")
    n, left, sticks = len(weights), 1.0, []
    for i in range(n - 1):
        w = weights[i] / total
        frac = min(w / left, 1.0) if left > 1e-12 else 0.0
        sticks.append(1.0 - (1.0 - frac) ** (n - 1 - i))
        left -= w
    return sticks


class MergeSpace:
    """The search space of one merge setup.

    models: name -> path (as written into the config); base: the base model's path (slerp: the
    first model is its t=0 end); num_layers: the sources' layer count.
    """

    def __init__(self, method: str, models: dict[str, str], *, base: str | None = None,
                 normalize: bool | None = None, granularity: int = 0, filters: Sequence[str] = (),
                 weight_range: tuple[float, float] = (0.0, 1.0), density_range: tuple[float, float] = (0.1, 1.0),
                 lambda_: float = 1.0, num_layers: int = 1, dtype: str = "float32"):
        if method not in METHODS:
            raise MergeSearchError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
        spec = METHODS[method]
        self.method, self.models, self.names = method, dict(models), list(models)
        if not spec.needs_base:
            base = None  # linear has no base: a base_model would be one more input
        if method == "slerp":
            if len(models) != 2:
                raise MergeSearchError(f"slerp merges exactly 2 models but got {len(models)}")
            base = self.models[self.names[0]]
        elif spec.needs_base and base is None:
            raise MergeSearchError(f"{method} needs a base model (merge.base_model)")
        if len(models) < 2:
            raise MergeSearchError(f"a merge needs at least 2 models but got {len(models)}")
        if granularity and num_layers % granularity:
            raise MergeSearchError(
                f"merge.granularity must divide the layer count {num_layers} but got {granularity}")
        self.base, self.num_layers, self.dtype, self.lambda_ = base, num_layers, dtype, lambda_
        self.normalize = spec.normalize_default if normalize is None else normalize
        self.simplex = method != "slerp" and bool(self.normalize)
        self.has_density = "density" in spec.args
        self.weight_range, self.density_range = weight_range, density_range
        self.granularity = granularity
        self.groups = num_layers // granularity if granularity else 1
        self.filters = list(filters)
        self.cells = [_cell(g, f) for g in range(self.groups) for f in [*self.filters, REST]]

    @property
    def n_params(self) -> int:
        """How many parameters a trial searches (what `auto` picks its sampler by)."""
        n = len(self.names)
        per_cell = 1 if self.method == "slerp" else (n - 1 if self.simplex else n) + (n if self.has_density else 0)
        return per_cell * len(self.cells)

    # --- trial <-> values --------------------------------------------------------------------

    def suggest(self, trial: optuna.Trial) -> dict[str, dict[str, list[float]]]:
        """Values per cell: {"weight": [per model], "density": [per model]} or {"t": [t]}."""
        values = {}
        for cell in self.cells:
            if self.method == "slerp":
                values[cell] = {"t": [trial.suggest_float(f"{cell}.t", 0.0, 1.0)]}
                continue
            if self.simplex:
                sticks = [trial.suggest_float(f"{cell}.stick_{i}", 0.0, 1.0) for i in range(len(self.names) - 1)]
                v = {"weight": simplex_from_sticks(sticks)}
            else:
                v = {"weight": [trial.suggest_float(f"{cell}.weight.{n}", *self.weight_range) for n in self.names]}
            if self.has_density:
                v["density"] = [trial.suggest_float(f"{cell}.density.{n}", *self.density_range) for n in self.names]
            values[cell] = v
        return values

    def params_for(self, values: dict[str, dict[str, list[float]]]) -> dict[str, float]:
        """The trial parameters that `suggest` turns into `values` (for enqueued baselines)."""
        params = {}
        for cell, v in values.items():
            if self.method == "slerp":
                params[f"{cell}.t"] = v["t"][0]
                continue
            if self.simplex:
                params.update({f"{cell}.stick_{i}": s for i, s in enumerate(sticks_from_simplex(v["weight"]))})
            else:
                params.update({f"{cell}.weight.{n}": w for n, w in zip(self.names, v["weight"])})
            if self.has_density:
                params.update({f"{cell}.density.{n}": d for n, d in zip(self.names, v["density"])})
        return params

    def uniform_values(self, weights: Sequence[float], density: float = 1.0, t: float = 0.5) -> dict:
        """The same values in every cell."""
        if self.method == "slerp":
            return {cell: {"t": [t]} for cell in self.cells}
        v = {"weight": list(weights)} | ({"density": [density] * len(self.names)} if self.has_density else {})
        return {cell: dict(v) for cell in self.cells}

    def baselines(self) -> list[tuple[str, dict]]:
        """(label, values): each source alone, then the uniform average."""
        n = len(self.names)
        if self.method == "slerp":
            return [(self.names[0], self.uniform_values([], t=0.0)), (self.names[1], self.uniform_values([], t=1.0)),
                    ("uniform", self.uniform_values([], t=0.5))]
        out = [(name, self.uniform_values([1.0 if j == i else 0.0 for j in range(n)]))
               for i, name in enumerate(self.names)]
        return out + [("uniform", self.uniform_values([1.0 / n] * n))]

    def summary(self, values: dict) -> dict[str, float]:
        """Each model's mean weight over the cells (slerp: 1-t and t), for tables."""
        if self.method == "slerp":
            ts = [v["t"][0] for v in values.values()]
            t = sum(ts) / len(ts)
            return {self.names[0]: 1.0 - t, self.names[1]: t}
        out = {}
        for i, name in enumerate(self.names):
            ws = [v["weight"][i] for v in values.values()]
            out[name] = sum(ws) / len(ws)
        if self.simplex:
            total = sum(out.values())
            out = {k: v / total for k, v in out.items()}
        return out

    # --- values -> mergekit configuration ----------------------------------------------------

    def _setting(self, values: dict, key: str, index: int):
        """One parameter of one model over the cells: scalar, gradient, or filter list."""
        per_filter = []
        for f in [*self.filters, REST]:
            vals = [float(values[_cell(g, f)][key][index]) for g in range(self.groups)]
            if len(vals) == 1:
                setting = vals[0]
            else:  # one value per layer: the group's value, for mergekit's gradient interpolation
                setting = [vals[layer // self.granularity] for layer in range(self.num_layers)]
            per_filter.append((f, setting))
        if not self.filters:
            return per_filter[0][1]
        return [{"filter": f, "value": s} if f != REST else {"value": s} for f, s in per_filter]

    def to_config(self, values: dict) -> dict:
        """The mergekit configuration of `values` (what is merged, scored and exported)."""
        config: dict = {"merge_method": self.method}
        if self.base is not None:
            config["base_model"] = self.base
        models = []
        for i, name in enumerate(self.names):
            params = {}
            if self.method != "slerp":
                params["weight"] = self._setting(values, "weight", i)
                if self.has_density:
                    params["density"] = self._setting(values, "density", i)
            models.append({"model": self.models[name]} | ({"parameters": params} if params else {}))
        config["models"] = models
        shared = {}
        if self.method == "slerp":
            shared["t"] = self._setting(values, "t", 0)
        else:
            shared["normalize"] = bool(self.normalize)
            if self.method != "linear" and self.lambda_ != 1.0:
                shared["lambda"] = self.lambda_
        config["parameters"] = shared
        config["dtype"] = self.dtype
        return config
