"""The mergekit YAML subset merge-search merges, and per-tensor resolution of its parameters.

    cfg = load_merge_config("best.yaml")                  # MergeSearchError: one line, file + key
    recipe = resolve(cfg, "model.layers.3.mlp.up_proj.weight", num_layers=32)
    recipe.models, recipe.inputs, recipe.params, recipe.shared

Supported: merge_method, base_model, models [{model, parameters}], slices [{sources: [{model,
layer_range, parameters}], base_model, parameters}], parameters, dtype, out_dtype,
tokenizer_source (a model or "base"), chat_template (template text or "auto"). Anything else is
refused by name. Parameter settings are mergekit's: a scalar, a gradient list (interpolated over
the layers of a slice), or a list of {filter, value} (first entry whose filter is a substring of
the tensor name, or that has no filter / filter "*", wins; none matching falls through).

Resolution follows mergekit 0.1.5's planner exactly:
- `models:` is one slice covering every layer; a base_model not listed is appended as an input.
  Under `slices:` the base must be one of each slice's sources.
- Output layer j lies in the slice covering it; source s reads its layer `layer_range[0] + offset`
  and a gradient is taken at t = offset / (slice length - 1) (t = 1 for a one-layer slice).
- Tensors outside the layers use t = 0, i.e. a gradient's FIRST value: embeddings take the first
  slice's sources and parameters, the final norm and lm_head the last slice's.
- Precedence, highest first: the slice source's own parameters (per-model parameters only), the
  slice's parameters, the global parameters, the method's default. Per-model filters match the
  source's tensor name (its own layer index), global parameters the output tensor name.
Layer tensors are recognised by a `layers.<i>.` path component (Llama-family naming); a
non-layer tensor is "before the layers" when its name contains "embed", else after them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError, model_validator

from search.errors import MergeSearchError, field_path
from search.methods import DTYPES as METHOD_DTYPES
from search.methods import METHODS, PARAM_TYPES, REQUIRED
from search.yamlfile import read_yaml

Scalar = bool | int | float | str
LAYER_RE = re.compile(r"^(?P<head>(?:.*\.)?layers\.)(?P<index>\d+)(?P<tail>\..+)$")
DTYPES = tuple(METHOD_DTYPES)  # the one dtype table: search.methods.DTYPES
_ADAPTERS = {name: TypeAdapter(kind) for name, kind in PARAM_TYPES.items()}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilteredValue(_Frozen):
    """One entry of a `{filter, value}` list; filter None or "*" matches every tensor."""

    filter: str | None = None
    value: Scalar | tuple[Scalar, ...]


def _parse_setting(raw: Any) -> Any:
    """YAML value -> scalar | tuple of scalars (gradient) | tuple of FilteredValue."""
    if isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, dict):
        raw = [raw]
    if isinstance(raw, (list, tuple)):
        if all(isinstance(e, (bool, int, float, str)) for e in raw):
            return tuple(raw)
        if all(isinstance(e, dict) for e in raw):
            return tuple(_filtered(e) for e in raw)
    raise ValueError(f"expected a number, a list of numbers (gradient) or a list of "
                     f"{{filter, value}} but got {raw!r}")


def _filtered(entry: dict) -> FilteredValue:
    extra = sorted(set(entry) - {"filter", "value"})
    if extra:
        raise ValueError(f"{{filter, value}} entry: key {extra[0]!r} not supported by merge-search merge")
    try:
        return FilteredValue.model_validate(entry)
    except ValidationError as e:
        raise ValueError(f"bad {{filter, value}} entry {entry!r}: {e.errors()[0]['msg']}") from None


Setting = Annotated[Any, BeforeValidator(_parse_setting)]
Parameters = dict[str, Setting]


def _model_ref(ref: str) -> str:
    if "+" in ref:
        raise ValueError(f"{ref!r}: LoRA references (model+lora) are not supported by merge-search merge")
    if "@" in ref:
        raise ValueError(f"{ref!r}: revisions (model@revision) are not supported by merge-search merge")
    return ref


ModelRef = Annotated[str, BeforeValidator(lambda v: _model_ref(v) if isinstance(v, str) else v)]


def _dtype_name(value: Any) -> Any:
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return value.removeprefix("torch.")
    return value


DtypeName = Annotated[Literal["float32", "bfloat16", "float16"] | None, BeforeValidator(_dtype_name)]


class ModelEntry(_Frozen):
    model: ModelRef
    parameters: Parameters | None = None


class SliceSource(_Frozen):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(_Frozen):
    sources: tuple[SliceSource, ...]
    base_model: ModelRef | None = None
    parameters: Parameters | None = None


class MergeConfig(_Frozen):
    """A mergekit merge configuration restricted to what merge-search merge implements."""

    merge_method: str
    base_model: ModelRef | None = None
    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[OutputSlice, ...] | None = None
    parameters: Parameters | None = None
    dtype: DtypeName = None
    out_dtype: DtypeName = None
    tokenizer_source: ModelRef | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        spec = METHODS.get(self.merge_method)
        if spec is None:
            raise ValueError(f"merge_method: unknown merge method {self.merge_method!r}; "
                             f"known: {', '.join(METHODS)}")
        if spec.base_unsupported and self.base_model:
            raise ValueError(f"base_model: {self.merge_method} with a base (mergekit's task-vector mode) is not "
                             "supported by merge-search; drop base_model")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models or slices (non-empty)")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: 'union' is not supported by merge-search merge "
                             "(sources must share one tokenizer): use 'base' or a model")
        if self.tokenizer_source == "base" and not self.base_model:
            raise ValueError("tokenizer_source: 'base' needs a base_model")
        if self.chat_template is not None and self.chat_template != "auto" and "{" not in self.chat_template:
            raise ValueError(f"chat_template: named templates ({self.chat_template!r}) are not supported "
                             "by merge-search merge; give the template text or 'auto'")
        self._check_parameters(spec)
        for k, group in enumerate(_groups(self)):
            self._check_group(spec, k, group)
        return self

    def _check_parameters(self, spec) -> None:
        places = [("parameters", self.parameters, True)]
        places += [(f"models[{i}].parameters", m.parameters, False) for i, m in enumerate(self.models or ())]
        for k, s in enumerate(self.slices or ()):
            places.append((f"slices[{k}].parameters", s.parameters, True))
            places += [(f"slices[{k}].sources[{i}].parameters", src.parameters, False)
                       for i, src in enumerate(s.sources)]
        for where, params, shared_ok in places:
            for name, setting in (params or {}).items():
                _check_parameter(spec, self.merge_method, f"{where}.{name}", name, setting, shared_ok)

    def _check_group(self, spec, k: int, group: _Group) -> None:
        where = "models" if self.models else f"slices[{k}]"
        models = [s.model for s in group.sources]
        dup = sorted({m for m in models if models.count(m) > 1})
        if dup:
            raise ValueError(f"{where}: model {dup[0]!r} listed twice")
        lengths = {s.end - s.start for s in group.sources}
        if self.slices and (len(lengths) > 1 or any(s.start < 0 or s.end < s.start for s in group.sources)):
            ranges = [[s.start, s.end] for s in group.sources]
            raise ValueError(f"{where}: layer_range {ranges}: every source must cover the same "
                             "number of layers, with 0 <= start <= end")
        if spec.needs_base and group.base is None:
            raise ValueError(f"{self.merge_method} needs a base_model (none given)")
        if spec.needs_base and group.base not in models:
            raise ValueError(f"{where}: base_model {group.base!r} must be one of the slice's sources")
        n = len(models)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                    else f"at least {spec.min_models}")
            raise ValueError(f"{where}: {self.merge_method} takes {want} models, the base included, "
                             f"but got {n}")


def _check_parameter(spec, method: str, where: str, name: str, setting: Any, shared_ok: bool) -> None:
    if name not in spec.params:
        raise ValueError(f"{where}: not a parameter of merge method {method} "
                         f"(its parameters: {', '.join(spec.params)})")
    if not shared_ok and name not in spec.model_params:
        raise ValueError(f"{where}: {name} is a global parameter of {method}; set it under parameters")
    values = []
    for entry in setting if isinstance(setting, tuple) else (setting,):
        inner = entry.value if isinstance(entry, FilteredValue) else entry
        values += list(inner) if isinstance(inner, tuple) else [inner]
    for v in values:
        try:
            x = _ADAPTERS[name].validate_python(v)
        except ValidationError:
            raise ValueError(f"{where}: {v!r} is not a valid {PARAM_TYPES[name].__name__}") from None
        if name == "density" and not 0 < x <= 1:
            raise ValueError(f"{where}: density must be in (0, 1] but got {v!r}")


# --- loading --------------------------------------------------------------------------------

def parse_merge_config(data: Any, source: str = "<config>") -> MergeConfig:
    """Validate a parsed YAML mapping; MergeSearchError "source: key.path: problem" otherwise."""
    if not isinstance(data, dict):
        raise MergeSearchError(f"{source}: expected a mapping of mergekit keys but got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")  # a typo explains the rest
        err = errors[0]
        loc, msg = field_path(err["loc"]), err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "key not supported by merge-search merge"
        elif err["type"] == "missing":
            msg = "required key missing"
        elif err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err.get('input')!r})"
        n = e.error_count() - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
        raise MergeSearchError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file (see the module doc for what is supported)."""
    path = Path(path)
    data = read_yaml(path, MergeSearchError)
    return parse_merge_config(data, str(path))


