"""multislerp: barycentric interpolation of N models on the hypersphere (mergekit's Multi-SLERP).

mergekit 0.1.5's semantics, our op order (fp32 throughout, one rounding at the end): X = the
stacked inputs, flat [n, numel] (minus the base, when there is one); w = fp32 weights, / Σ w when
`normalize_weights`; r_i = ‖X_i‖; U = X / (r + eps); m = Σ_i w_i·U_i; if ‖m‖ < eps, two inputs
fall back to w₀·X₀ + w₁·X₁ and more are an error; else m /= ‖m‖; the tangent vectors T_i =
U_i - (U_i·m)·m; τ = Σ_i w_i·T_i; ‖τ‖ + eps = s; out = (m·cos s + τ·(sin s / s))·Σ_i w_i·r_i,
+ base. One input is returned as it is. mergekit computes in the load dtype (bf16 in bf16), we in
fp32, so the two agree bit for bit in fp32. Unlike mergekit (which divides by zero), weights that
sum to ~0 with `normalize_weights` are refused.

The base form is implemented (`base=`, bit for bit with mergekit) but a config cannot select it
yet: `MethodSpec.needs_base` is a bool and mergekit's base here is optional, so `merge_inputs`
hands no base (an unlisted base_model is refused; a listed one is merged as a member).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param, check_normalizable, out_dtype_of, same_shape


def multislerp(tensors: Sequence[Tensor], weights: Sequence[float], *, base: Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8, out_dtype: torch.dtype | None = None) -> Tensor:
    """Weighted spherical mean of `tensors` (each one flat vector), scaled by the weighted mean norm.

    base: interpolate the task vectors x_i - base and add the base back. MergeSearchError when
    the weighted mean of the unit vectors vanishes for three or more inputs (antipodal sets).
    """
    if len(tensors) != len(weights) or not tensors:
        raise MergeSearchError(f"multislerp: {len(tensors)} tensors but {len(weights)} weights")
    same_shape(list(tensors) if base is None else [*tensors, base], "multislerp")
    dtype = out_dtype_of(list(tensors) if base is None else [*tensors, base], out_dtype)
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    if normalize_weights:
        check_normalizable(weights, "multislerp")
    shape = tensors[0].shape
    x = torch.stack([t.float() for t in tensors])
    if base is not None:
        x -= base.float()
    flat = x.reshape(len(tensors), -1)
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    col = w.reshape(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * col).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeSearchError(f"multislerp: the weighted mean of the {len(tensors)} unit vectors is ~0 "
                                   f"(antipodal inputs whose weights {list(weights)} balance out); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).reshape(shape)  # two antipodal inputs: linear
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
        tangent = (tangents * col).sum(dim=0)
        step = torch.linalg.vector_norm(tangent) + eps
        out = mean * torch.cos(step) + tangent * (torch.sin(step) / step)  # the exponential map at mean
        out = (out * (norms.squeeze(-1) * w).sum()).reshape(shape)
    if base is not None:
        out = out + base.float()
    return out.to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return multislerp(inp.tensors, inp.per_model("weight"), base=inp.base,
                      normalize_weights=bool(inp.shared["normalize_weights"]), eps=float(inp.shared["eps"]),
                      out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="multislerp", merge=_merge, needs_base=False, min_models=1, max_models=None,
    # with normalize_weights only the weights' direction matters: n in merge.weight_range search n-1
    model_params={"weight": Param(float, search="weight")},
    shared_params={"normalize_weights": Param(bool, True), "eps": Param(float, 1e-8)},
    weights_scale_free=True, base_unsupported=True,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
