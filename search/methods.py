"""The merge math: one plain function per method over the tensors of ONE tensor name.

    out = linear([a, b], weights=[0.7, 0.3])                                 # normalize=True
    out = ties(base, [a, b], weights=[1, 1], densities=[0.5, 0.5])
    out = merge_tensor(recipe, tensors, out_dtype=torch.bfloat16)            # from a TensorRecipe

Semantics are mergekit 0.1.5's for the same YAML (proven bit for bit by tests/test_parity.py).
Every function computes in fp32 (whatever the sources' dtype) and rounds once to `out_dtype`
(default: the promoted dtype of its inputs). The exact op order is part of the contract, because
the fused in-memory merger must give the same bits:

- linear: `w = tensor(weights, fp32)`; `acc = zeros(fp32)`; for each i in order
  `acc.addcmul_(x_i, w[i])` (one fused multiply-add per element: a single rounding, not
  `acc + x*w`); if normalize `acc.div_(w.reshape(1, n).sum(dim=1))`; round.
- task vectors (task_arithmetic, ties, dare_*): `d_i = x_i.float() - base.float()` stacked as
  `[n, *shape]`; sparsify d_i (ties: keep the top-k of |d_i|, k = max(1, int(density*numel)),
  chosen by `torch.argsort(|d_i|, descending=True)`; dare: keep where u < density); if rescale,
  `d_i * (|d_i|.sum() / |kept|.sum())`; `d.mul_(w)` with w fp32 `[n, 1, ...]`; then either
  `mixed = d.sum(dim=0)`, divisor `w.sum(dim=0)` (task_arithmetic, dare_linear) or TIES sign
  election: majority = sign of `d.sum(dim=0)` (0 counts as +), agree = `d.sign() == majority`,
  `mixed = (d * agree).sum(dim=0)`, divisor `(w * agree).sum(dim=0)` with 0 -> 1; if normalize
  `mixed /= divisor`; if lambda != 1 `mixed *= lambda`; `out = base.float() + mixed`; round.
- slerp: mergekit's chunked fp32 numerics (norms and dot over chunks of 2**20 elements), linear
  interpolation when |cos| > 0.9995.

DARE randomness: element e of model i's task vector for tensor `name` is kept when
`u[e] < density`, u = `torch.rand(shape, generator=torch.Generator().manual_seed(s))` on the CPU,
s = first 8 bytes (little endian, top bit cleared) of sha256(f"{seed}:{name}:{i}"), i = the model's
index in the recipe (base included). So a mask depends only on (seed, tensor, model), not on the
order tensors are merged in, and a smaller density keeps a subset of a larger one's elements.
mergekit draws `torch.bernoulli` from the global generator instead: DARE matches it in
distribution only (exactly at density 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from search.errors import MergeSearchError

SLERP_CHUNK = 1 << 20  # mergekit's chunk for slerp's norms and dot product (one output per call)
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: vectors nearly parallel, interpolate linearly
SLERP_EPS = 1e-8
RESCALE_EPS = 1e-7  # l1 rescale is skipped when either norm is below this (as mergekit)
NORMALIZE_EPS = 1e-8  # |sum of weights| below this cannot be normalized by


# --- checks ---------------------------------------------------------------------------------

def check_finite(tensor: Tensor, what: str) -> None:
    """Raise MergeSearchError naming `what` (tensor, model, file) if `tensor` holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeSearchError(f"{what}: {bad} NaN/inf values of {tensor.numel()}")


def check_density(density: float, method: str) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise MergeSearchError(f"{method}: density must be in (0, 1] but got {density!r}")


def check_normalizable(weights: Sequence[float], method: str, what: str = "") -> None:
    total = float(torch.tensor([list(map(float, weights))], dtype=torch.float32).sum(dim=1))
    if abs(total) < NORMALIZE_EPS:
        where = f" at {what}" if what else ""
        raise MergeSearchError(f"{method}: weights {list(weights)} sum to {total:g}{where}; "
                               "cannot normalize (set normalize: false or change the weights)")


def _same_shape(tensors: Sequence[Tensor], method: str) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MergeSearchError(f"{method}: inputs have different shapes {sorted(shapes)}")