# --- resolution -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRecipe:
    """How to make one output tensor. Index i of models/inputs/params is one input.

    models: model references in mergekit's input order (slice sources; for `models:` the base is
    appended when not listed). inputs: the tensor to read from each model (differs from `tensor`
    under slices). base: index of the base model, None for methods without one (linear, where a
    base_model is an ordinary input). params: per-model parameters, {} for the base of a base
    method. shared: global parameters with the method's defaults filled in.
    """

    tensor: str
    method: str
    models: tuple[str, ...]
    inputs: tuple[str, ...]
    base: int | None
    params: tuple[dict[str, Any], ...]
    shared: dict[str, Any]


@dataclass(frozen=True)
class _Source:
    model: str
    start: int
    end: int
    parameters: dict | None


@dataclass(frozen=True)
class _Group:
    sources: tuple[_Source, ...]
    base: str | None
    parameters: dict | None

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def _groups(cfg: MergeConfig, num_layers: int = 0) -> list[_Group]:
    """Slices in mergekit's normalized form (`models:` becomes one slice over all layers)."""
    if cfg.models:
        sources = [_Source(m.model, 0, num_layers, m.parameters) for m in cfg.models]
        if cfg.base_model and cfg.base_model not in [m.model for m in cfg.models]:
            sources.append(_Source(cfg.base_model, 0, num_layers, None))
        return [_Group(tuple(sources), cfg.base_model, None)]
    return [_Group(tuple(_Source(s.model, *s.layer_range, s.parameters) for s in sl.sources),
                   sl.base_model or cfg.base_model, sl.parameters) for sl in cfg.slices]


