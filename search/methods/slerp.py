"""slerp: spherical interpolation between two models, from the base (t=0) to the other (t=1).

mergekit's chunked fp32 numerics: norms and the dot product over chunks of 2**20 elements,
linear interpolation when |cos θ| > 0.9995. In a run config the first model is the base (the
t=0 end); a search draws t in [0, 1] per cell, and the baselines are t = 0, 1 and 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from search.methods.base import MergeInputs, MethodSpec, Param, out_dtype_of, same_shape

SLERP_CHUNK = 1 << 20  # mergekit's chunk for slerp's norms and dot product (one output per call)
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: vectors nearly parallel, interpolate linearly
SLERP_EPS = 1e-8


def slerp(base: Tensor, other: Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """Spherical interpolation from `base` (t=0) to `other` (t=1), over the whole tensor.

    Falls back to (1-t)·base + t·other when |cos θ| > 0.9995 (nearly parallel or antipodal).
    Norms below 1e-8 count as 1, as in mergekit.
    """
    same_shape([base, other], "slerp")
    dtype = out_dtype_of([base, other], out_dtype)
    a, b = base.reshape(1, -1), other.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=torch.float32, device=a.device).reshape(-1, 1)
    n = a.shape[1]
    if n == 0:
        return base.to(dtype)
    starts = range(0, n, SLERP_CHUNK)

    def chunk(x: Tensor, s: int) -> Tensor:
        return x[:, s:s + SLERP_CHUNK].to(torch.float32)

    def norm(x: Tensor) -> Tensor:
        parts = torch.stack([torch.linalg.vector_norm(chunk(x, s), dim=1, keepdim=True) for s in starts])
        total = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(total > SLERP_EPS, total, 1)

    norm_a, norm_b = norm(a), norm(b)
    dots = [((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True) for s in starts]
    cos = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    lin = cos.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(lin, 0, cos))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a, dtype=dtype)
    for s in starts:
        out[:, s:s + SLERP_CHUNK] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
    return out.reshape(base.shape)


def _merge(inp: MergeInputs) -> Tensor:
    return slerp(inp.base, inp.tensors[0], inp.shared["t"], out_dtype=inp.out_dtype)


def _baselines(names):
    """Each end alone (t = 0, t = 1), then the midpoint."""
    return [(names[0], {"t": [0.0]}), (names[1], {"t": [1.0]}), ("uniform", {"t": [0.5]})]


SPEC = MethodSpec(
    name="slerp", merge=_merge, needs_base=True, base_is_first_model=True, min_models=2, max_models=2,
    model_params={}, shared_params={"t": Param(float, search=(0.0, 1.0))}, baselines=_baselines,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
