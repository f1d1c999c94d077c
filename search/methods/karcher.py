"""karcher: the Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by
their mean norm (mergekit's Karcher Mean; parameter-free: every model weighs 1/n).

mergekit 0.1.5's semantics, our op order (fp32 scalars as 0-dim tensors, one rounding at the
end): r_i = ‖x_i‖, u_i = x_i / r_i (0 where r_i = 0); the models with r_i > tol take part, with
weights a_i = (1/n) / Σ_valid (1/n) (Python floats); m = Σ a_i·u_i (multiply, then add, in
order), m /= ‖m‖ (or m = the first valid u when ‖m‖ < tol). Then up to `max_iter` times: for
each valid i, c = clamp(u_i·m, -1, 1) by `torch.dot`, θ = acos c, skipped when θ < tol, and
g += (a_i·(θ / sin θ))·(u_i - c·m); stop when ‖g‖ < tol; else m = cos‖g‖·m + sin‖g‖·(g/‖g‖),
renormalized when its norm is above tol. The result is (Σ_i (1/n)·r_i)·m over every model; zeros
when no model has a norm above tol. One model is returned as it is. A base_model is one more
input, as mergekit (whose karcher ignores the base role) merges it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param, out_dtype_of, same_shape


def karcher(tensors: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5,
            out_dtype: torch.dtype | None = None) -> Tensor:
    """The equally weighted Karcher mean of `tensors` on the sphere, times their mean norm (fp32)."""
    if not tensors:
        raise MergeSearchError("karcher: no tensors to merge")
    if max_iter < 0 or tol < 0:
        raise MergeSearchError(f"karcher: max_iter and tol must be >= 0 but got {max_iter} and {tol}")
    same_shape(tensors, "karcher")
    dtype = out_dtype_of(tensors, out_dtype)
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    xs = [t.float() for t in tensors]
    alpha = 1.0 / len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if r.item() == 0.0 else x / r for x, r in zip(xs, norms)]
    valid = [u for u, r in zip(units, norms) if r.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0]).to(dtype)
    total = 0.0
    for _ in valid:
        total += alpha
    share = alpha / total

    mean = torch.zeros_like(valid[0])
    for u in valid:
        mean += share * u
    length = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if length.item() < tol else mean / length
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u in valid:
            cos = torch.dot(mean.reshape(-1), u.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue  # u is (numerically) the mean: no pull
            step += share * (theta / torch.sin(theta)) * (u - cos * mean)  # log map of u at mean
        size = torch.linalg.vector_norm(step)
        if size.item() < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * (step / size)  # exp map
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    scale = 0
    for r in norms:
        scale = scale + alpha * r
    return (scale * mean).to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return karcher(inp.tensors, max_iter=int(inp.shared["max_iter"]), tol=float(inp.shared["tol"]),
                   out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="karcher", merge=_merge, needs_base=False, min_models=1, max_models=None,
    model_params={}, shared_params={"max_iter": Param(int, 10), "tol": Param(float, 1e-5)},
    reference="https://arxiv.org/abs/2603.04972",
)
