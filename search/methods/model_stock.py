"""model_stock: move from the base towards the models' average by a ratio set by the angle
between their task vectors (Jang et al., 2024, "Model Stock"). Parameter-free: in a study it is a
baseline row, never searched.

With N models and θ the mean pairwise angle between the task vectors d_i = x_i - base:
t = N·cos θ / (1 + (N-1)·cos θ), out = t·mean(x_i) + (1-t)·base. filter_wise: one θ and t per
row (the last axis; 1-D tensors are one row), else one for the whole tensor. Where 1 + (N-1)·cos θ
is ~0 (|.| < 1e-6) there is no finite estimate: t = 0, the base.

Op order (mergekit 0.1.5's bits in fp32), on fp32 rows (the whole tensor flat, or its rows):
d_i = x_i - base; for each pair i < j in order, c_ij = ((d_i·d_j).sum(-1) / (‖d_i‖·‖d_j‖)
.clamp(min=1e-6)).clamp(-1, 1) (‖·‖ `torch.linalg.vector_norm` over the last axis); cos =
stack(c).mean(dim=0)[..., None]; den = 1 + (N-1)·cos; t = N·cos / den (0 where singular);
mean = (0 + x_1 + ... + x_N) / N; out = t·mean + (1-t)·base; round once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.errors import MergeSearchError
from search.methods.base import MergeInputs, MethodSpec, Param, out_dtype_of, same_shape

MODEL_STOCK_EPS = 1e-6  # the norms' product is clamped to it; |den| below it is singular


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """Model Stock on one tensor: `tensors` are the N >= 2 models besides `base`."""
    if len(tensors) < 2:
        raise MergeSearchError(f"model_stock needs at least 2 models besides the base but got {len(tensors)}")
    same_shape([base, *tensors], "model_stock")
    dtype = out_dtype_of([base, *tensors], out_dtype)

    def rows(x: Tensor) -> Tensor:
        x = x.float()
        if not filter_wise:
            return x.reshape(-1)
        return x.reshape(1, -1) if x.dim() <= 1 else x

    w0, ws = rows(base), [rows(x) for x in tensors]
    deltas = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=MODEL_STOCK_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos
    singular = den.abs() < MODEL_STOCK_EPS
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))
    mean = sum(ws) / n  # 0 + x_1 + ... (a -0.0 in x_1 becomes +0.0, as in mergekit)
    return (t * mean + (1 - t) * w0).reshape(base.shape).to(dtype)


def _merge(inp: MergeInputs) -> Tensor:
    return model_stock(inp.base, inp.tensors, filter_wise=bool(inp.shared["filter_wise"]), out_dtype=inp.out_dtype)


SPEC = MethodSpec(
    name="model_stock", merge=_merge, needs_base=True, min_models=3, max_models=None,
    model_params={}, shared_params={"filter_wise": Param(bool, False)},
    reference="https://arxiv.org/abs/2403.19522",
)
