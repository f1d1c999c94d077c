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
from search.methods import METHODS, REQUIRED

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


def sticks_from_simplex(weights: Sequence[float], collapsed: float = 0.0) -> list[float]:
    """Inverse of `simplex_from_sticks` (weights are normalized first). Once the weights so far
    sum to 1, the later sticks do not change the merge; they are set to `collapsed` (below)."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise MergeSearchError(f"weights must be >= 0 with a positive sum but got {list(weights)}")
    n, left, sticks = len(weights), 1.0, []
    for i in range(n - 1):
        w = weights[i] / total
        if left <= 1e-12:  # earlier weights took everything: every value of this stick is the same merge
            sticks.append(collapsed)
        else:
            sticks.append(1.0 - (1.0 - min(w / left, 1.0)) ** (n - 1 - i))
        left -= w
    return sticks
# A vertex such as (1, 0, 0) is the whole edge stick_0 = 1 of the parameter square, so where on
# that edge a vertex baseline is enqueued is a choice, and the samplers want different ones
# (`collapsed_stick`). Enqueued at one end (stick_1 = 0), the rest of the edge looked unexplored
# to the GP, which spent a trial on (1, 0.7): the same merge again; from the middle, the GP needs
# 16 trials to 99% of the demo grid's dev optimum instead of 18 (8 seeds, `bench search`'s
# measure, every seed better). TPE reads densities per parameter, and a bad vertex at stick_1 =
# 0.5 marks the middle of the range, where the uniform baseline sits, as bad: it needed 22.5
# trials from the middle against 17 from the end (8 seeds).
COLLAPSED_GP, COLLAPSED_OTHER = 0.5, 0.0


def collapsed_stick(sampler: optuna.samplers.BaseSampler) -> float:
    """Where a baseline's collapsed sticks go for `sampler` (see above)."""
    return COLLAPSED_GP if isinstance(sampler, optuna.samplers.GPSampler) else COLLAPSED_OTHER


