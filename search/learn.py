"""Learned merge weights (issue #13): the gradient of a loss of the live merged model with
respect to the per-cell parameters of a merge, without a graph through the merge.

The learnable methods are those whose merged tensor is, per tensor, a weighted sum of its inputs
with coefficients that depend on the cell's parameters (and on constants of that tensor):

    linear            p = sum_i w_i x_i / (sum_i w_i when normalize)
    task_arithmetic   p = base + lambda sum_i w_i (x_i - base) (/ sum_i w_i when normalize)
    slerp             p = sin((1-t) O) / sin O * a + sin(t O) / sin O * b,  O the angle of a and b
                      (linear interpolation where |cos O| > 0.9995, as the merge)

so for p = sum_j c_j(theta) x_j (the base one more x_j),

    dL/dtheta = sum over the tensors p of sum_j <dL/dp, x_j> dc_j/dtheta;

and TIES (its densities held, not learned):

    ties              p = base + lambda sum_i w_i a_i d_i / (sum_i w_i a_i when normalize)

with d_i the trimmed task vector and a_i the elements where w_i d_i agrees with
the elected sign, the sign of T = sum_i w_i d_i. Per element that is no weighted sum of whole
tensors (the divisor is the element's), so the hook reduces the gradient to the partials in the
tensor's weights directly: with the masks held at the current weights,

    dL/dw_j = lambda <dL/dp, a_j (d_j - q) / D>      (q the normalised mix, D its divisor;
                                                      without normalize lambda <dL/dp, a_j d_j>)

That misses most of the real merge's gradient: moving the weights moves T, and an element whose
T crosses 0 jumps from the mix of the negative deltas M- to that of the positive ones M+. Summed
over the many elements near T = 0, the jumps are a term of the gradient, dp/dw_j = (M+ - M-)
delta(T) d_j, which the hook estimates with a Gaussian kernel for delta, of width
`sign_bandwidth` times the RMS of T (per chunk of DOT_CHUNK elements):

    + lambda <dL/dp (M+ - M-) K_h(T), d_j>

On the demo family this term is 1.7x (at uniform) to 15x (at inst-meta 0.91) the held-mask
one, and the two together match finite differences of the real merge within 10%; the
held-mask term alone points elsewhere (sign_bandwidth 0 gives it). The DARE methods, della and
breadcrumbs pick elements at random or by rank bands; they are not learned.

The live parameters require gradients; a post-accumulate hook on each reduces its gradient to
those dot products and frees it, so beyond autograd's own buffers one tensor's gradient is
alive at a time. After the backward pass(es) the coefficients are built once more in a small
float64 graph over the cells' parameters, and the dot products chain through it: the
normalisation, the softmax and slerp's angle are autograd's to differentiate, not closed forms
of ours.

The parameters live unconstrained: a softmax of logits for weights on the simplex (normalised
linear), `low + (high - low) * sigmoid(z)` for every other searched parameter over its search
range (task_arithmetic's weights, slerp's t), so a learned candidate is always one the search
could have drawn and `to_config` exports. The parameters that are not learned (TIES' densities)
are held at the start's values (`hold`; uniform's: density 1).

Which cell a tensor belongs to is read off the resolved merge configuration of marker values,
the same resolution that merges, scores and exports a candidate, so the learner cannot disagree
with `to_config` about layers and filters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from search.errors import MergeSearchError
from search.merger import InMemoryMerger, model_key
from search.methods import LEARNABLE, METHODS, SLERP_DOT_THRESHOLD, SLERP_EPS, members, topk_count
from search.space import MergeSpace

DOT_CHUNK = 1 << 22  # elements per float32 dot product of a gradient with a source row (16 MiB copies)
SIGN_BANDWIDTH = 0.05  # TIES: the flips' kernel width, a share of the RMS of each chunk's weighted sums
EDGE = 1e-6  # a start value at a range's end (a weight of 0) is moved in by this much: its logit is finite

Loss = Callable[[torch.nn.Module], "torch.Tensor | Iterable[torch.Tensor]"]


def check_learnable(space: MergeSpace) -> None:
    """MergeSearchError unless the learner can learn `space`'s parameters."""
    if space.method not in LEARNABLE:
        raise MergeSearchError(f"learned weights need merge.method {', '.join(LEARNABLE)} (the others pick "
                               f"elements at random or by rank bands) but got {space.method}")


