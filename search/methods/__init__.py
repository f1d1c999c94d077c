"""The merge methods: one file per method, one registry.

    spec = METHODS["ties"]                                               # a MethodSpec
    out = linear([a, b], weights=[0.7, 0.3])                             # normalize=True
    out = ties(base, [a, b], weights=[1, 1], densities=[0.5, 0.5])
    out = merge_tensor(recipe, tensors, out_dtype=torch.bfloat16)        # from a TensorRecipe

Each method file defines one `SPEC` (see `base.MethodSpec`): its name, inputs, parameters with
their mergekit names, defaults and search ranges, whether it is random, its tensor function and
optionally a fused kernel. Every stage reads the spec: the run config (which methods exist,
which need a base), the search space (which parameters a cell has), the study (the baselines;
whether a base row is loaded), the in-memory merger (fused or per tensor), `merge-search merge`
and the export. Adding a method is one new file and its line in METHODS below.

Semantics are mergekit 0.1.5's for the same YAML (proven bit for bit by tests/test_parity.py).
Every function computes in fp32 (whatever the sources' dtype) and rounds once to `out_dtype`
(default: the promoted dtype of its inputs). The op order each file documents is part of the
contract, because the fused in-memory kernels must give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods import dare_linear as _dare_linear
from search.methods import dare_ties as _dare_ties
from search.methods import model_stock as _model_stock
from search.methods import sce as _sce
from search.methods import breadcrumbs as _breadcrumbs
from search.methods import breadcrumbs_ties as _breadcrumbs_ties
from search.methods import della as _della
from search.methods import della_linear as _della_linear
from search.methods import nearswap as _nearswap
from search.methods import passthrough as _passthrough
from search.methods import karcher as _karcher
from search.methods import multislerp as _multislerp
from search.methods import nuslerp as _nuslerp
from search.methods import linear as _linear
from search.methods import slerp as _slerp
from search.methods import task_arithmetic as _task_arithmetic
from search.methods import ties as _ties
from search.methods.base import (
    DTYPES, NORMALIZE_EPS, REQUIRED, RESCALE_EPS, SAFETENSORS_CODES, FlatInputs, Kernel, MergeInputs, MethodSpec, Param,
    check_density, check_finite, check_normalizable,
)
from search.methods.dare_linear import dare_linear
from search.methods.dare_ties import dare_ties
from search.methods.linear import linear
from search.methods.slerp import SLERP_CHUNK, SLERP_DOT_THRESHOLD, SLERP_EPS, slerp
from search.methods.task_arithmetic import task_arithmetic
from search.methods.taskvec import dare_keep, dare_seed, magnitude_rank, topk_count
from search.methods.ties import ties

METHODS: dict[str, MethodSpec] = {
    "linear": _linear.SPEC,
    "task_arithmetic": _task_arithmetic.SPEC,
    "ties": _ties.SPEC,
    "dare_linear": _dare_linear.SPEC,
    "dare_ties": _dare_ties.SPEC,
    "slerp": _slerp.SPEC,
    "sce": _sce.SPEC,
    "model_stock": _model_stock.SPEC,
    "breadcrumbs": _breadcrumbs.SPEC,
    "breadcrumbs_ties": _breadcrumbs_ties.SPEC,
    "della": _della.SPEC,
    "della_linear": _della_linear.SPEC,
    "nearswap": _nearswap.SPEC,
    "passthrough": _passthrough.SPEC,
    "nuslerp": _nuslerp.SPEC,
    "multislerp": _multislerp.SPEC,
    "karcher": _karcher.SPEC,
}

# The methods whose merged tensor is, per cell, a weighted sum of the input tensors (TIES' with its
# trim and sign masks held): the ones whose weights `study.learner` learns by gradient
# (search/learn.py has their coefficients).
LEARNABLE = ("linear", "task_arithmetic", "ties", "slerp")

# Value types of every parameter any method takes, validated as mergekit validates them
# (pydantic, lax: "0.5" -> 0.5, 1 -> True).
PARAM_TYPES: dict[str, type] = {name: p.type for spec in METHODS.values()
                                for name, p in (*spec.model_params.items(), *spec.shared_params.items())}


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`; MergeSearchError listing the known ones otherwise."""
    spec = METHODS.get(name)
    if spec is None:
        raise MergeSearchError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}")
    return spec