def _out_dtype(tensors: Sequence[Tensor], out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --- linear ---------------------------------------------------------------------------------

def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True,
           out_dtype: torch.dtype | None = None) -> Tensor:
    """Σ w_i·x_i (÷ Σ w_i when normalize), fp32 fused multiply-adds in input order, one rounding."""
    if len(tensors) != len(weights) or not tensors:
        raise MergeSearchError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    _same_shape(tensors, "linear")
    if normalize:
        check_normalizable(weights, "linear")
    w = torch.tensor(list(map(float, weights)), dtype=torch.float32, device=tensors[0].device)
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for x, wi in zip(tensors, w.unbind(0)):
        acc.addcmul_(x, wi)  # x may be half precision: the FMA promotes it to fp32 exactly
    if normalize:
        acc.div_(w.reshape(1, -1).sum(dim=1))
    return acc.to(_out_dtype(tensors, out_dtype))


# --- task vectors: task_arithmetic, ties, dare ---------------------------------------------

def topk_count(numel: int, density: float) -> int:
    """How many elements TIES keeps: max(1, int(density * numel)) (all when density >= 1)."""
    return numel if density >= 1 else max(1, int(density * numel))


def magnitude_rank(delta: Tensor) -> Tensor:
    """Rank of each element of `delta` by |delta|, 0 = largest, flat, int32 (int64 past 2**31).

    The order is `torch.argsort(|delta|.float(), descending=True)`, exactly mergekit's, ties
    included (that sort is not stable; a kthvalue threshold would pick other tied elements).
    It depends only on the task vector, so a search computes it once: TIES's mask for any
    density is then `rank < topk_count(numel, density)`.
    """
    order = torch.argsort(delta.detach().abs().reshape(-1).float(), descending=True)
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    rank = torch.empty(order.numel(), dtype=dtype, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return rank


def dare_seed(seed: int, name: str, index: int) -> int:
    """The generator seed of DARE's mask for model `index` at tensor `name` (see module doc)."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_keep(shape: Sequence[int], density: float, *, seed: int, name: str, index: int,
              device: str | torch.device = "cpu") -> Tensor:
    """DARE's keep mask (bool): u < density, u uniform fp32 drawn on the CPU (see module doc)."""
    gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, name, index))
    return (torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density).to(device)