def output_layer_count(cfg: MergeConfig, num_layers: int) -> int:
    """Layers of the merged model: num_layers for `models:`, the slices' total length otherwise."""
    return sum(g.length for g in _groups(cfg, num_layers))


def is_before_layers(tensor_name: str) -> bool:
    return "embed" in tensor_name


def output_tensors(cfg: MergeConfig, source_tensors: Sequence[str], num_layers: int) -> list[str]:
    """Names of the merged model's tensors, in mergekit's order (before, layers, after), from
    the tensor names of a source (all sources are aligned) with `num_layers` layers."""
    by_layer: dict[int, list[str]] = {}
    outside = []
    for name in source_tensors:
        m = LAYER_RE.match(name)
        if m:
            by_layer.setdefault(int(m["index"]), []).append(name)
        else:
            outside.append(name)
    names = [n for n in outside if is_before_layers(n)]
    j = 0
    for group in _groups(cfg, num_layers):
        _check_range(group, num_layers)
        for offset in range(group.length):
            for name in by_layer.get(group.sources[0].start + offset, []):
                m = LAYER_RE.match(name)
                names.append(f"{m['head']}{j}{m['tail']}")
            j += 1
    return names + [n for n in outside if not is_before_layers(n)]


def _check_range(group: _Group, num_layers: int) -> None:
    for s in group.sources:
        if s.end > num_layers:
            raise MergeSearchError(f"{s.model}: layer_range [{s.start}, {s.end}] goes past the "
                                   f"model's {num_layers} layers")