def parameter_free(spec: MethodSpec) -> bool:
    """Nothing to search (model_stock, karcher): in a study such a method is a baseline row."""
    return not spec.searched_model_params and not spec.searched_shared_params


def baseline_methods(n_models: int, has_base: bool, exclude: str = "") -> list[str]:
    """The parameter-free methods that can merge `n_models` sources (with the base, if given):
    the rows a study adds next to each source alone and uniform."""
    out = []
    for name, spec in METHODS.items():
        n = n_models + (1 if spec.base_row else 0)
        if (name != exclude and parameter_free(spec) and (has_base or not spec.base_row)
                and n >= spec.min_models and (spec.max_models is None or n <= spec.max_models)):
            out.append(name)
    return out


def members(spec: MethodSpec, recipe) -> list[int]:
    """Indices of a recipe's models that are merged in (every one but the base)."""
    return [i for i in range(len(recipe.models)) if i != recipe.base] if spec.needs_base else list(range(len(recipe.models)))


def check_recipe(recipe) -> None:
    """Raise MergeSearchError if `recipe` (a TensorRecipe) cannot be merged: input count, base,
    density range, weights that cannot be normalized. One line naming method and tensor."""
    spec = method_spec(recipe.method)
    n, where = len(recipe.models), f"tensor {recipe.tensor}"
    if spec.needs_base and recipe.base is None:
        raise MergeSearchError(f"{recipe.method} needs a base_model (none given for {where})")
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}")
        raise MergeSearchError(f"{recipe.method} takes {want} models, the base included, but got {n} "
                               f"for {where}")
    idx = members(spec, recipe)
    if "density" in spec.searched_model_params:
        for i in idx:
            if "density" in recipe.params[i]:
                check_density(recipe.params[i]["density"], f"{recipe.method} ({recipe.models[i]}, {where})")
    if recipe.shared.get("normalize") and "weight" in spec.model_params and idx:
        check_normalizable([recipe.params[i]["weight"] for i in idx], recipe.method, where)


def merge_inputs(recipe, tensors: Sequence[Tensor], *, out_dtype: torch.dtype | None = None, seed: int = 0,
                 cache: Sequence[Any] | None = None, group_cache: Any = None) -> MergeInputs:
    """The MergeInputs of `recipe` over `tensors` (tensors[i] read from recipe.models[i]);
    cache: per model of the recipe (None for the base), see MethodSpec.precompute."""
    spec = METHODS[recipe.method]
    idx = members(spec, recipe)
    return MergeInputs(base=tensors[recipe.base] if spec.needs_base else None, tensors=[tensors[i] for i in idx],
                       params=[recipe.params[i] for i in idx], shared=recipe.shared, out_dtype=out_dtype, seed=seed,
                       name=recipe.tensor, indices=idx, cache=None if cache is None else [cache[i] for i in idx],
                       group_cache=group_cache)


def merge_tensor(recipe, tensors: Sequence[Tensor], *, out_dtype: torch.dtype | None = None,
                 seed: int = 0, cache: Sequence[Any] | None = None, group_cache: Any = None) -> Tensor:
    """Merge one tensor as `recipe` (a TensorRecipe) says; `tensors[i]` is read from recipe.models[i].

    seed: random methods' seed (see dare_linear.py). cache: per model, the method's precomputed
    selection (TIES' magnitude ranks), None where there is none.
    """
    check_recipe(recipe)
    if len(tensors) != len(recipe.models):
        raise MergeSearchError(f"{recipe.method}: {len(tensors)} tensors for {len(recipe.models)} models")
    return METHODS[recipe.method].merge(merge_inputs(recipe, tensors, out_dtype=out_dtype, seed=seed, cache=cache,
                                                     group_cache=group_cache))


__all__ = [
    "DTYPES", "LEARNABLE", "METHODS", "NORMALIZE_EPS", "PARAM_TYPES", "REQUIRED", "RESCALE_EPS", "SAFETENSORS_CODES", "SLERP_CHUNK",
    "SLERP_DOT_THRESHOLD", "SLERP_EPS", "FlatInputs", "Kernel", "MergeInputs", "MethodSpec", "Param", "check_finite",
    "check_normalizable", "check_recipe", "dare_keep", "dare_linear", "dare_seed", "dare_ties", "linear",
    "magnitude_rank", "members", "parameter_free", "baseline_methods", "merge_inputs", "merge_tensor", "method_spec", "slerp", "task_arithmetic", "ties",
    "topk_count",
]
