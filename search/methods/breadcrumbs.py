"""breadcrumbs: trim each task vector at both ends of its magnitude order, then add (Davari &
Belilovsky, 2023, "Model Breadcrumbs").

mergekit's `magnitude_outliers` sparsification, per model with n = numel: when density >= 1 the
task vector is left whole (gamma ignored, no rescale); else keep = int(density·n), top =
int(gamma·n), bottom = max(0, n - keep - top), and the kept elements are positions [bottom,
bottom + keep) of `torch.sort(|d_i|.float(), descending=False)` (mergekit's order, ties
included): the `bottom` smallest and the `top` largest ("outliers") are dropped, the outlier cut
shrinking where keep + top > n. No max(1, ·): a tiny density keeps nothing. If rescale,
`kept·(|d_i|₁/|kept|₁)`. Then as task_arithmetic: `d.mul_(w)`; `mixed = d.sum(dim=0)`; if
normalize `mixed /= Σw` (~0 -> 1); if λ != 1 `mixed *= λ`; `base + mixed`; round once.
breadcrumbs_ties (breadcrumbs_ties.py) elects signs instead of the plain sum, as ties does.

The ascending magnitude rank depends only on the sources: the in-memory merger computes it once
per tensor and model (`precompute`, int32: 4 bytes per element and model, int64 past 2**31), so
a trial at any density and gamma is two comparisons, not a sort. It is not TIES' rank reversed:
the two sorts order equal magnitudes differently, and which tied element is kept must match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import FlatInputs, Kernel, MergeInputs, MethodSpec, Param, weight_divisor
from search.methods.taskvec import DENSITY, WEIGHT, combine, rescaled, shared_params, task_vectors

# mergekit's default; searched over [0, 0.1]; 0 (no outliers cut) in the baselines, where density is 1 anyway
GAMMA = Param(float, default=0.01, search=(0.0, 0.1), neutral=0.0)


def outlier_rank(delta: Tensor) -> Tensor:
    """Rank of each element of `delta` by |delta|, 0 = smallest, flat, int32 (int64 past 2**31).

    The order is `torch.sort(|delta|.float(), descending=False)`, exactly mergekit's, ties
    included; breadcrumbs' mask for any (density, gamma) is then `lo <= rank < hi`, see `window`.
    """
    order = torch.sort(delta.detach().abs().reshape(-1).float(), descending=False).indices
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    rank = torch.empty(order.numel(), dtype=dtype, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return rank


def window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """[lo, hi): the ascending magnitude ranks breadcrumbs keeps (density < 1)."""
    keep, top = int(density * numel), int(gamma * numel)
    lo = max(0, numel - keep - top)
    return lo, lo + keep


def check_gamma(gamma: float, method: str) -> None:
    if not (isinstance(gamma, (int, float)) and 0 <= gamma <= 1):
        raise MergeSearchError(f"{method}: gamma must be in [0, 1] but got {gamma!r}")


def trimmed_sum(method: str, consensus: bool, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                densities: Sequence[float], gammas: Sequence[float], *, normalize: bool, lambda_: float,
                rescale: bool, ranks: Sequence[Tensor | None] | None, out_dtype: torch.dtype | None) -> Tensor:
    """Trim every task vector to its breadcrumbs window, optionally l1-rescale, then sum
    (consensus=False) or sign-elect (True). ranks: optional `outlier_rank(x_i - base)` per model."""
    if len(gammas) != len(tensors):
        raise MergeSearchError(f"{method}: {len(tensors)} tensors, {len(gammas)} gammas")
    for g in gammas:
        check_gamma(g, method)
    deltas, dtype = task_vectors(method, base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    for i, (density, gamma) in enumerate(zip(densities, gammas)):
        if density >= 1:
            continue
        rank = ranks[i] if ranks is not None and ranks[i] is not None else outlier_rank(deltas[i])
        lo, hi = window(deltas[i].numel(), density, gamma)
        keep = ((rank >= lo) & (rank < hi)).reshape(deltas[i].shape)
        kept = deltas[i] * keep
        deltas[i] = rescaled(deltas[i], kept) if rescale else kept
    return combine(base, deltas, weights, consensus=consensus, normalize=normalize,
                   lambda_=lambda_, out_dtype=out_dtype or dtype)


def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                gammas: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0, rescale: bool = False,
                ranks: Sequence[Tensor | None] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Model Breadcrumbs on one tensor: drop each task vector's smallest and `gamma` largest
    elements (keeping `density` of them), then add."""
    return trimmed_sum("breadcrumbs", False, base, tensors, weights, densities, gammas, normalize=normalize,
                       lambda_=lambda_, rescale=rescale, ranks=ranks, out_dtype=out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return breadcrumbs(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                       inp.per_model("gamma"), normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"],
                       rescale=inp.shared["rescale"], ranks=inp.cache, out_dtype=inp.out_dtype)


def precompute(base: Tensor, x: Tensor) -> Tensor:
    return outlier_rank(x.float() - base.float())


def cache_when(params) -> bool:
    return params.get("density", 1.0) < 1  # density 1 trims nothing, whatever gamma


# --- the fused in-memory kernel, shared with breadcrumbs_ties ------------------------------

def fused(xs: tuple[Tensor, ...], base: Tensor, ranks: tuple[Tensor | None, ...],
          windows: tuple[tuple[int, int] | None, ...], w: Tensor, consensus: bool, normalize: bool,
          divisor: Tensor | None, lam: float, out: Tensor) -> None:
    """breadcrumbs (no rescale) on one tensor, flat: trim by cached rank, then the sum or TIES'
    election, in the tensor function's op order. divisor: Σw (consensus=False, normalize)."""
    b = base.float()
    ds = []
    for i in range(len(xs)):
        d = xs[i].float() - b
        if windows[i] is not None:
            d = d * ((ranks[i] >= windows[i][0]) & (ranks[i] < windows[i][1]))
        ds.append(d * w[i])
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    if consensus:
        majority = (total >= 0).to(torch.float32) * 2 - 1
        mixed, share = None, None
        for i in range(len(ds)):
            agree = ds[i].sign() == majority
            term, part = ds[i] * agree, w[i] * agree
            mixed = term if mixed is None else mixed + term
            share = part if share is None else share + part
        if normalize:
            mixed = mixed / torch.where(share == 0, torch.ones_like(share), share)
    else:
        mixed = total
        if normalize:
            mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    out.copy_(b + mixed)


def _kernel(xs, base, ranks, windows, w, normalize, divisor, lam, out) -> None:
    # one top-level function per method: torch.compile keeps its compiled variants per function
    fused(xs, base, ranks, windows, w, False, normalize, divisor, lam, out)


def kernel_args(consensus: bool):
    """The Kernel's `args` for breadcrumbs (consensus=False) or breadcrumbs_ties (True): None
    where the kernel does not apply (rescale; a trimmed member without its cached rank)."""

    def args(f: FlatInputs) -> tuple | None:
        if f.recipe.shared["rescale"]:
            return None  # the l1 rescale needs whole-tensor norms: the tensor function
        for p in f.member_params:
            check_gamma(p["gamma"], f.recipe.method)
        windows = tuple(None if p["density"] >= 1 else window(f.numel, p["density"], p["gamma"])
                        for p in f.member_params)
        if f.cache is None or any(wd is not None and r is None for wd, r in zip(windows, f.cache)):
            return None
        normalize = bool(f.recipe.shared["normalize"])
        divisor = weight_divisor(f.weights) if normalize and not consensus else None
        return (f.members, f.base, tuple(f.cache), windows, f.weights, normalize, divisor,
                float(f.recipe.shared["lambda"]))

    return args


def kernel_probe(consensus: bool):
    def probe(xs: tuple[Tensor, ...], device: torch.device) -> tuple:
        rank = outlier_rank(xs[1].float() - xs[0].float())
        w = torch.tensor([0.31, 0.27], device=device)
        return (xs[1:], xs[0], (rank, None), ((30_000, 70_000), None), w, True,
                None if consensus else weight_divisor(w), 0.7)

    return probe


SPEC = MethodSpec(
    name="breadcrumbs", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA},
    shared_params=shared_params(normalize=False, rescale=False),
    kernel=Kernel(_kernel, kernel_args(False), kernel_probe(False), runs=False),
    precompute=precompute, cache_when=cache_when,
    reference="https://arxiv.org/abs/2312.06795",
)