def tensor_cells(merger: InMemoryMerger, space: MergeSpace) -> list[int]:
    """Index into `space.cells` of each of the merger's live tensors (in `merger.segments` order)."""
    n, c = len(space.names), len(space.cells)
    key = "weight" if "weight" in space.model_keys else space.shared_keys[0]
    marker = [(k + 1) / (c + 1) for k in range(c)]  # inside every search range of [0, 1]
    values = space.uniform_values([1.0] * n)  # the other parameters neutral (density 1)
    for k, cell in enumerate(space.cells):
        values[cell] = {**values[cell], key: [marker[k]] + [1.0] * (n - 1) if key == "weight" else [marker[k]]}
    first = model_key(space.models[space.names[0]])
    out = []
    for rec in merger.recipes(space.to_config(values)):
        if key == "weight":
            i = next(j for j, ref in enumerate(rec.models) if model_key(ref) == first)
            v = float(rec.params[i]["weight"])
        else:
            v = float(rec.shared[key])
        k = round(v * (c + 1)) - 1
        if abs(v * (c + 1) - (k + 1)) > 1e-6 or not 0 <= k < c:
            raise MergeSearchError(f"tensor {rec.tensor}: its {key} blends several cells ({v:g}); "
                                   "the learner needs each tensor in one cell")
        out.append(k)
    return out


def held_out_examples(suite, fraction: float, seed: int, loss: str = "ce") -> set[str]:
    """The examples early stopping holds out of the learning loss: `fraction` of each task's
    examples of the search split `suite` (at least one of a task with two or more), drawn with
    `seed`. They are never the test split's: the learner sees only the search split."""
    if not 0 < fraction < 1:
        raise MergeSearchError(f"early_stop must be a share of the examples in (0, 1) but got {fraction}")
    out = set()
    for task, keys in suite.loss_tasks(loss).items():
        k = max(1, round(fraction * len(keys))) if len(keys) >= 2 else 0
        out.update(random.Random(f"{seed}/{task}").sample(keys, k))
    return out


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the module list as long as its layer count."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise MergeSearchError(f"activation checkpointing needs the model's decoder layers, a list of {n}: "
                           f"{type(model).__name__} has none")


@contextmanager
def checkpointed(model):
    """Run `model`'s decoder layers under activation checkpointing (torch.utils.checkpoint,
    non-reentrant): a layer keeps its input for the backward pass and computes the rest again
    there, so a batch holds one layer's activations instead of every layer's. The model stays in
    eval mode (no dropout). A layer given a key-value cache is refused: recomputing it would
    update the cache twice, so the rows must carry their prefix (EvalSuite share_prefix=False)."""
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))

    def wrap(forward):
        def run(*args, **kw):
            if kw.get("past_key_values") is not None or kw.get("cache") is not None:
                raise MergeSearchError("activation checkpointing cannot run rows that read a shared-prefix cache: "
                                       "build the learning suite with share_prefix=False")
            return checkpoint(forward, *args, use_reentrant=False, **kw)
        return run

    for layer in layers:
        layer.forward = wrap(layer.forward)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # a call that does not say so would otherwise start a cache
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        for layer in layers:
            del layer.forward  # the class's forward again


