"""della: drop task-vector elements at random with a keep probability that grows with their
magnitude rank (MAGPRUNE), l1-rescale, elect signs, disjoint mean (Deep et al., 2024).

mergekit's semantics (GeneralizedTaskArithmeticMerge, sparsification `della_magprune`): per
model, density >= 1 keeps the task vector untouched (no rescale); otherwise density ± epsilon
must lie inside (0, 1), each row (dim 1; a 1-D tensor is one row) is ranked by |d|, and element
e is kept with probability p = (density - ε) + rank_norm·2ε, rank_norm = 0 for the smallest
magnitude of its row and 1 for the largest; the mean keep rate is density.

Our op order, in fp32: d_i = x_i - base; r = `magprune_rank(d_i)` (ascending 0-based rank along
dim 1, stable sort: tied magnitudes rank by position, on every device, where mergekit's unstable
argsort orders them arbitrarily); rank_norm = r / (n - 1), n the row length (n = 1, where
mergekit's 0/0 fails: rank_norm = 0.5, p = density); p = `(density - ε) + (rank_norm·2)·ε` (the
scalars rounded to fp32, mergekit's arithmetic); keep = u < p, u the uniform fp32 draw of DARE
for (seed, tensor, model index) (see dare_linear.py), so ε = 0 gives DARE's mask exactly; kept
= d_i·keep; if rescale, kept·(|d_i|₁/|kept|₁). Then taskvec.combine: della elects signs as
ties does (consensus), della_linear (della_linear.py) sums. mergekit draws `torch.bernoulli(p)`
from the global generator: equal in distribution only (exactly at density 1).

The ranks depend only on the sources: the in-memory merger caches them per tensor and model
(`precompute`), int16 where rows are at most 32768 long (2 bytes per element and model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param
from search.methods.taskvec import WEIGHT, combine, dare_seed, rescaled, shared_params, task_vectors

# mergekit's default density is 1 (nothing dropped); searched inside (0.2, 0.8) so that every
# epsilon of EPSILON's range keeps density ± epsilon inside (0, 1).
DENSITY = Param(float, default=1.0, search=(0.2, 0.8), neutral=1.0)
EPSILON = Param(float, default=0.15, search=(0.0, 0.15), neutral=0.15)


def _rows(t: Tensor) -> Tensor:
    """The view MAGPRUNE ranks along dim 1 of: the tensor itself, or one row (0-D and 1-D)."""
    return t if t.dim() >= 2 else t.reshape(1, -1)


def magprune_rank(delta: Tensor) -> Tensor:
    """Ascending rank (0 = smallest |delta|) of each element along dim 1 of `_rows(delta)`,
    shaped like `delta`; int16 where rows are at most 32768 long, else int32 (int64 past 2**31)."""
    mags = _rows(delta.detach().abs().float())
    n = mags.shape[1]
    dtype = torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.int64
    order = torch.argsort(mags, dim=1, stable=True)
    steps = torch.arange(n, dtype=dtype, device=mags.device).expand(mags.shape)
    return torch.empty(mags.shape, dtype=dtype, device=mags.device).scatter_(1, order, steps).reshape(delta.shape)


def keep_probability(rank: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's keep probability per element, fp32, from `magprune_rank` ranks."""
    rows = _rows(rank)
    n = rows.shape[1]
    if n == 1:
        return torch.full(rank.shape, density, dtype=torch.float32, device=rank.device)
    # a device tensor, not a Python scalar: CUDA divides by a scalar as a multiply by its reciprocal
    span = torch.full((1, 1), n - 1, dtype=torch.float32, device=rank.device)
    rank_norm = rows.float() / span
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(rank.shape)


def magprune_uniform(shape: Sequence[int], *, seed: int, name: str, index: int) -> Tensor:
    """The uniform fp32 draw (on the CPU) an element is kept by when below its probability:
    DARE's, for the same (seed, tensor, model index)."""
    gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, name, index))
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32)


