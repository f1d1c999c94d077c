"""nuslerp: spherical interpolation between two models at t = w₁/(w₀+w₁), over the whole tensor,
per row or per column; with a base, between the two task vectors (mergekit's NuSLERP).

mergekit 0.1.5's semantics: t = w₁/(w₀+w₁) in Python floats (0.5 when |w₀+w₁| < 1e-6). The
vectors are v_i = x_i (no base) or x_i - base; with `nuslerp_flatten` (the default) each is one
flat vector, else its last dim is the sphere (`nuslerp_row_wise`: dim 0, by transposing it last).
Our op order, every step in fp32: u_i = v_i / max(‖v_i‖, 1e-7) along the last dim; cos =
Σ u₀·u₁ (clamped to [-1, 1]); where 1 - cos² <= 1e-16 (parallel or antipodal) the result is
(1-t)·v₀ + t·v₁, elsewhere (sin((1-t)θ)·v₀ + sin(tθ)·v₁) / sin θ with θ = acos(cos); then
transposed back, + base, rounded once. mergekit computes in the load dtype (bf16 in bf16); we in
fp32, so the two agree bit for bit in fp32.

The base form is implemented (`base=`, bit for bit with mergekit) but a config cannot select it
yet: `MethodSpec.needs_base` is a bool and mergekit's base here is optional, so `merge_inputs`
hands no base (an unlisted base_model is refused; a listed one is merged as a member).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param, out_dtype_of, same_shape

NUSLERP_NORM_EPS = 1e-7  # norms are clamped to at least this before dividing
NUSLERP_EPS = 1e-8  # vectors count as colinear when 1 - cos² <= NUSLERP_EPS²
NUSLERP_ZERO_TOTAL = 1e-6  # |w₀ + w₁| below this: t = 0.5


def nuslerp_t(weights: Sequence[float]) -> float:
    """The interpolation position of weights (w₀, w₁): w₁/(w₀+w₁), 0.5 when they sum to ~0."""
    w0, w1 = (float(w) for w in weights)
    total = w0 + w1
    return 0.5 if abs(total) < NUSLERP_ZERO_TOTAL else w1 / total


def nuslerp(a: Tensor, b: Tensor, weights: Sequence[float], *, base: Tensor | None = None,
            flatten: bool = True, row_wise: bool = False, out_dtype: torch.dtype | None = None) -> Tensor:
    """Slerp from `a` (t=0) to `b` (t=1) at t = nuslerp_t(weights), fp32, rounded once.

    base: interpolate the task vectors a - base, b - base and add the base back. flatten: one
    sphere over the whole tensor; else one per row (last dim), or per column when row_wise.
    """
    if len(weights) != 2:
        raise MergeSearchError(f"nuslerp: needs exactly 2 weights but got {len(weights)}")
    same_shape([a, b] if base is None else [a, b, base], "nuslerp")
    dtype = out_dtype_of([a, b] if base is None else [a, b, base], out_dtype)
    t = nuslerp_t(weights)
    v0, v1 = a.float(), b.float()
    if base is not None:
        v0, v1 = v0 - base.float(), v1 - base.float()
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # acos(0): keeps the unused branch finite
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    if base is not None:
        out = base.float() + out
    return out.to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    a, b = inp.tensors
    return nuslerp(a, b, inp.per_model("weight"), base=inp.base, flatten=bool(inp.shared["nuslerp_flatten"]),
                   row_wise=bool(inp.shared["nuslerp_row_wise"]), out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="nuslerp", merge=_merge, needs_base=False, min_models=2, max_models=2,
    # only w₁/(w₀+w₁) matters: two weights in merge.weight_range search one position
    model_params={"weight": Param(float, search="weight")},
    shared_params={"nuslerp_row_wise": Param(bool, False), "nuslerp_flatten": Param(bool, True)},
    weights_scale_free=True, base_unsupported=True,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
)
