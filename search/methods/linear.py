"""linear: Σ w_i·x_i (÷ Σ w_i when normalize), the model soup (Wortsman et al., 2022).

Op order (the fused kernel gives the same bits): `w = tensor(weights, fp32)`; `acc = zeros(fp32)`;
for each i in order `acc.addcmul_(x_i, w[i])` (one fused multiply-add per element: a single
rounding, not `acc + x*w`); if normalize `acc.div_(w.reshape(1, n).sum(dim=1))`; round once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import (
    FlatInputs, Kernel, MergeInputs, MethodSpec, Param, check_normalizable, out_dtype_of, same_shape,
)


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True,
           out_dtype: torch.dtype | None = None) -> Tensor:
    """Σ w_i·x_i (÷ Σ w_i when normalize), fp32 fused multiply-adds in input order, one rounding."""
    if len(tensors) != len(weights) or not tensors:
        raise MergeSearchError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    same_shape(tensors, "linear")
    if normalize:
        check_normalizable(weights, "linear")
    w = torch.tensor(list(map(float, weights)), dtype=torch.float32, device=tensors[0].device)
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for x, wi in zip(tensors, w.unbind(0)):
        acc.addcmul_(x, wi)  # x may be half precision: the FMA promotes it to fp32 exactly
    if normalize:
        acc.div_(w.reshape(1, -1).sum(dim=1))
    return acc.to(out_dtype_of(tensors, out_dtype))


def _merge(inp: MergeInputs) -> Tensor:
    return linear(inp.tensors, inp.per_model("weight"), normalize=inp.shared["normalize"], out_dtype=inp.out_dtype)


def _kernel(xs: tuple[Tensor, ...], w: Tensor, divisor: Tensor | None, out: Tensor) -> None:
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for i in range(len(xs)):
        acc.addcmul_(xs[i], w[i])
    if divisor is not None:
        acc.div_(divisor)
    out.copy_(acc)


def _args(f: FlatInputs) -> tuple:
    divisor = f.weights.reshape(1, -1).sum(dim=1) if f.recipe.shared["normalize"] else None  # eager, as linear()
    return (f.members, f.weights, divisor)


def _probe(xs: tuple[Tensor, ...], device: torch.device) -> tuple:
    w = torch.tensor([0.31, 0.27, 0.55], device=device)
    return (xs, w, w.reshape(1, -1).sum(dim=1))


SPEC = MethodSpec(
    name="linear", merge=_merge, needs_base=False, min_models=1, max_models=None,
    model_params={"weight": Param(float, search="weight")},
    shared_params={"normalize": Param(bool, True)},
    # the reference uses fused multiply-adds, so the compiled form must contract a + b*c too
    kernel=Kernel(_kernel, _args, _probe, compile_options={"cpp.enable_floating_point_contract_flag": "fast"}),
    reference="https://arxiv.org/abs/2203.05482",
)