def check_epsilon(density: float, epsilon: float, method: str, where: str = "") -> None:
    """mergekit's rule: below density 1, density ± epsilon must lie inside (0, 1)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        at = f" at {where}" if where else ""
        raise MergeSearchError(f"{method}: density ± epsilon must lie inside (0, 1) but got density {density!r} "
                               f"and epsilon {epsilon!r}{at}")


def magprune(method: str, consensus: bool, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
             densities: Sequence[float], epsilons: Sequence[float], normalize: bool, lambda_: float,
             rescale: bool, seed: int, name: str, indices: Sequence[int] | None,
             ranks: Sequence[Tensor | None] | None, out_dtype: torch.dtype | None) -> Tensor:
    """Drop by MAGPRUNE, optionally l1-rescale, then sum (consensus=False) or sign-elect (True)."""
    if len(epsilons) != len(tensors):
        raise MergeSearchError(f"{method}: {len(tensors)} tensors, {len(epsilons)} epsilons")
    deltas, dtype = task_vectors(method, base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    indices = list(range(1, len(tensors) + 1)) if indices is None else indices
    for i, (density, epsilon) in enumerate(zip(densities, epsilons)):
        if density >= 1:
            continue
        check_epsilon(density, epsilon, method, f"tensor {name}" if name else "")
        rank = ranks[i] if ranks is not None and ranks[i] is not None else magprune_rank(deltas[i])
        p = keep_probability(rank.to(deltas.device), density, epsilon)
        u = magprune_uniform(deltas[i].shape, seed=seed, name=name, index=indices[i]).to(deltas.device)
        kept = deltas[i] * (u < p)
        deltas[i] = rescaled(deltas[i], kept) if rescale else kept
    return combine(base, deltas, weights, consensus=consensus, normalize=normalize,
                   lambda_=lambda_, out_dtype=out_dtype or dtype)


def della(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
          epsilons: Sequence[float], *, normalize: bool = True, lambda_: float = 1.0, rescale: bool = True,
          seed: int = 0, name: str = "", indices: Sequence[int] | None = None,
          ranks: Sequence[Tensor | None] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """DELLA on one tensor. name, indices: the tensor name and each model's index in the recipe
    (default 1..n, base 0), which with `seed` fix the draws; ranks: optional
    `magprune_rank(x_i - base)` per model, precomputed."""
    return magprune("della", True, base, tensors, weights, densities, epsilons, normalize, lambda_,
                    rescale, seed, name, indices, ranks, out_dtype)


def merge_kwargs(inp: MergeInputs) -> dict:
    """The keyword arguments of della / della_linear for one MergeInputs."""
    return dict(normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"], rescale=inp.shared["rescale"],
                seed=inp.seed, name=inp.name, indices=inp.indices, ranks=inp.cache, out_dtype=inp.out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return della(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                 inp.per_model("epsilon"), **merge_kwargs(inp))


def precompute(base: Tensor, x: Tensor) -> Tensor:
    return magprune_rank(x.float() - base.float())


def cache_when(params) -> bool:
    return params.get("density", 1.0) < 1  # density 1 drops nothing


def check_ranges(ranges) -> str | None:
    """Searched densities and epsilons must keep density ± epsilon inside (0, 1) for every pair
    (density 1 itself drops nothing and is allowed)."""
    (dlo, dhi), (_, ehi) = ranges["density"], ranges["epsilon"]
    low_bad = dlo < 1 and dlo - ehi <= 0
    high_bad = dlo < 1 and ehi > 0 and min(dhi, 1.0) + ehi >= 1
    if low_bad or high_bad:
        return (f"density in {[dlo, dhi]} with epsilon up to {ehi} leaves (0, 1) (density - epsilon must be > 0 "
                "and density + epsilon < 1 below density 1): narrow density_range or ranges.epsilon")
    return None


SPEC = MethodSpec(
    name="della", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY, "epsilon": EPSILON},
    shared_params=shared_params(normalize=True, rescale=True), random=True,
    precompute=precompute, cache_when=cache_when, check_ranges=check_ranges,
    reference="https://arxiv.org/abs/2406.11617",
)
