"""dare_ties: DARE's random drop and l1 rescale, then TIES' sign election and disjoint mean
(Yu et al., 2024). The masks are drawn as dare_linear draws them (see dare_linear.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import MergeInputs, MethodSpec
from search.methods.taskvec import DENSITY, WEIGHT, dare, shared_params


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
              densities: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0,
              rescale: bool = True, seed: int = 0, name: str = "",
              indices: Sequence[int] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE drop + rescale, then TIES sign election and disjoint mean."""
    return dare("dare_ties", True, base, tensors, weights, densities, normalize, lambda_,
                rescale, seed, name, indices, out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return dare_ties(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                     normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"], rescale=inp.shared["rescale"],
                     seed=inp.seed, name=inp.name, indices=inp.indices, out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="dare_ties", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY},
    shared_params=shared_params(normalize=False, rescale=True), random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