def _rescaled(delta: Tensor, kept: Tensor) -> Tensor:
    """mergekit's l1 rescale: kept·(|delta|₁ / |kept|₁), unless either norm is ~0."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _combine(base: Tensor, deltas: Tensor, weights: Sequence[float], *, consensus: bool,
             normalize: bool, lambda_: float, out_dtype: torch.dtype) -> Tensor:
    w = torch.tensor(list(map(float, weights)), dtype=torch.float32, device=deltas.device)
    w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas.mul_(w)
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < NORMALIZE_EPS] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base.float() + mixed).to(out_dtype)


def _task_vectors(method: str, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                  densities: Sequence[float] | None, normalize: bool) -> tuple[Tensor, torch.dtype]:
    if len(tensors) != len(weights) or (densities is not None and len(densities) != len(tensors)):
        raise MergeSearchError(f"{method}: {len(tensors)} tensors, {len(weights)} weights"
                               + ("" if densities is None else f", {len(densities)} densities"))
    _same_shape([base, *tensors], method)
    for d in densities or ():
        check_density(d, method)
    if normalize and tensors:
        check_normalizable(weights, method)
    base32 = base.float()
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32, device=base.device)
    for i, x in enumerate(tensors):
        torch.sub(x.float(), base32, out=deltas[i])
    return deltas, _out_dtype([base, *tensors], None)


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lambda_: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """base + λ·Σ w_i·(x_i − base) (÷ Σ w_i when normalize)."""
    deltas, dtype = _task_vectors("task_arithmetic", base, tensors, weights, None, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    return _combine(base, deltas, weights, consensus=False, normalize=normalize,
                    lambda_=lambda_, out_dtype=out_dtype or dtype)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
         densities: Sequence[float], *, normalize: bool = True, lambda_: float = 1.0,
         rescale: bool = False, ranks: Sequence[Tensor | None] | None = None,
         out_dtype: torch.dtype | None = None) -> Tensor:
    """TIES: trim each task vector to its top-density by magnitude, elect signs, disjoint mean.

    ranks: optional `magnitude_rank(x_i - base)` per model, precomputed (see magnitude_rank).
    """
    deltas, dtype = _task_vectors("ties", base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    for i, density in enumerate(densities):
        if density >= 1:
            continue
        rank = ranks[i] if ranks is not None and ranks[i] is not None else magnitude_rank(deltas[i])
        keep = (rank < topk_count(deltas[i].numel(), density)).reshape(deltas[i].shape)
        kept = deltas[i] * keep
        deltas[i] = _rescaled(deltas[i], kept) if rescale else kept
    return _combine(base, deltas, weights, consensus=True, normalize=normalize,
                    lambda_=lambda_, out_dtype=out_dtype or dtype)


def _dare(method: str, consensus: bool, base: Tensor, tensors: Sequence[Tensor],
          weights: Sequence[float], densities: Sequence[float], normalize: bool, lambda_: float,
          rescale: bool, seed: int, name: str, indices: Sequence[int] | None,
          out_dtype: torch.dtype | None) -> Tensor:
    deltas, dtype = _task_vectors(method, base, tensors, weights, densities, normalize)
    if not tensors:
        return base.to(out_dtype or dtype)
    indices = list(range(1, len(tensors) + 1)) if indices is None else indices
    for i, density in enumerate(densities):
        if density >= 1:
            continue
        keep = dare_keep(deltas[i].shape, density, seed=seed, name=name, index=indices[i],
                         device=deltas.device)
        kept = deltas[i] * keep
        deltas[i] = _rescaled(deltas[i], kept) if rescale else kept
    return _combine(base, deltas, weights, consensus=consensus, normalize=normalize,
                    lambda_=lambda_, out_dtype=out_dtype or dtype)


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                densities: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0,
                rescale: bool = True, seed: int = 0, name: str = "",
                indices: Sequence[int] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE: drop task-vector elements at random (keep prob. density), l1-rescale, add.

    name, indices: the tensor name and each model's index in the recipe (default 1..n, base 0),
    which with `seed` fix the masks (see the module doc).
    """
    return _dare("dare_linear", False, base, tensors, weights, densities, normalize, lambda_,
                 rescale, seed, name, indices, out_dtype)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
              densities: Sequence[float], *, normalize: bool = False, lambda_: float = 1.0,
              rescale: bool = True, seed: int = 0, name: str = "",
              indices: Sequence[int] | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE drop + rescale, then TIES sign election and disjoint mean."""
    return _dare("dare_ties", True, base, tensors, weights, densities, normalize, lambda_,
                 rescale, seed, name, indices, out_dtype)


# --- slerp ----------------------------------------------------------------------------------

def slerp(base: Tensor, other: Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """Spherical interpolation from `base` (t=0) to `other` (t=1), over the whole tensor.

    Falls back to (1-t)·base + t·other when |cos θ| > 0.9995 (nearly parallel or antipodal).
    Norms below 1e-8 count as 1, as in mergekit.
    """
    _same_shape([base, other], "slerp")
    dtype = _out_dtype([base, other], out_dtype)
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


# --- registry -------------------------------------------------------------------------------

REQUIRED = None  # a per-model parameter without default


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs. `args` maps config parameter names to the function's keywords;
    parameters outside `args` are accepted (mergekit takes them) but change nothing here."""

    fn: Callable[..., Tensor]
    needs_base: bool  # the base model is a required, distinguished input (task vectors, slerp)
    min_models: int  # inputs, the base included
    max_models: int | None
    model_params: Mapping[str, float | None]  # per-model parameter -> default (REQUIRED: none)
    shared_params: Mapping[str, Any]  # global parameter -> default (REQUIRED: none)
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def normalize_default(self) -> bool | None:
        return self.shared_params.get("normalize")

    @property
    def params(self) -> tuple[str, ...]:
        return (*self.model_params, *self.shared_params)


_TV = dict(needs_base=True, min_models=1, max_models=None, model_params={"weight": REQUIRED, "density": 1.0},
           args={"weight": "weights", "density": "densities", "normalize": "normalize", "lambda": "lambda_",
                 "rescale": "rescale"})


