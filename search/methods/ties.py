"""ties: trim each task vector to its top-density by magnitude, elect signs, disjoint mean
(Yadav et al., 2023).

Trim: keep the top-k of |d_i|, k = max(1, int(density·numel)), chosen by `torch.argsort(|d_i|,
descending=True)` (mergekit's order, ties included); if rescale, `d_i·(|d_i|₁/|kept|₁)`. Then
`d.mul_(w)`; majority = sign of `d.sum(dim=0)` (0 counts as +); agree = `d.sign() == majority`;
`mixed = (d·agree).sum(dim=0)`, divisor `(w·agree).sum(dim=0)` with 0 -> 1; if normalize
`mixed /= divisor`; if λ != 1 `mixed *= λ`; `base + mixed`. The magnitude ranks depend only on
the sources: the in-memory merger computes them once per tensor and model (`precompute`), so a
trial at any density is a comparison, not a sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import FlatInputs, Kernel, MergeInputs, MethodSpec
from search.methods.taskvec import (
    DENSITY, WEIGHT, combine, magnitude_rank, rescaled, shared_params, task_vectors, topk_count,
)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
         densities: Sequence[float], *, normalize: bool = True, lambda_: float = 1.0,
         rescale: bool = False, ranks: Sequence[Tensor | None] | None = None,
         out_dtype: torch.dtype | None = None) -> Tensor:
    """TIES on one tensor. ranks: optional `magnitude_rank(x_i - base)` per model, precomputed."""
    deltas, dtype = task_vectors("ties", base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    for i, density in enumerate(densities):
        if density >= 1:
            continue
        rank = ranks[i] if ranks is not None and ranks[i] is not None else magnitude_rank(deltas[i])
        keep = (rank < topk_count(deltas[i].numel(), density)).reshape(deltas[i].shape)
        kept = deltas[i] * keep
        deltas[i] = rescaled(deltas[i], kept) if rescale else kept
    return combine(base, deltas, weights, consensus=True, normalize=normalize,
                   lambda_=lambda_, out_dtype=out_dtype or dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return ties(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"], rescale=inp.shared["rescale"],
                ranks=inp.cache, out_dtype=inp.out_dtype)


def _precompute(base: Tensor, x: Tensor) -> Tensor:
    return magnitude_rank(x.float() - base.float())


def _cache_when(params) -> bool:
    return params.get("density", 1.0) < 1  # density 1 trims nothing


def _kernel(xs: tuple[Tensor, ...], base: Tensor, ranks: tuple[Tensor | None, ...], ks: tuple[int, ...],
            w: Tensor, normalize: bool, lam: float, out: Tensor) -> None:
    """TIES (no rescale) on one tensor, flat: trim by cached rank, elect signs, disjoint mean."""
    b = base.float()
    ds = []
    for i in range(len(xs)):
        d = xs[i].float() - b
        if ranks[i] is not None:
            d = d * (ranks[i] < ks[i])
        ds.append(d * w[i])
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    majority = (total >= 0).to(torch.float32) * 2 - 1
    mixed, divisor = None, None
    for i in range(len(ds)):
        agree = ds[i].sign() == majority
        term, share = ds[i] * agree, w[i] * agree
        mixed = term if mixed is None else mixed + term
        divisor = share if divisor is None else divisor + share
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    if lam != 1:
        mixed = mixed * lam
    out.copy_(b + mixed)


def _args(f: FlatInputs) -> tuple | None:
    if f.recipe.shared["rescale"]:
        return None  # the l1 rescale needs whole-tensor norms: the tensor function
    ks = tuple(topk_count(f.numel, p["density"]) for p in f.member_params)
    return (f.members, f.base, tuple(f.cache), ks, f.weights, bool(f.recipe.shared["normalize"]),
            float(f.recipe.shared["lambda"]))


def _probe(xs: tuple[Tensor, ...], device: torch.device) -> tuple:
    rank = magnitude_rank(xs[1].float() - xs[0].float())
    return (xs[1:], xs[0], (rank, None), (40_000, 0), torch.tensor([0.31, 0.27], device=device), True, 0.7)


SPEC = MethodSpec(
    name="ties", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY},
    shared_params=shared_params(normalize=True, rescale=False),
    kernel=Kernel(_kernel, _args, _probe, runs=False), precompute=_precompute, cache_when=_cache_when,
    reference="https://arxiv.org/abs/2306.01708",
)
