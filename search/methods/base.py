"""What every merge method is made of: its spec, its inputs, and the checks they share.

A method file (search/methods/<name>.py) defines one `SPEC = MethodSpec(...)`: its name, its
inputs (how many models, whether one is a base), its parameters as mergekit spells them (type,
default, the range a search draws them from), whether it is random, the tensor function, and
optionally a fused in-memory kernel. `search/methods/__init__.py` lists the specs in one dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from search.errors import MergeSearchError

class _Required:
    """The default of a parameter that has none (a config must set it)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a parameter without a default (None is a default: "unset", as passthrough's scale)
NORMALIZE_EPS = 1e-8  # |sum of weights| below this cannot be normalized by
RESCALE_EPS = 1e-7  # l1 rescale is skipped when either norm is below this (as mergekit)

# The one dtype table: config and mergekit names -> torch dtypes, and safetensors codes.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_CODES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                                             torch.float64: "F64"}


@dataclass(frozen=True)
class Param:
    """One parameter of a method, named as mergekit names it.

    search: the range a search draws it from by default, (low, high) (the run config's
    `merge.ranges` overrides it); "weight": a model's weight, on the simplex when the method
    normalizes, else in `merge.weight_range`, one-hot in the baselines; None: never searched (a
    fixed value from the config, or the default). neutral: its value in the baselines (each
    source alone, uniform), where it is searched.
    """

    type: type = float
    default: Any = REQUIRED
    search: tuple[float, float] | str | None = None
    neutral: Any = None


@dataclass
class MergeInputs:
    """One tensor's inputs: the members (every model but the base), their parameters, the
    shared parameters, and what random methods and cached selections need."""

    base: Tensor | None
    tensors: Sequence[Tensor]
    params: Sequence[Mapping[str, Any]]  # per member
    shared: Mapping[str, Any]
    out_dtype: torch.dtype | None = None
    seed: int = 0
    name: str = ""  # the tensor's name (random methods seed by it)
    indices: Sequence[int] = ()  # each member's index in the recipe, the base included
    cache: Sequence[Any] | None = None  # per member: spec.precompute(base, x), where it applies
    group_cache: Any = None  # spec.precompute_group(base, members), where it applies

    def per_model(self, key: str) -> list:
        return [p[key] for p in self.params]


@dataclass(frozen=True)
class Kernel:
    """A fused in-memory path over flat slices of the resident rows.

    fn(*args, out): the kernel (torch.compile'd when the model is large and the compiled form
    gives the eager bits on `probe`). args(flat): its arguments for one recipe, or None where
    the kernel does not apply (the merger then calls the tensor function). runs: the kernel is
    elementwise, so one call covers a run of tensors that share a recipe; otherwise one call per
    tensor. probe(xs, device): arguments on three random flat tensors, for the compile check.
    """

    fn: Callable[..., None]
    args: Callable[[FlatInputs], tuple | None]
    probe: Callable[[tuple[Tensor, ...], torch.device], tuple]
    runs: bool = True
    compile_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class FlatInputs:
    """A kernel's view of one recipe: flat slices of the members and the base, the weights as
    an fp32 device tensor, the per-member caches, and the recipe itself."""

    members: tuple[Tensor, ...]
    base: Tensor | None
    weights: Tensor | None
    recipe: Any  # a search.mergeconfig.TensorRecipe
    member_params: Sequence[Mapping[str, Any]]
    cache: Sequence[Any] | None
    numel: int


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: everything every stage needs to know about it.

    needs_base: a base model is a distinguished input (task vectors; slerp's t=0 end).
    base_is_first_model: in a run config the base is the first listed model, not merge.base_model
    (slerp). min_models / max_models count the inputs, the base included. random: the tensor
    function draws from a generator seeded by (seed, tensor name, model index).
    precompute(base, x): per member and tensor, work that depends only on the sources (TIES'
    magnitude ranks), cached by the in-memory merger at first use where cache_when(the member's
    parameters) holds, and handed to the tensor function and kernel as `cache`.
    precompute_group(base, members): the same for work over all members of a tensor at once
    (sce's variance ranks), once per tensor where group_cache_when(the shared parameters)
    holds, handed over as `group_cache`. baselines(model names): the rows every study starts with,
    (label, values of one cell); None: each source alone (one-hot weights), then uniform.
    weights_scale_free: the merge depends only on the weights' ratios (nuslerp, multislerp), so a
    search draws them on the simplex as for normalizing methods. base_unsupported: mergekit
    would use a given base_model (a task-vector mode) that merge-search does not implement; a
    config naming one is refused in one line rather than merged differently.
    check_ranges(search ranges by parameter): why some values in them are invalid together
    (della: density ± epsilon must stay in (0, 1)), or None; checked when a run config is read.
    """

    name: str
    merge: Callable[[MergeInputs], Tensor]
    needs_base: bool
    min_models: int
    max_models: int | None
    model_params: Mapping[str, Param]
    shared_params: Mapping[str, Param]
    base_is_first_model: bool = False
    random: bool = False
    kernel: Kernel | None = None
    precompute: Callable[[Tensor | None, Tensor], Tensor] | None = None
    cache_when: Callable[[Mapping[str, Any]], bool] = lambda params: True
    precompute_group: Callable[[Tensor | None, Sequence[Tensor]], Any] | None = None
    group_cache_when: Callable[[Mapping[str, Any]], bool] = lambda shared: True
    baselines: Callable[[Sequence[str]], list[tuple[str, dict[str, list]]]] | None = None
    check_ranges: Callable[[Mapping[str, tuple[float, float]]], str | None] | None = None
    weights_scale_free: bool = False  # only the weights' ratios matter: searched on the simplex
    base_unsupported: bool = False  # mergekit takes an optional base_model (task-vector mode) that we refuse
    reference: str = ""  # the paper

    @property
    def normalize_default(self) -> bool | None:
        p = self.shared_params.get("normalize")
        return None if p is None else p.default

    @property
    def params(self) -> tuple[str, ...]:
        return (*self.model_params, *self.shared_params)

    def search_ranges(self, overrides: Mapping[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
        """The (low, high) range of every range-searched parameter, `overrides` over the defaults."""
        out = {k: tuple(p.search) for k, p in {**self.model_params, **self.shared_params}.items()
               if isinstance(p.search, tuple)}
        out.update({k: tuple(v) for k, v in (overrides or {}).items()})
        return out

    @property
    def searched_model_params(self) -> tuple[str, ...]:
        return tuple(k for k, p in self.model_params.items() if p.search is not None)

    @property
    def searched_shared_params(self) -> tuple[str, ...]:
        return tuple(k for k, p in self.shared_params.items() if p.search is not None)

    @property
    def base_row(self) -> bool:
        """The base is a model of its own, loaded beside the sources (not one of them)."""
        return self.needs_base and not self.base_is_first_model


# --- checks and helpers every method shares ----------------------------------------------

def check_finite(tensor: Tensor, what: str) -> None:
    """Raise MergeSearchError naming `what` (tensor, model, file) if `tensor` holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeSearchError(f"{what}: {bad} NaN/inf values of {tensor.numel()}")


def check_density(density: float, method: str) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise MergeSearchError(f"{method}: density must be in (0, 1] but got {density!r}")


def check_normalizable(weights: Sequence[float], method: str, what: str = "") -> None:
    total = float(torch.tensor([list(map(float, weights))], dtype=torch.float32).sum(dim=1))
    if abs(total) < NORMALIZE_EPS:
        where = f" at {what}" if what else ""
        raise MergeSearchError(f"{method}: weights {list(weights)} sum to {total:g}{where}; "
                               "cannot normalize (set normalize: false or change the weights)")


def same_shape(tensors: Sequence[Tensor], method: str) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MergeSearchError(f"{method}: inputs have different shapes {sorted(shapes)}")


def out_dtype_of(tensors: Sequence[Tensor], out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def weight_divisor(w: Tensor) -> Tensor:
    """Σ w as task-vector methods divide by it, computed eagerly (a compiled reduction may round
    it differently, and one ulp here changes every element); ~0 -> 1."""
    divisor = w.sum(dim=0, keepdim=True)
    divisor[divisor.abs() < NORMALIZE_EPS] = 1
    return divisor