class MergeSpace:
    """The search space of one merge setup, read from the method's spec (search/methods/).

    models: name -> path (as written into the config); base: the base model's path (methods
    whose base is their first model, slerp: that model); num_layers: the sources' layer count.
    ranges: search ranges by parameter name, over the spec's defaults (density_range is
    ranges["density"]). Per cell, each searched per-model parameter has one value per model
    (weights on the simplex when the method normalizes), each searched global one one value.
    """

    def __init__(self, method: str, models: dict[str, str], *, base: str | None = None,
                 normalize: bool | None = None, granularity: int = 0, filters: Sequence[str] = (),
                 weight_range: tuple[float, float] = (0.0, 1.0), density_range: tuple[float, float] | None = None,
                 lambda_: float = 1.0, num_layers: int = 1, dtype: str = "float32",
                 ranges: dict[str, tuple[float, float]] | None = None):
        if method not in METHODS:
            raise MergeSearchError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
        spec = self.spec = METHODS[method]
        self.method, self.models, self.names = method, dict(models), list(models)
        if not spec.needs_base:
            base = None  # linear has no base: a base_model would be one more input
        if spec.max_models is not None and spec.max_models - spec.base_row < 2:
            raise MergeSearchError(f"{method} takes one model: there is nothing to merge or search "
                                   "(use it in a `slices:` config with merge-search merge)")
        n_in = len(models) + (1 if spec.base_row else 0)
        if spec.max_models is not None and n_in > spec.max_models or n_in < spec.min_models:
            want = spec.max_models - spec.base_row if spec.max_models == spec.min_models else None
            raise MergeSearchError(f"{method} merges exactly {want} models but got {len(models)}" if want else
                                   f"{method} takes {spec.min_models}-{spec.max_models} inputs but got {n_in}")
        if spec.base_is_first_model:
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
        self.model_keys = spec.searched_model_params  # e.g. ("weight", "density")
        self.shared_keys = spec.searched_shared_params  # e.g. ("t",)
        self.simplex = "weight" in self.model_keys and (bool(self.normalize) or spec.weights_scale_free)
        self.has_density = "density" in self.model_keys
        self.ranges = {k: p.search for k, p in {**spec.model_params, **spec.shared_params}.items()
                       if isinstance(p.search, tuple)}
        self.ranges.update(ranges or {})
        if density_range is not None:
            self.ranges["density"] = tuple(density_range)
        problem = spec.check_ranges(self.ranges) if spec.check_ranges else None
        if problem:
            raise MergeSearchError(f"{method}: {problem}")
        self.weight_range = weight_range
        self.density_range = self.ranges.get("density")
        self.granularity = granularity
        self.groups = num_layers // granularity if granularity else 1
        self.filters = list(filters)
        self.cells = [_cell(g, f) for g in range(self.groups) for f in [*self.filters, REST]]

    @property
    def n_params(self) -> int:
        """How many parameters a trial searches (what `auto` picks its sampler by)."""
        n = len(self.names)
        per_cell = len(self.shared_keys)
        for k in self.model_keys:
            per_cell += n - 1 if (k == "weight" and self.simplex) else n
        return per_cell * len(self.cells)

    # --- trial <-> values --------------------------------------------------------------------

    def _range(self, key: str) -> tuple[float, float]:
        return self.weight_range if key == "weight" else self.ranges[key]

    def suggest(self, trial: optuna.Trial) -> dict[str, dict[str, list[float]]]:
        """Values per cell: {"weight": [per model], "density": [per model], "t": [one]}, as the spec has them."""
        values = {}
        for cell in self.cells:
            v = {}
            for k in self.model_keys:
                if k == "weight" and self.simplex:
                    sticks = [trial.suggest_float(f"{cell}.stick_{i}", 0.0, 1.0) for i in range(len(self.names) - 1)]
                    v["weight"] = simplex_from_sticks(sticks)
                else:
                    v[k] = [trial.suggest_float(f"{cell}.{k}.{n}", *self._range(k)) for n in self.names]
            for k in self.shared_keys:
                v[k] = [trial.suggest_float(f"{cell}.{k}", *self._range(k))]
            values[cell] = v
        return values

    def params_for(self, values: dict[str, dict[str, list[float]]], collapsed: float = 0.0) -> dict[str, float]:
        """The trial parameters that `suggest` turns into `values` (for enqueued baselines);
        collapsed: the value of sticks that do not change the merge (`collapsed_stick`)."""
        params = {}
        for cell, v in values.items():
            for k in self.model_keys:
                if k == "weight" and self.simplex:
                    params.update({f"{cell}.stick_{i}": s for i, s in enumerate(sticks_from_simplex(v["weight"], collapsed))})
                else:
                    params.update({f"{cell}.{k}.{n}": x for n, x in zip(self.names, v[k])})
            for k in self.shared_keys:
                params[f"{cell}.{k}"] = v[k][0]
        return params

    def uniform_values(self, weights: Sequence[float], **fixed: float) -> dict:
        """The same values in every cell: `weights`, and every other searched parameter at
        `fixed[name]`, else its neutral value (density 1)."""
        v = {}
        for k in self.model_keys:
            v[k] = list(weights) if k == "weight" else [fixed.get(k, self._neutral(k))] * len(self.names)
        for k in self.shared_keys:
            v[k] = [fixed.get(k, self._neutral(k))]
        return {cell: dict(v) for cell in self.cells}

    def _neutral(self, key: str) -> float:
        p = self.spec.model_params.get(key) or self.spec.shared_params[key]
        if p.neutral is not None:
            return p.neutral
        return p.default if p.default is not REQUIRED and p.default is not None else sum(self._range(key)) / 2

    def baselines(self) -> list[tuple[str, dict]]:
        """(label, values): the method's baselines (default: each source alone, then the uniform average)."""
        n = len(self.names)
        if self.spec.baselines is not None:
            return [(label, {cell: dict(v) for cell in self.cells}) for label, v in self.spec.baselines(self.names)]
        out = [(name, self.uniform_values([1.0 if j == i else 0.0 for j in range(n)]))
               for i, name in enumerate(self.names)]
        return out + [("uniform", self.uniform_values([1.0 / n] * n))]

    def summary(self, values: dict) -> dict[str, float]:
        """Each model's mean weight over the cells (slerp: 1-t and t), for tables."""
        if "weight" not in self.model_keys:
            if "t" in self.shared_keys and len(self.names) == 2:
                t = sum(v["t"][0] for v in values.values()) / len(values)
                return {self.names[0]: 1.0 - t, self.names[1]: t}
            return {name: 1.0 / len(self.names) for name in self.names}
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
            params = {k: self._setting(values, k, i) for k in self.model_keys}
            models.append({"model": self.models[name]} | ({"parameters": params} if params else {}))
        config["models"] = models
        shared = {k: self._setting(values, k, 0) for k in self.shared_keys}
        if "normalize" in self.spec.shared_params:
            shared["normalize"] = bool(self.normalize)
        if "lambda" in self.spec.shared_params and self.lambda_ != 1.0:
            shared["lambda"] = self.lambda_
        config["parameters"] = shared
        config["dtype"] = self.dtype
        return config
