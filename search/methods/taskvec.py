"""The task-vector machinery the generalized task-arithmetic methods share (task_arithmetic,
ties, dare_*): task vectors, their sparsification by magnitude or at random, the l1 rescale,
and the weighted (sign-elected) sum. Semantics and op order: see search/methods/__init__.py."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import (
    NORMALIZE_EPS, RESCALE_EPS, Param, check_density, check_normalizable, out_dtype_of, same_shape,
)

WEIGHT = Param(float, search="weight")  # required; on the simplex when the method normalizes, else in weight_range
DENSITY = Param(float, default=1.0, search=(0.1, 1.0), neutral=1.0)  # merge.density_range overrides the range


def shared_params(*, normalize: bool, rescale: bool) -> dict[str, Param]:
    """The global parameters of a task-vector method (mergekit's common set); lambda and
    normalize are fixed by the run config, never searched."""
    return {"normalize": Param(bool, normalize), "rescale": Param(bool, rescale), "lambda": Param(float, 1.0),
            "int8_mask": Param(bool, False)}


def topk_count(numel: int, density: float) -> int:
    """How many elements TIES keeps: max(1, int(density * numel)) (all when density >= 1)."""
    return numel if density >= 1 else max(1, int(density * numel))


def magnitude_rank(delta: Tensor) -> Tensor:
    """Rank of each element of `delta` by |delta|, 0 = largest, flat, int32 (int64 past 2**31).

    The order is `torch.argsort(|delta|.float(), descending=True)`, exactly mergekit's, ties
    included (that sort is not stable; a kthvalue threshold would pick other tied elements).
    It depends only on the task vector, so a search computes it once: TIES's mask for any
    density is then `rank < topk_count(numel, density)`.
    """
    order = torch.argsort(delta.detach().abs().reshape(-1).float(), descending=True)
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    rank = torch.empty(order.numel(), dtype=dtype, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return rank


def dare_seed(seed: int, name: str, index: int) -> int:
    """The generator seed of DARE's mask for model `index` at tensor `name` (see the package doc)."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_keep(shape: Sequence[int], density: float, *, seed: int, name: str, index: int,
              device: str | torch.device = "cpu") -> Tensor:
    """DARE's keep mask (bool): u < density, u uniform fp32 drawn on the CPU (see the package doc)."""
    gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, name, index))
    return (torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density).to(device)


def rescaled(delta: Tensor, kept: Tensor) -> Tensor:
    """mergekit's l1 rescale: kept·(|delta|₁ / |kept|₁), unless either norm is ~0."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def combine(base: Tensor, deltas: Tensor, weights: Sequence[float], *, consensus: bool,
            normalize: bool, lambda_: float, out_dtype: torch.dtype) -> Tensor:
    w = torch.tensor(list(map(float, weights)), dtype=torch.float32, device=deltas.device)
    w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas.mul_(w)
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < NORMALIZE_EPS] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base.float() + mixed).to(out_dtype)


def task_vectors(method: str, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                 densities: Sequence[float] | None, normalize: bool) -> tuple[Tensor, torch.dtype]:
    if len(tensors) != len(weights) or (densities is not None and len(densities) != len(tensors)):
        raise MergeSearchError(f"{method}: {len(tensors)} tensors, {len(weights)} weights"
                               + ("" if densities is None else f", {len(densities)} densities"))
    same_shape([base, *tensors], method)
    for d in densities or ():
        check_density(d, method)
    if normalize and tensors:
        check_normalizable(weights, method)
    base32 = base.float()
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32, device=base.device)
    for i, x in enumerate(tensors):
        torch.sub(x.float(), base32, out=deltas[i])
    return deltas, out_dtype_of([base, *tensors], None)


def dare(method: str, consensus: bool, base: Tensor, tensors: Sequence[Tensor],
         weights: Sequence[float], densities: Sequence[float], normalize: bool, lambda_: float,
         rescale: bool, seed: int, name: str, indices: Sequence[int] | None,
         out_dtype: torch.dtype | None) -> Tensor:
    """Drop task-vector elements at random (keep prob. density), optionally l1-rescale, then
    sum (consensus=False) or sign-elect (True)."""
    deltas, dtype = task_vectors(method, base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    indices = list(range(1, len(tensors) + 1)) if indices is None else indices
    for i, density in enumerate(densities):
        if density >= 1:
            continue
        keep = dare_keep(deltas[i].shape, density, seed=seed, name=name, index=indices[i],
                         device=deltas.device)
        kept = deltas[i] * keep
        deltas[i] = rescaled(deltas[i], kept) if rescale else kept
    return combine(base, deltas, weights, consensus=consensus, normalize=normalize,
                   lambda_=lambda_, out_dtype=out_dtype or dtype)
