"""Learned merge weights (issue #13), the gradient core: the gradient of a loss of the live
merged model with respect to the per-cell weights of a linear merge, without a graph through
the merge.

In cell c (a group of layers x a filter, `MergeSpace.cells`) every tensor is p = sum_i w[c, i] x_i,
x_i that tensor of source i, w[c] on the simplex (weights sum to 1, so mergekit's normalisation
is the identity). Hence

    dL/dw[c, i] = sum over the tensors p of cell c of <dL/dp, x_i>.

The live parameters require gradients for one backward pass; a post-accumulate hook on each
reduces its gradient to those dot products with the source rows and frees it, so beyond
autograd's own buffers one tensor's gradient is alive at a time, never one per source. The
weights are a softmax of per-cell logits (they cannot leave the simplex), and `backward` chains
the cell gradient through that softmax by its closed form.

Which cell a tensor belongs to is read off the resolved merge configuration of marker values
(cell k has weight k + 1 on the first source), the same resolution that merges, scores and
exports a candidate, so the learner cannot disagree with `to_config` about layers and filters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from search.errors import MergeSearchError
from search.merger import InMemoryMerger, model_key
from search.space import MergeSpace


def tensor_cells(merger: InMemoryMerger, space: MergeSpace) -> list[int]:
    """Index into `space.cells` of each of the merger's live tensors (in `merger.segments` order)."""
    n = len(space.names)
    markers = {cell: {"weight": [float(k + 1)] + [1.0] * (n - 1)} for k, cell in enumerate(space.cells)}
    first = model_key(space.models[space.names[0]])
    out = []
    for rec in merger.recipes(space.to_config(markers)):
        i = next(j for j, ref in enumerate(rec.models) if model_key(ref) == first)
        w = float(rec.params[i]["weight"])
        k = round(w) - 1
        if abs(w - (k + 1)) > 1e-6 or not 0 <= k < len(space.cells):
            raise MergeSearchError(f"tensor {rec.tensor}: its weight blends several cells ({w:g}); "
                                   "the learner needs each tensor in one cell")
        out.append(k)
    return out


class LinearWeightGradient:
    """Per-cell weights of a linear merge as softmax(logits), applied to `merger`'s live model,
    with the gradient of a scalar loss of that model with respect to the logits."""

    def __init__(self, merger: InMemoryMerger, space: MergeSpace):
        if space.method != "linear" or not space.simplex:
            raise MergeSearchError(f"learned weights need merge.method linear with normalize: true "
                                   f"but got {space.method}" + ("" if space.simplex else " without normalize"))
        self.merger, self.space = merger, space
        self.cells = tensor_cells(merger, space)
        self.rows = [merger.keys[model_key(space.models[name])] for name in space.names]
        self.params = [dict(merger.model.named_parameters())[s.name] for s in merger.segments]
        self.shape = (len(space.cells), len(space.names))

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double(), dim=-1)

    def values(self, logits: torch.Tensor) -> dict:
        """The space's values of `logits` (what `to_config` exports and the merger applies)."""
        w = self.weights(logits)
        return {cell: {"weight": w[k].tolist()} for k, cell in enumerate(self.space.cells)}

    def apply(self, logits: torch.Tensor) -> None:
        """Merge the weights of `logits` into the live model."""
        if tuple(logits.shape) != self.shape:
            raise MergeSearchError(f"logits need shape {self.shape} (cells x sources) but got {tuple(logits.shape)}")
        self.merger.apply(self.space.to_config(self.values(logits)))

    def backward(self, logits: torch.Tensor, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> tuple[float, torch.Tensor]:
        """Apply `logits`, evaluate `loss_fn(model)` with gradients on, and return (loss, dL/dlogits)."""
        self.apply(logits)
        grad_w = torch.zeros(self.shape, dtype=torch.float64)
        handles = []
        for seg, cell, p in zip(self.merger.segments, self.cells, self.params):
            def reduce(p, seg=seg, cell=cell):
                g = p.grad.reshape(-1)
                for j, x in enumerate(self.merger._slices(self.rows, seg.offset, seg.offset + seg.numel)):
                    grad_w[cell, j] += torch.dot(g, x.to(g.dtype)).double().cpu()
                p.grad = None  # freed: one tensor's gradient at a time

            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(reduce))
        try:
            with torch.enable_grad():
                loss = loss_fn(self.merger.model)
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        w = self.weights(logits)
        # softmax's Jacobian: dL/dlogit[c, i] = w[c, i] * (dL/dw[c, i] - sum_j w[c, j] dL/dw[c, j])
        return float(loss.detach()), w * (grad_w - (w * grad_w).sum(-1, keepdim=True))


@dataclass
class Learned:
    logits: torch.Tensor  # cells x sources, after the last step
    losses: list[float]  # the loss before each step's update


def learn(learner: LinearWeightGradient, loss_fn: Callable[[torch.nn.Module], torch.Tensor], *, steps: int = 30,
          lr: float = 0.05, l2: float = 0.0, start: torch.Tensor | None = None) -> Learned:
    """Adam on the logits for `steps` steps from `start` (default: uniform weights), minimising
    `loss_fn` plus `l2` times the squared distance of the weights to the start's weights; the
    live model holds the last step's merge on return."""
    if steps < 1 or lr <= 0 or l2 < 0:
        raise MergeSearchError(f"learning needs steps >= 1, lr > 0 and l2 >= 0 but got {steps}, {lr}, {l2}")
    theta = torch.zeros(learner.shape, dtype=torch.float64) if start is None else start.detach().double().clone()
    anchor = learner.weights(theta).detach()
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    losses = []
    for _ in range(steps):
        loss, grad = learner.backward(theta.detach(), loss_fn)
        losses.append(loss)
        opt.zero_grad()
        if l2:
            (l2 * ((learner.weights(theta) - anchor) ** 2).sum()).backward()
        theta.grad = grad if theta.grad is None else theta.grad + grad
        opt.step()
    final = theta.detach()
    learner.apply(final)
    return Learned(final, losses)