class WeightGradient:
    """A learnable space's per-cell parameters theta (cells x columns, float64), applied to
    `merger`'s live model, and the gradient of a loss of that model with respect to theta.
    checkpoint: run the backward passes with activation checkpointing (`checkpointed`).
    sign_bandwidth: TIES only, the kernel width of its sign flips as a share of the weighted
    sums' RMS (0: the masks held, no flips)."""

    def __init__(self, merger: InMemoryMerger, space: MergeSpace, *, checkpoint: bool = False,
                 sign_bandwidth: float = SIGN_BANDWIDTH):
        check_learnable(space)
        if not sign_bandwidth >= 0:
            raise MergeSearchError(f"sign_bandwidth must be >= 0 (0: TIES' masks held) but got {sign_bandwidth}")
        self.merger, self.space, self.checkpoint = merger, space, checkpoint
        self.sign_bandwidth = float(sign_bandwidth)
        if checkpoint:
            decoder_layers(merger.model)  # fails now, not at the first step
        self.cells = tensor_cells(merger, space)
        names = list(space.names)
        self.ties = space.method == "ties"
        self.rows = [merger.keys[model_key(space.models[n])] for n in names]
        if space.method in ("task_arithmetic", "ties"):
            self.rows.append(merger.keys[model_key(space.base)])
        self.params = [dict(merger.model.named_parameters())[s.name] for s in merger.segments]
        self.key = "t" if space.method == "slerp" else "weight"  # the learned parameter
        self.softmax = self.key == "weight" and space.simplex  # weights on the simplex: softmax of logits
        self.columns = 1 if space.method == "slerp" else len(names)
        self.shape = (len(space.cells), self.columns)
        self._index = torch.tensor(self.cells)
        self._angles = self._slerp_angles() if space.method == "slerp" else None
        self.held: dict = {}
        self.hold(space.uniform_values([1.0 / len(names)] * len(names)))
        self._recipes: list = []  # the live merge's, for TIES' masks

    def hold(self, values: dict) -> None:
        """Hold the parameters that are not learned (TIES' densities) at those of `values` (a start)."""
        self.held = {cell: {k: list(v) for k, v in values[cell].items() if k != self.key} for cell in self.space.cells}

    # --- theta <-> the space's values ------------------------------------------------------

    def decode(self, theta: torch.Tensor) -> torch.Tensor:
        """The parameters' values (cells x columns): weights, or slerp's t; differentiable."""
        if self.softmax:
            return torch.softmax(theta, dim=-1)
        lo, hi = self.space._range(self.key)
        return lo + (hi - lo) * torch.sigmoid(theta)

    def encode(self, values: dict) -> torch.Tensor:
        """theta of the space's `values` (a start): values at a range's end move in by EDGE."""
        x = torch.tensor([values[cell][self.key] for cell in self.space.cells], dtype=torch.float64)
        if self.softmax:
            x = x / x.sum(-1, keepdim=True)
            return torch.log(x.clamp(min=EDGE))
        lo, hi = self.space._range(self.key)
        u = ((x - lo) / (hi - lo)).clamp(EDGE, 1 - EDGE)
        return torch.log(u) - torch.log1p(-u)

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        return self.decode(theta.double())

    def values(self, theta: torch.Tensor) -> dict:
        """The space's values of `theta` (what `to_config` exports and the merger applies)."""
        v = self.decode(theta.detach().double())
        return {cell: {**self.held[cell], self.key: v[k].tolist()} for k, cell in enumerate(self.space.cells)}

    def apply(self, theta: torch.Tensor) -> None:
        """Merge the values of `theta` into the live model."""
        if tuple(theta.shape) != self.shape:
            raise MergeSearchError(f"logits need shape {self.shape} (cells x {'t' if self.columns == 1 else 'sources'}) "
                                   f"but got {tuple(theta.shape)}")
        config = self.space.to_config(self.values(theta))
        if self.ties:
            self._recipes = self.merger.recipes(config)
            if any(r.shared["rescale"] for r in self._recipes):  # the search space never sets it
                raise MergeSearchError("the learner takes TIES without rescale")
        self.merger.apply(config)

    # --- the coefficients of each tensor's inputs ------------------------------------------

    def _slerp_angles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor: slerp's angle between its two inputs, and whether the merge interpolates
        linearly there (nearly parallel inputs), as the merge decides it."""
        omega, linear = [], []
        for seg in self.merger.segments:
            a, b = (x.double() for x in self.merger._slices(self.rows, seg.offset, seg.offset + seg.numel))
            na, nb = (float(torch.linalg.vector_norm(x)) for x in (a, b))
            na, nb = (n if n > SLERP_EPS else 1.0 for n in (na, nb))
            cos = max(-1.0, min(1.0, float(torch.dot(a, b)) / (na * nb)))
            linear.append(abs(cos) > SLERP_DOT_THRESHOLD)
            omega.append(1.0 if linear[-1] else math.acos(cos))  # 1.0: any angle, unused where linear
        return torch.tensor(omega, dtype=torch.float64), torch.tensor(linear)

    def coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """Per tensor (segments x rows) the coefficient of each row in its merge; differentiable."""
        v = self.decode(theta)[self._index]  # segments x columns
        space = self.space
        if space.method == "slerp":
            omega, linear = self._angles
            t = v[:, 0]
            a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / torch.sin(omega))
            b = torch.where(linear, t, torch.sin(t * omega) / torch.sin(omega))
            return torch.stack([a, b], dim=-1)
        if self.ties:  # the hook's dot products are the partials in each tensor's weights
            return v
        w = v / v.sum(-1, keepdim=True) if space.normalize else v
        if space.method == "linear":
            return w
        d = space.lambda_ * w  # task_arithmetic: the base's coefficient is what the deltas leave
        return torch.cat([d, 1 - d.sum(-1, keepdim=True)], dim=-1)

    def surrogate(self, theta: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
        """sum over tensors and rows of dots * coefficients: its gradient in theta is the loss's."""
        return (self.coefficients(theta) * dots).sum()

    # --- the gradient ----------------------------------------------------------------------

    def dots(self, loss_fn: Loss) -> tuple[float, torch.Tensor]:
        """Evaluate `loss_fn(model)` with gradients on the live parameters and backpropagate it
        (a tensor, or an iterable of parts, each backpropagated on its own so that one part's
        activations are alive at a time); return the loss and each tensor's dot products with
        its rows (segments x rows, float64)."""
        width = self.columns if self.ties else len(self.rows)  # TIES: the partials in its weights
        out = torch.zeros((len(self.params), width), dtype=torch.float64)
        handles = []
        for s, (seg, p) in enumerate(zip(self.merger.segments, self.params)):
            def reduce(p, seg=seg, s=s):
                if self.ties:
                    out[s] += self._ties_partials(s, seg, p.grad).cpu()
                    p.grad = None
                    return
                xs = self.merger._slices(self.rows, seg.offset, seg.offset + seg.numel)
                if p.grad.is_sparse:  # the input embedding's: only the rows of the tokens seen
                    g = p.grad.coalesce()
                    idx, vals = g.indices()[0], g.values().float()
                    for j, x in enumerate(xs):
                        out[s, j] += float((vals * x.view(seg.shape)[idx].float()).sum(dtype=torch.float64))
                    p.grad = None
                    return
                g = p.grad.reshape(-1)
                acc = torch.zeros(len(xs), dtype=torch.float64, device=g.device)
                for a in range(0, seg.numel, DOT_CHUNK):  # float32 products, a chunk's worth of copies at a time
                    gc = g[a:a + DOT_CHUNK].float()
                    for j, x in enumerate(xs):
                        acc[j] += torch.dot(gc, x[a:a + DOT_CHUNK].float()).double()
                out[s] += acc.cpu()
                p.grad = None  # freed: one tensor's gradient at a time

            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(reduce))
        # The input embedding's gradient as sparse rows (what its dense gradient, vocab x hidden
        # in float32 on CPU, would be mostly zeros of), unless it is tied to the output head.
        emb, head = self.merger.model.get_input_embeddings(), self.merger.model.get_output_embeddings()
        sparse = isinstance(emb, torch.nn.Embedding) and not emb.sparse and (head is None or head.weight is not emb.weight)
        if sparse:
            emb.sparse = True
        total = 0.0
        try:
            with torch.enable_grad(), (checkpointed(self.merger.model) if self.checkpoint else nullcontext()):
                parts = loss_fn(self.merger.model)
                for part in [parts] if isinstance(parts, torch.Tensor) else parts:
                    if part.requires_grad:
                        part.backward()
                    total += float(part.detach())
        finally:
            if sparse:
                emb.sparse = False
            for h in handles:
                h.remove()
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        return total, out

    def _ties_partials(self, s: int, seg, grad: torch.Tensor) -> torch.Tensor:
        """dL/dw_j of tensor `s` under TIES at the live merge's weights, per member j: the
        held-mask term lambda <grad, a_j (d_j - q) / D> (normalize) or lambda <grad, a_j d_j>,
        with d_j the trimmed task vector, a_j its agreement with the elected sign, q the
        normalised mix and D its divisor, computed as the merge computes them
        (search/methods/ties.py); plus, unless sign_bandwidth is 0, the sign flips' term
        lambda <grad (M+ - M-) K_h(T), d_j> (the module docstring)."""
        rec = self._recipes[s]
        spec = METHODS["ties"]
        rows = tuple(self.merger.keys[model_key(r)] for r in rec.models)
        idx = members(spec, rec)
        flat = self.merger._slices(rows, seg.offset, seg.offset + seg.numel)
        tensors = [x.view(seg.shape) for x in flat]
        w = [float(rec.params[k]["weight"]) for k in idx]
        ks = [topk_count(seg.numel, float(rec.params[k]["density"])) for k in idx]
        ranks = [self.merger._cached(s, rows, k, rec, tensors) for k in idx]  # None where nothing is trimmed
        xs, base = [flat[k] for k in idx], flat[rec.base]
        if grad.is_sparse:  # the input embedding's: only the rows of the tokens seen
            g = grad.coalesce()
            rows_seen = g.indices()[0]
            pick = lambda t: t.view(seg.shape)[rows_seen].reshape(-1)  # noqa: E731
            g, xs, base = g.values().reshape(-1), [pick(x) for x in xs], pick(base)
            ranks = [None if r is None else pick(r) for r in ranks]
        else:
            g = grad.reshape(-1)
        normalize, lam = bool(rec.shared["normalize"]), float(rec.shared["lambda"])
        acc = torch.zeros(len(xs), dtype=torch.float64, device=g.device)
        for a in range(0, g.numel(), DOT_CHUNK):
            e = a + DOT_CHUNK
            gc, b = g[a:e].float(), base[a:e].float()
            ds = []
            for j, x in enumerate(xs):
                d = x[a:e].float() - b
                if ranks[j] is not None:
                    d = d * (ranks[j][a:e] < ks[j])
                ds.append(d)
            wd = [d * w[j] for j, d in enumerate(ds)]
            total = wd[0]
            for x in wd[1:]:
                total = total + x
            # per elected sign (+, -): which members agree, their mix and its divisor
            sides, mixes, divs = [], [], []
            for sign in (1.0, -1.0):
                side = [(x * sign) > 0 for x in wd]
                mixed = sum(x * a for x, a in zip(wd, side))
                div = None
                if normalize:
                    div = sum(w[j] * side[j].to(torch.float32) for j in range(len(ds)))
                    div = torch.where(div == 0, torch.ones_like(div), div)
                    mixed = mixed / div
                sides.append(side)
                mixes.append(mixed)
                divs.append(div)
            plus = total >= 0  # the elected sign (0 counts as +)
            q = torch.where(plus, mixes[0], mixes[1])
            div = torch.where(plus, divs[0], divs[1]) if normalize else None
            for j, d in enumerate(ds):  # the held-mask term
                agree = torch.where(plus, sides[0][j], sides[1][j])
                held = ((d - q) / div) * agree if normalize else d * agree
                acc[j] += lam * torch.dot(gc, held).double()
            if self.sign_bandwidth:  # the elements whose elected sign flips: a kernel over T near 0
                h = self.sign_bandwidth * float(total.pow(2).mean().sqrt()) + 1e-30
                jump = gc * (mixes[0] - mixes[1]) * torch.exp(-0.5 * (total / h) ** 2) / (h * math.sqrt(2 * math.pi))
                for j, d in enumerate(ds):
                    acc[j] += lam * torch.dot(jump, d).double()
        return acc

    def backward(self, theta: torch.Tensor, loss_fn: Loss) -> tuple[float, torch.Tensor]:
        """Apply `theta`, evaluate `loss_fn(model)` with gradients on, and return (loss, dL/dtheta)."""
        self.apply(theta)
        loss, dots = self.dots(loss_fn)
        th = theta.detach().double().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.surrogate(th, dots), th)
        return loss, grad