def _tv_shared(normalize: bool, rescale: bool) -> dict[str, Any]:
    return {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(linear, needs_base=False, min_models=1, max_models=None, model_params={"weight": REQUIRED},
                         shared_params={"normalize": True}, args={"weight": "weights", "normalize": "normalize"}),
    # task_arithmetic takes density and rescale (mergekit's common spec) but sparsifies nothing
    "task_arithmetic": MethodSpec(task_arithmetic, **{**_TV, "args": {"weight": "weights", "normalize": "normalize",
                                                                       "lambda": "lambda_"}},
                                  shared_params=_tv_shared(normalize=False, rescale=False)),
    "ties": MethodSpec(ties, **_TV, shared_params=_tv_shared(normalize=True, rescale=False)),
    "dare_linear": MethodSpec(dare_linear, **_TV, shared_params=_tv_shared(normalize=False, rescale=True)),
    "dare_ties": MethodSpec(dare_ties, **_TV, shared_params=_tv_shared(normalize=False, rescale=True)),
    "slerp": MethodSpec(slerp, needs_base=True, min_models=2, max_models=2, model_params={},
                        shared_params={"t": REQUIRED}, args={"t": "t"}),
}
# Value types, validated as mergekit validates them (pydantic, lax: "0.5" -> 0.5, 1 -> True).
PARAM_TYPES: dict[str, type] = {"weight": float, "density": float, "t": float, "lambda": float,
                                "normalize": bool, "rescale": bool, "int8_mask": bool}


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`; MergeSearchError listing the known ones otherwise."""
    spec = METHODS.get(name)
    if spec is None:
        raise MergeSearchError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}")
    return spec


def check_recipe(recipe) -> None:
    """Raise MergeSearchError if `recipe` (a TensorRecipe) cannot be merged: input count, base,
    density range, weights that cannot be normalized. One line naming method and tensor."""
    spec = method_spec(recipe.method)
    n, where = len(recipe.models), f"tensor {recipe.tensor}"
    if spec.needs_base and recipe.base is None:
        raise MergeSearchError(f"{recipe.method} needs a base_model (none given for {where})")
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}")
        raise MergeSearchError(f"{recipe.method} takes {want} models, the base included, but got {n} "
                               f"for {where}")
    members = [i for i in range(n) if i != recipe.base] if spec.needs_base else range(n)
    for i in members:
        if "density" in recipe.params[i] and "density" in spec.args:
            check_density(recipe.params[i]["density"], f"{recipe.method} ({recipe.models[i]}, {where})")
    if recipe.shared.get("normalize") and "weight" in spec.model_params and members:
        check_normalizable([recipe.params[i]["weight"] for i in members], recipe.method, where)


def merge_tensor(recipe, tensors: Sequence[Tensor], *, out_dtype: torch.dtype | None = None,
                 seed: int = 0, ranks: Sequence[Tensor | None] | None = None) -> Tensor:
    """Merge one tensor as `recipe` (a TensorRecipe) says; `tensors[i]` is read from recipe.models[i].

    ranks: for ties, optional precomputed magnitude ranks per model (None for the base).
    """
    check_recipe(recipe)
    spec = METHODS[recipe.method]
    if len(tensors) != len(recipe.models):
        raise MergeSearchError(f"{recipe.method}: {len(tensors)} tensors for {len(recipe.models)} models")
    kwargs: dict[str, Any] = {"out_dtype": out_dtype}
    for key, value in recipe.shared.items():
        if key in spec.args:
            kwargs[spec.args[key]] = value
    if recipe.method == "slerp":
        other = 1 - recipe.base
        return slerp(tensors[recipe.base], tensors[other], **kwargs)
    members = [i for i in range(len(tensors)) if i != recipe.base] if spec.needs_base else list(range(len(tensors)))
    for key in spec.model_params:
        if key in spec.args:
            kwargs[spec.args[key]] = [recipe.params[i][key] for i in members]
    if recipe.method.startswith("dare_"):
        kwargs.update(seed=seed, name=recipe.tensor, indices=members)
    if recipe.method == "ties" and ranks is not None:
        kwargs["ranks"] = [ranks[i] for i in members]
    if not spec.needs_base:
        return spec.fn([tensors[i] for i in members], **kwargs)
    return spec.fn(tensors[recipe.base], [tensors[i] for i in members], **kwargs)

