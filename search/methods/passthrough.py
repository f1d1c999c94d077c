"""passthrough: one model's tensor as it is, or times its `scale`; what `slices:` configs stack.

    slices:
      - sources: [{model: m0, layer_range: [0, 2]}]
      - sources: [{model: m1, layer_range: [2, 4]}]
    merge_method: passthrough

Each tensor has exactly one input (mergekit's contract: a base_model is ignored, a second model
is an error). scale (per model, default None: no scaling) may be a gradient or a filter list like
any parameter. Op order: x in fp32, `x * scale` when a scale is set (one product, mergekit's
bits in fp32), one rounding to the output dtype. Nothing to search: a study cannot use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from search.methods.base import MergeInputs, MethodSpec, Param, out_dtype_of


def passthrough(x: Tensor, scale: float | None = None, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """`x` (scale None) or `x * scale`, computed in fp32 and rounded once to `out_dtype`
    (default: x's dtype)."""
    dtype = out_dtype_of([x], out_dtype)
    wide = x.to(torch.float32)
    out = wide if scale is None else wide * float(scale)
    return out.to(dtype, copy=out is x)  # a new tensor, never the input itself


def _merge(inp: MergeInputs) -> Tensor:
    return passthrough(inp.tensors[0], inp.params[0].get("scale"), out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="passthrough", merge=_merge, needs_base=False, min_models=1, max_models=1,
    model_params={"scale": Param(float, None)}, shared_params={},
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough-passthrough",
)