@dataclass
class Learned:
    logits: torch.Tensor  # cells x columns: the returned parameters (the best held-out step's with early stopping)
    losses: list[float]  # the fitted loss before each step's update
    held: list[float] = field(default_factory=list)  # the held-out loss before each step's update (early stopping)
    best_step: int | None = None  # the step whose parameters were returned (early stopping)

    @property
    def steps(self) -> int:
        return len(self.losses)


def learn(learner: WeightGradient, loss_fn: Loss, *, steps: int = 30, lr: float = 0.05, l2: float = 0.0,
          start: torch.Tensor | None = None, anchor: torch.Tensor | None = None,
          held: Callable[[], float | None] | None = None, patience: int = 5) -> Learned:
    """Adam on theta for `steps` steps from `start` (default: the zero logits, i.e. uniform
    weights or each range's middle), minimising `loss_fn` plus `l2` times the squared distance of
    the values to `anchor`'s (default: the start's). held(): after each gradient evaluation, the
    held-out loss at the same parameters (None: no early stopping); the parameters with the
    lowest one are returned, and learning stops after `patience` steps without a new lowest.
    The live model holds the returned parameters' merge."""
    if steps < 1 or lr <= 0 or l2 < 0 or patience < 1:
        raise MergeSearchError(f"learning needs steps >= 1, lr > 0, l2 >= 0 and patience >= 1 but got "
                               f"{steps}, {lr}, {l2}, {patience}")
    theta = torch.zeros(learner.shape, dtype=torch.float64) if start is None else start.detach().double().clone()
    pull = learner.weights(theta if anchor is None else anchor.double()).detach()
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    out = Learned(theta.detach().clone(), [])
    best = math.inf
    for step in range(steps):
        loss, grad = learner.backward(theta.detach(), loss_fn)
        out.losses.append(loss)
        h = held() if held is not None else None
        if h is not None:
            out.held.append(h)
            if h < best:
                best, out.best_step, out.logits = h, step, theta.detach().clone()
            elif step - out.best_step >= patience:
                break
        opt.zero_grad()
        if l2:
            (l2 * ((learner.weights(theta) - pull) ** 2).sum()).backward()
        theta.grad = grad if theta.grad is None else theta.grad + grad
        opt.step()
    if held is None or not out.held:
        out.logits = theta.detach().clone()
    learner.apply(out.logits)
    return out
