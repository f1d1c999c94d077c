"""task_arithmetic: base + λ·Σ w_i·(x_i − base) (÷ Σ w_i when normalize) (Ilharco et al., 2023).

Op order: `d_i = x_i.float() - base.float()` stacked as `[n, *shape]`; `d.mul_(w)`; `mixed =
d.sum(dim=0)`; if normalize `mixed /= w.sum()` (~0 -> 1); if λ != 1 `mixed *= λ`; `base + mixed`;
round once. mergekit's common parameters density and rescale are accepted and sparsify nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.methods.base import FlatInputs, Kernel, MergeInputs, MethodSpec, Param, weight_divisor
from search.methods.taskvec import WEIGHT, combine, shared_params, task_vectors


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lambda_: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """base + λ·Σ w_i·(x_i − base) (÷ Σ w_i when normalize)."""
    deltas, dtype = task_vectors("task_arithmetic", base, tensors, weights, None, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    return combine(base, deltas, weights, consensus=False, normalize=normalize,
                   lambda_=lambda_, out_dtype=out_dtype or dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return task_arithmetic(inp.base, inp.tensors, inp.per_model("weight"), normalize=inp.shared["normalize"],
                           lambda_=inp.shared["lambda"], out_dtype=inp.out_dtype)


def _kernel(xs: tuple[Tensor, ...], base: Tensor, w: Tensor, divisor: Tensor | None, lam: float,
            out: Tensor) -> None:
    b = base.float()
    mixed = (xs[0].float() - b) * w[0]
    for i in range(1, len(xs)):
        mixed = mixed + (xs[i].float() - b) * w[i]
    if divisor is not None:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    out.copy_(b + mixed)


def _args(f: FlatInputs) -> tuple:
    divisor = weight_divisor(f.weights) if f.recipe.shared["normalize"] else None
    return (f.members, f.base, f.weights, divisor, float(f.recipe.shared["lambda"]))


def _probe(xs: tuple[Tensor, ...], device: torch.device) -> tuple:
    w = torch.tensor([0.31, 0.27], device=device)
    return (xs[1:], xs[0], w, weight_divisor(w), 0.7)


SPEC = MethodSpec(
    name="task_arithmetic", merge=_merge, needs_base=True, min_models=1, max_models=None,
    model_params={"weight": WEIGHT, "density": Param(float, 1.0)},  # density: accepted, never searched
    shared_params=shared_params(normalize=False, rescale=False),
    # the reference rounds every product, so the compiled form must not contract
    kernel=Kernel(_kernel, _args, _probe),
    reference="https://arxiv.org/abs/2212.04089",
)