def _evaluate(setting: Any, tensor: str, t: float, name: str) -> Any:
    """mergekit's evaluation of one setting for one tensor at gradient position t; None: no match."""
    validate = _ADAPTERS[name].validate_python
    if isinstance(setting, tuple) and setting and isinstance(setting[0], FilteredValue):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor and cond.filter in tensor):
                return _evaluate(cond.value, tensor, t, name)
        return None
    if not isinstance(setting, tuple):
        return validate(setting)
    if not setting:
        return None
    values = [validate(v) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return validate((1 - frac) * values[i0] + frac * values[i1])


def _lookup(name: str, scopes: Sequence[dict | None], tensor: str, t: float, default: Any,
            method: str, what: str) -> Any:
    for scope in scopes:
        if scope is not None and name in scope:
            value = _evaluate(scope[name], tensor, t, name)
            if value is not None:
                return value
    if default is REQUIRED:
        raise MergeSearchError(f"{method}: no value for parameter {name} ({what})")
    return default


def resolve(config: MergeConfig, tensor_name: str, num_layers: int) -> TensorRecipe:
    """The recipe of output tensor `tensor_name` for sources with `num_layers` layers.

    Raises MergeSearchError (one line) for a tensor no slice produces, a missing required
    parameter, or a recipe the method refuses (see methods.check_recipe).
    """
    from search.methods import check_recipe

    spec = METHODS[config.merge_method]
    groups = _groups(config, num_layers)
    m = LAYER_RE.match(tensor_name)
    if m:
        group, offset, j = None, 0, int(m["index"])
        for g in groups:
            if j < g.length:
                group, offset = g, j
                break
            j -= g.length
        if group is None:
            raise MergeSearchError(f"tensor {tensor_name}: no slice produces output layer {m['index']}")
        _check_range(group, num_layers)
        t = offset / (group.length - 1) if group.length > 1 else 1.0
        inputs = tuple(f"{m['head']}{s.start + offset}{m['tail']}" for s in group.sources)
    else:
        group = groups[0] if is_before_layers(tensor_name) else groups[-1]
        t, inputs = 0.0, (tensor_name,) * len(group.sources)
    models = tuple(s.model for s in group.sources)
    base = models.index(group.base) if spec.needs_base and group.base in models else None
    shared_scopes = (group.parameters, config.parameters)
    shared = {name: _lookup(name, shared_scopes, tensor_name, t, default, config.merge_method,
                            f"tensor {tensor_name}")
              for name, default in ((k, p.default) for k, p in spec.shared_params.items())}
    params = []
    for i, (src, name_in) in enumerate(zip(group.sources, inputs)):
        if i == base:
            params.append({})
            continue
        scopes = (*[s.parameters for s in group.sources if s.model == src.model], *shared_scopes)
        params.append({name: _lookup(name, scopes, name_in, t, default, config.merge_method,
                                     f"model {src.model}, tensor {name_in}")
                       for name, default in ((k, p.default) for k, p in spec.model_params.items())})
    recipe = TensorRecipe(tensor_name, config.merge_method, models, inputs, base, tuple(params), shared)
    check_recipe(recipe)
    return recipe

