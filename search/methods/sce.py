"""sce: select the elements where the task vectors vary most, calculate per-model weights from
their energy, erase the minority signs, then take the weighted disjoint mean (Wan et al., 2024,
FuseChat). No per-model weights: the weights come from the task vectors themselves.

Op order (mergekit 0.1.5's bits in fp32): d_i = x_i.float() - base.float(), stacked [n, *shape].
Select, if select_topk < 1: v = `torch.var(d, dim=0, unbiased=False)`; k = int(count_nonzero(v) ·
select_topk), an fp32 product as mergekit's (it differs from the exact one past 2**24 nonzeros);
keep the k largest v (k = 0 or select_topk <= 0: none), `d.mul_(keep)`. Calculate: w_i =
mean(d_i²) over the tensor, w = w / Σw (Σw as a Python float; below 1e-6: w = 1/n each). Erase:
majority = sign of d.sum(dim=0) (0 counts as +), agree = `d.sign() == majority`. Then e =
w_i·agree, out = base + (d·e).sum(dim=0) / e.sum(dim=0).clamp(min=1e-6); round once.

Ties in v: we keep the tied elements of lowest flat index first. mergekit keeps torch.topk's
choice, which torch leaves unspecified (it differs between CPU and CUDA); both keep the same
number of elements and the same variances, so the outputs differ only where the k-th largest
variance is tied (never, in practice, for fp32 sources; often for bf16 ones).

What a cache could hold: the selection depends only on the task vectors, through the variance
over all members jointly, so its rank (`variance_rank`, int32: 4 bytes per element and tensor,
once for all members) makes a trial's selection at any select_topk a comparison instead of a var
and a top-k. `MethodSpec.precompute` is per member (base, x) and cannot see the other members,
so it goes through `precompute_group`: the in-memory merger computes the rank once per tensor
and hands it to `sce(..., ranks=...)` as the group cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param
from search.methods.taskvec import task_vectors

SCE_EPS = 1e-6  # Σw below this: equal weights; the erased weights' sum is clamped to it


def select_count(nonzero: int, select_topk: float) -> int:
    """How many elements the selection keeps: int(nonzero · select_topk) in fp32, as mergekit."""
    return int(torch.tensor(float(nonzero), dtype=torch.float32) * select_topk)


def variance_rank(deltas: Tensor) -> tuple[Tensor, int]:
    """(rank of each element of the [n, *shape] task vectors by their variance across the n
    models, flat int32, 0 = largest, ties lowest index first; the count of nonzero variances).
    The selection at any select_topk is then `rank < select_count(nonzero, select_topk)`."""
    v = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
    order = torch.argsort(v, descending=True, stable=True)
    dtype = torch.int32 if v.numel() < 2**31 else torch.int64
    rank = torch.empty(v.numel(), dtype=dtype, device=v.device)
    rank[order] = torch.arange(v.numel(), dtype=dtype, device=v.device)
    return rank, int(torch.count_nonzero(v))


def select_mask(deltas: Tensor, select_topk: float, ranks: tuple[Tensor, int] | None = None) -> Tensor:
    """SCE's selection over [n, *shape] task vectors: bool [*shape], the select_count elements of
    largest variance across models (ties lowest index first; see the module doc)."""
    shape = deltas.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas.device)
    if ranks is not None:
        rank, nonzero = ranks
        return (rank < select_count(nonzero, select_topk)).reshape(shape)
    v = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
    k = select_count(int(torch.count_nonzero(v)), select_topk)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas.device)
    kth = torch.topk(v, k, sorted=False).values.min()  # the k-th largest variance (unique)
    above, tied = v > kth, v == kth
    keep = above | (tied & (tied.cumsum(0) <= k - above.sum()))  # the first tied ones fill up to k
    return keep.reshape(shape)


def sce(base: Tensor, tensors: Sequence[Tensor], select_topk: float = 1.0, *,
        ranks: tuple[Tensor, int] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """SCE on one tensor (see the module doc). ranks: optional `variance_rank` of the task
    vectors, precomputed (it depends only on the sources)."""
    if not isinstance(select_topk, (int, float)) or math.isnan(select_topk):
        raise MergeSearchError(f"sce: select_topk must be a number but got {select_topk!r}")
    n = len(tensors)
    deltas, dtype = task_vectors("sce", base, tensors, [1.0] * n, None, False)
    dtype = out_dtype or dtype
    if not tensors:
        return base.to(dtype)
    if select_topk < 1:
        deltas.mul_(select_mask(deltas, select_topk, ranks))
    majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
    agree = deltas.sign() == majority
    w = deltas.square().reshape(n, -1).mean(dim=1)
    total = w.sum().item()
    w = torch.ones_like(w) / n if abs(total) < SCE_EPS else w / total
    erased = w.reshape(n, *([1] * (deltas.dim() - 1))) * agree
    mixed = (deltas * erased).sum(dim=0)
    return (base.float() + mixed / erased.sum(dim=0).clamp(min=SCE_EPS)).to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return sce(inp.base, inp.tensors, float(inp.shared["select_topk"]), ranks=inp.group_cache, out_dtype=inp.out_dtype)


def _precompute_group(base: Tensor, tensors: Sequence[Tensor]) -> tuple[Tensor, int]:
    deltas, _ = task_vectors("sce", base, tensors, [1.0] * len(tensors), None, False)
    return variance_rank(deltas)


def _group_cache_when(shared) -> bool:
    return float(shared.get("select_topk", 1.0)) < 1  # select_topk 1 selects everything


def _baselines(names):
    """No per-model weights, so no source alone: SCE without selection (select_topk 1)."""
    return [("select_topk=1", {"select_topk": [1.0]})]


SPEC = MethodSpec(
    name="sce", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={}, precompute_group=_precompute_group, group_cache_when=_group_cache_when,
    shared_params={"select_topk": Param(float, 1.0, search=(0.1, 1.0), neutral=1.0),
                   "int8_mask": Param(bool, False)},  # the mask's dtype in mergekit: no effect on values
    baselines=_baselines,
    reference="https://arxiv.org/abs/2408.07990",
)
