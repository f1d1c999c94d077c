"""breadcrumbs_ties: Model Breadcrumbs' two-sided magnitude trim, then TIES' sign election and
disjoint mean (Davari & Belilovsky, 2023).

The trim (and its optional l1 rescale) is breadcrumbs' (see breadcrumbs.py for mergekit's window
and the cached ascending rank); then as ties: `d.mul_(w)`; majority = sign of `d.sum(dim=0)`
(0 counts as +); agree = `d.sign() == majority`; `mixed = (d·agree).sum(dim=0)`, divisor
`(w·agree).sum(dim=0)` with 0 -> 1; if normalize `mixed /= divisor`; if λ != 1 `mixed *= λ`;
`base + mixed`; round once. mergekit's defaults: normalize false, rescale false.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import Kernel, MergeInputs, MethodSpec
from search.methods.breadcrumbs import (
    GAMMA, cache_when, fused, kernel_args, kernel_probe, precompute, trimmed_sum,
)
from search.methods.taskvec import DENSITY, WEIGHT, shared_params


def breadcrumbs_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                     densities: Sequence[float], gammas: Sequence[float], *, normalize: bool = False,
                     lambda_: float = 1.0, rescale: bool = False, ranks: Sequence[Tensor | None] | None = None,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """Breadcrumbs' trim, then TIES' sign election. ranks: optional `outlier_rank(x_i - base)` per model."""
    return trimmed_sum("breadcrumbs_ties", True, base, tensors, weights, densities, gammas, normalize=normalize,
                       lambda_=lambda_, rescale=rescale, ranks=ranks, out_dtype=out_dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return breadcrumbs_ties(inp.base, inp.tensors, inp.per_model("weight"), inp.per_model("density"),
                            inp.per_model("gamma"), normalize=inp.shared["normalize"], lambda_=inp.shared["lambda"],
                            rescale=inp.shared["rescale"], ranks=inp.cache, out_dtype=inp.out_dtype)


def _kernel(xs, base, ranks, windows, w, normalize, divisor, lam, out) -> None:
    # one top-level function per method: torch.compile keeps its compiled variants per function
    fused(xs, base, ranks, windows, w, True, normalize, divisor, lam, out)


SPEC = MethodSpec(
    name="breadcrumbs_ties", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA},
    shared_params=shared_params(normalize=False, rescale=False),
    kernel=Kernel(_kernel, kernel_args(True), kernel_probe(True), runs=False),
    precompute=precompute, cache_when=cache_when,
    reference="https://arxiv.org/abs/2312.06795",
)
