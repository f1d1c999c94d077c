"""dare_linear: drop task-vector elements at random (keep probability density), l1-rescale,
add (Yu et al., 2024, "Language Models are Super Mario").

DARE randomness: element e of model i's task vector for tensor `name` is kept when `u[e] <
density`, u = `torch.rand(shape, generator=torch.Generator().manual_seed(s))` on the CPU, s =
first 8 bytes (little endian, top bit cleared) of sha256(f"{seed}:{name}:{i}"), i = the model's
index in the recipe (base included). So a mask depends only on (seed, tensor, model), not on the
order tensors are merged in, and a smaller density keeps a subset of a larger one's elements.
mergekit draws `torch.bernoulli` from the global generator instead: DARE matches it in
distribution only (exactly at density 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import MergeInputs, MethodSpec
from search.methods.taskvec import DENSITY, WEIGHT, dare, shared_params


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                densities: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0,
                rescale: bool = True, seed: int = 0, name: str = "",
                indices: Sequence[int] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE: drop at random, l1-rescale, add. name, indices: the tensor name and each model's
    index in the recipe (default 1..n, base 0), which with `seed` fix the masks."""
    return dare("dare_linear", False, base, tensors, weights, densities, normalize, lambda_,
                rescale, seed, name, indices, out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return dare_linear(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                       normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"], rescale=inp.shared["rescale"],
                       seed=inp.seed, name=inp.name, indices=inp.indices, out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="dare_linear", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY},
    shared_params=shared_params(normalize=False, rescale=True), random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
