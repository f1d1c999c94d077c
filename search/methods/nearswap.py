"""nearswap: take the other model where it is near the base, and move at most t towards it elsewhere.

Per element, with a the base and b the other model: w = clamp(t / max(|a - b|, 1e-6), 0, 1),
out = w·b + (1 - w)·a. In closed form (t >= 0) that is a + clamp(b - a, -t, t): where the models
differ by at most t the result is b, elsewhere a moved by t towards b; t = 0 gives the base.
So t is an absolute distance, on the scale of the task vector b - a (fine-tunes of LLMs differ by
~1e-4 to 1e-3 per weight): a search draws t in [0, 1e-3] per cell (set `merge.ranges.t` for
other scales), and the baselines are the base alone (t = 0) and t = 1e-4, the setting of the
method's reference merge. In a run config the first model is the base (as for slerp).

Op order (mergekit 0.1.5's bits in fp32): d = a - b; den = |d|.clamp(min=1e-6);
w = den.reciprocal() * t (this is what torch computes for `float / tensor`, not a true
division: they differ in ~30% of elements); w.clamp(0, 1); out = w*b + (1 - w)*a, two
products and a sum, no fused multiply-add; round once to the output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from search.methods.base import FlatInputs, Kernel, MergeInputs, MethodSpec, Param, out_dtype_of, same_shape

NEARSWAP_EPS = 1e-6  # |a - b| below this counts as this (mergekit's clamp)
REFERENCE_T = 1e-4  # the t of the method's reference merge (QuartetAnemoi-70B-t0.0001)


def _blend(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """The fp32 op order of the module doc; a, b already fp32 (t: float or fp32 0-d tensor, same bits)."""
    w = (a - b).abs().clamp(min=NEARSWAP_EPS).reciprocal().mul(t).clamp(0, 1)
    return w * b + (1 - w) * a


def nearswap(base: Tensor, other: Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """`base` where t = 0, `other` wherever |other - base| <= t, else base moved by t towards other.

    Elementwise over same-shape tensors; fp32 math, one rounding to `out_dtype` (default: the
    promoted input dtype).
    """
    same_shape([base, other], "nearswap")
    dtype = out_dtype_of([base, other], out_dtype)
    return _blend(base.to(torch.float32), other.to(torch.float32), float(t)).to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return nearswap(inp.base, inp.tensors[0], inp.shared["t"], out_dtype=inp.out_dtype)


def _kernel(a: Tensor, b: Tensor, t: Tensor, out: Tensor) -> None:
    # elementwise, so one call covers a run of tensors; t is a device tensor so that a compiled
    # kernel is not specialised (recompiled) per trial value
    out.copy_(_blend(a.float(), b.float(), t))


def _args(f: FlatInputs) -> tuple:
    t = torch.tensor(float(f.recipe.shared["t"]), dtype=torch.float32, device=f.base.device)
    return (f.base, f.members[0], t)


def _probe(xs: tuple[Tensor, ...], device: torch.device) -> tuple:
    # a near copy of xs[0], so that every branch (swap, partial, keep) is met at t = 0.05
    return (xs[0], xs[0] + 0.1 * xs[1], torch.tensor(0.05, device=device))


def _baselines(names):
    """The base alone (t = 0), then the reference merge's t."""
    return [(names[0], {"t": [0.0]}), (f"t={REFERENCE_T:g}", {"t": [REFERENCE_T]})]


SPEC = MethodSpec(
    name="nearswap", merge=_merge, needs_base=True, base_is_first_model=True, min_models=2, max_models=2,
    model_params={}, shared_params={"t": Param(float, search=(0.0, 1e-3), neutral=REFERENCE_T)},
    kernel=Kernel(_kernel, _args, _probe), baselines=_baselines,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
