"""della_linear: DELLA's MAGPRUNE drop and l1 rescale, then a plain weighted sum of the task
vectors, no sign election (Deep et al., 2024).

mergekit: GeneralizedTaskArithmeticMerge with sparsification `della_magprune`, no consensus,
normalize false and rescale true by default. The drop, its op order and its randomness are
della's (see della.py); then taskvec.combine without consensus (as dare_linear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import MergeInputs, MethodSpec
from search.methods.della import DENSITY, EPSILON, cache_when, check_ranges, magprune, merge_kwargs, precompute
from search.methods.taskvec import WEIGHT, shared_params


def della_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                 epsilons: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0, rescale: bool = True,
                 seed: int = 0, name: str = "", indices: Sequence[int] | None = None,
                 ranks: Sequence[Tensor | None] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Linear DELLA on one tensor: MAGPRUNE drop, l1-rescale, weighted sum (arguments as della's)."""
    return magprune("della_linear", False, base, tensors, weights, densities, epsilons, normalize, lambda_,
                    rescale, seed, name, indices, ranks, out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return della_linear(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                        inp.per_model("epsilon"), **merge_kwargs(inp))


SPEC = MethodSpec(
    name="della_linear", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY, "epsilon": EPSILON},
    shared_params=shared_params(normalize=False, rescale=True), random=True,
    precompute=precompute, cache_when=cache_when, check_ranges=check_ranges,
    reference="https://arxiv.org/abs/2406.11617",
)
