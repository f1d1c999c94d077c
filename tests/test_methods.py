"""Tests of search/methods.py: closed forms, the documented op order, and one contract test
run over every registered method. Parity with real mergekit lives in test_parity.py."""
from __future__ import annotations

import math

import pytest
import torch

from search.errors import MergeSearchError
from search.mergeconfig import TensorRecipe
from search.methods import (
    METHODS, REQUIRED, check_finite, dare_keep, dare_linear, dare_ties, linear, magnitude_rank, merge_tensor,
    method_spec, slerp, task_arithmetic, ties, topk_count,
)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (so +0 and -0 differ, unlike torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


A, B, C, BASE = rand(8, 5, seed=1), rand(8, 5, seed=2), rand(8, 5, seed=3), rand(8, 5, seed=4)


# --- closed forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_linear_one_hot_weights_give_the_source_exactly(normalize):
    assert bits_equal(linear([A, B], [1.0, 0.0], normalize=normalize), A)
    assert bits_equal(linear([A, B, C], [0.0, 0.0, 1.0], normalize=normalize), C)


def test_linear_follows_the_documented_op_order_bit_for_bit():
    w = torch.tensor([0.37, 0.21, 0.55], dtype=torch.float32)
    acc = torch.zeros_like(A)
    for x, wi in zip([A, B, C], w.unbind(0)):
        acc.addcmul_(x, wi)
    assert bits_equal(linear([A, B, C], [0.37, 0.21, 0.55], normalize=False), acc)
    assert bits_equal(linear([A, B, C], [0.37, 0.21, 0.55]), acc / w.reshape(1, -1).sum(dim=1))
    # (on CPUs with FMA, ~20% of elements differ from a separate `acc + x * w`: use addcmul_)


def test_linear_normalize_divides_by_the_sum_of_weights():
    out = linear([A, B], [3.0, 1.0])
    torch.testing.assert_close(out, 0.75 * A + 0.25 * B)
    torch.testing.assert_close(linear([A, B], [3.0, 1.0], normalize=False), 3 * A + B)


def test_linear_rounds_bf16_once_from_fp32():
    a, b = A.bfloat16(), B.bfloat16()
    out = linear([a, b], [0.3, 0.7], normalize=False)
    assert out.dtype == torch.bfloat16
    wide = linear([a.float(), b.float()], [0.3, 0.7], normalize=False)
    assert wide.dtype == torch.float32
    assert bits_equal(out, wide.bfloat16())  # fp32 accumulation, one rounding at the end
    assert bits_equal(linear([a, b], [0.3, 0.7], normalize=False, out_dtype=torch.float32), wide)


def test_task_arithmetic_adds_weighted_task_vectors_with_lambda():
    out = task_arithmetic(BASE, [A, B], [0.5, 2.0], lambda_=0.8)
    torch.testing.assert_close(out, BASE + 0.8 * (0.5 * (A - BASE) + 2.0 * (B - BASE)))
    norm = task_arithmetic(BASE, [A, B], [0.5, 2.0], normalize=True)
    torch.testing.assert_close(norm, BASE + (0.5 * (A - BASE) + 2.0 * (B - BASE)) / 2.5)
    assert bits_equal(task_arithmetic(BASE, [], []), BASE)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_density_1_and_one_model_is_task_arithmetic(normalize):
    assert torch.equal(ties(BASE, [A], [0.7], [1.0], normalize=normalize),
                       task_arithmetic(BASE, [A], [0.7], normalize=normalize))


def test_ties_elects_the_sign_of_the_weighted_sum_and_averages_the_agreeing():
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-2.0, 2.0, 0.0]), torch.tensor([3.0, -5.0, 0.0])]
    out = ties(base, xs, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    # element 0: sum +2 -> keep +1, +3 -> mean 2; element 1: sum -1 -> keep -5; element 2: only -1
    assert out.tolist() == [2.0, -5.0, -1.0]
    unnormalized = ties(base, xs, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], normalize=False)
    assert unnormalized.tolist() == [4.0, -5.0, -1.0]


def test_ties_trims_to_the_top_density_by_magnitude():
    x = BASE + torch.arange(1, 41, dtype=torch.float32).reshape(8, 5)
    out = ties(BASE, [x], [1.0], [0.25], normalize=False)
    kept = (out != BASE)
    assert int(kept.sum()) == topk_count(40, 0.25) == 10
    assert kept.reshape(-1)[-10:].all()  # the 10 largest deltas
    assert topk_count(40, 0.001) == 1 and topk_count(40, 1.0) == 40


def test_ties_with_precomputed_ranks_gives_the_same_bits():
    xs = [A, B, C]
    ranks = [magnitude_rank(x - BASE) for x in xs]
    for density in (0.1, 0.5, 0.9):
        d = [density, density / 2, 1.0]
        assert bits_equal(ties(BASE, xs, [0.3, 0.5, 0.2], d, ranks=ranks), ties(BASE, xs, [0.3, 0.5, 0.2], d))


def test_magnitude_rank_is_the_argsort_order_ties_included():
    delta = torch.randint(-3, 4, (5000,)).float()  # many equal magnitudes
    order = torch.argsort(delta.abs(), descending=True)
    rank = magnitude_rank(delta)
    assert rank.dtype == torch.int32
    assert torch.equal(order[rank.long()], torch.arange(5000))
    k = topk_count(5000, 0.3)
    mask = torch.zeros(5000, dtype=torch.bool)
    mask[order[:k]] = True
    assert torch.equal(rank < k, mask)


@pytest.mark.parametrize("fn", [dare_linear, dare_ties])
def test_dare_with_density_1_is_its_deterministic_counterpart(fn):
    counterpart = task_arithmetic if fn is dare_linear else ties
    kwargs = {} if fn is dare_linear else {"densities": [1.0, 1.0], "normalize": False}
    assert bits_equal(fn(BASE, [A, B], [0.6, 0.4], [1.0, 1.0], name="x"),
                      counterpart(BASE, [A, B], [0.6, 0.4], **kwargs))


def test_dare_drop_rate_and_rescale():
    base = torch.zeros(200_000)
    x = rand(200_000, seed=9)
    plain = dare_linear(base, [x], [1.0], [0.3], rescale=False, name="t")
    kept = plain != 0
    rate = kept.float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 200_000)
    assert torch.equal(plain[kept], x[kept])  # kept elements untouched without rescale
    scaled = dare_linear(base, [x], [1.0], [0.3], name="t")  # rescale is on by default
    assert torch.equal(scaled != 0, kept)  # the same mask
    torch.testing.assert_close(scaled.abs().sum(), x.abs().sum())  # l1 norm restored
    factor = (scaled[kept] / x[kept]).mean().item()
    assert abs(factor - 1 / 0.3) < 0.05 * (1 / 0.3)


def test_dare_masks_are_seeded_per_tensor_and_model_and_nested():
    keep = lambda d, seed=0, name="w", index=1: dare_keep((1000,), d, seed=seed, name=name, index=index)  # noqa: E731
    assert torch.equal(keep(0.5), keep(0.5))
    assert not torch.equal(keep(0.5), keep(0.5, seed=1))
    assert not torch.equal(keep(0.5), keep(0.5, name="v"))
    assert not torch.equal(keep(0.5), keep(0.5, index=2))
    assert not (keep(0.3) & ~keep(0.6)).any()  # a smaller density keeps a subset


def test_slerp_endpoints_are_exact_and_parallel_vectors_interpolate_linearly():
    assert bits_equal(slerp(A, B, 0.0), A)
    assert bits_equal(slerp(A, B, 1.0), B)
    torch.testing.assert_close(slerp(A, 2 * A, 0.5), 1.5 * A)  # |cos| = 1: linear fallback
    torch.testing.assert_close(slerp(A, -A, 0.25), 0.5 * A)  # antipodal: linear too
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(e0, e1, 0.5)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5)] * 2))  # on the arc, norm 1


def test_merge_tensor_takes_slerps_base_wherever_it_is_listed():
    r = TensorRecipe("w", "slerp", ("a", "b"), ("w", "w"), 1, ({}, {}), {"t": 0.25})
    assert bits_equal(merge_tensor(r, [A, B]), slerp(B, A, 0.25))


def test_merge_tensor_passes_precomputed_ties_ranks():
    r = TensorRecipe("w", "ties", ("base", "a", "b"), ("w",) * 3, 0,
                     ({}, {"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.6}),
                     {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False})
    ranks = [None, magnitude_rank(A - BASE), magnitude_rank(B - BASE)]
    expect = ties(BASE, [A, B], [0.5, 0.5], [0.3, 0.6])
    assert bits_equal(merge_tensor(r, [BASE, A, B], cache=ranks), expect)
    assert bits_equal(merge_tensor(r, [BASE, A, B]), expect)


def test_slerp_chunks_like_mergekit_on_big_tensors():
    a, b = rand(3 << 19, seed=5), rand(3 << 19, seed=6)  # 1.5 chunks of 2**20
    out = slerp(a, b, 0.3)
    theta = torch.acos((a / a.norm()).dot(b / b.norm()))
    ref = (torch.sin(0.7 * theta) * a + torch.sin(0.3 * theta) * b) / torch.sin(theta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_registry_matches_mergekit_parameters_and_defaults():
    mk = pytest.importorskip("mergekit.merge_methods")
    for name, spec in METHODS.items():
        theirs = {p.name: p for p in mk.get(name).spec.parameters}
        assert set(theirs) == set(spec.params), name
        for pname, param in {**spec.model_params, **spec.shared_params}.items():
            if theirs[pname].required:
                assert param.default is REQUIRED, (name, pname)
            else:
                assert param.default == theirs[pname].default, (name, pname)
    assert method_spec("ties").normalize_default is True
    assert method_spec("dare_ties").normalize_default is False
    assert method_spec("slerp").normalize_default is None


# --- the contract, over every registered method ---------------------------------------------

def _value(spec, key: str, i: int = 0):
    """A valid, non-trivial value of parameter `key` of `spec` (model i's, for per-model ones)."""
    p = spec.model_params.get(key) or spec.shared_params[key]
    if key == "weight":
        return 0.5 + 0.1 * i
    if key == "t":
        return 0.4
    if isinstance(p.search, tuple):
        lo, hi = p.search
        return lo + (hi - lo) * (0.6 if p.type is float else 0.5)
    return p.default if p.default is not REQUIRED and p.default is not None else 0.6


def recipe(method: str, n: int = 3, **over) -> TensorRecipe:
    spec = METHODS[method]
    n = n if spec.max_models is None else min(n, spec.max_models)
    base = 0 if spec.needs_base else None
    params = tuple({} if i == base else {k: _value(spec, k, i) for k in spec.model_params} for i in range(n))
    shared = {k: _value(spec, k) for k in spec.shared_params}
    kw = dict(tensor="model.layers.0.mlp.up_proj.weight", method=method, models=tuple(f"m{i}" for i in range(n)),
              inputs=("model.layers.0.mlp.up_proj.weight",) * n, base=base, params=params, shared=shared)
    kw.update(over)
    return TensorRecipe(**kw)


INPUTS = [rand(6, 7, seed=s) for s in range(3)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract_shapes_dtypes_determinism(method):
    r = recipe(method)
    xs = INPUTS[: len(r.models)]
    out = merge_tensor(r, xs)
    assert out.shape == xs[0].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert bits_equal(out, merge_tensor(r, xs))  # deterministic, dare included (fixed seed)
    half = merge_tensor(r, [x.bfloat16() for x in xs])
    assert half.dtype == torch.bfloat16
    assert merge_tensor(r, xs, out_dtype=torch.float16).dtype == torch.float16
    one_d = merge_tensor(r, [x[0] for x in xs])
    assert one_d.shape == (7,)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract_bad_inputs_are_one_line_errors(method):
    spec = METHODS[method]
    xs = INPUTS[: len(recipe(method).models)]
    if spec.needs_base:
        with pytest.raises(MergeSearchError, match=f"{method} needs a base_model"):
            merge_tensor(recipe(method, base=None), xs)
    if spec.max_models is not None:
        n = spec.max_models + 1
        with pytest.raises(MergeSearchError, match=f"(exactly|at most) {spec.max_models} models"):
            merge_tensor(recipe(method, models=tuple("abcdefgh"[:n]), inputs=("x",) * n, params=({},) * n),
                         [rand(6, 7, seed=s) for s in range(n)])
    if "density" in spec.searched_model_params:
        bad = tuple({**p, "density": 1.5} if p else p for p in recipe(method).params)
        with pytest.raises(MergeSearchError, match=r"density must be in \(0, 1\]"):
            merge_tensor(recipe(method, params=bad), xs)
    if "weight" in spec.model_params:
        r = recipe(method, shared={**recipe(method).shared, "normalize": True})
        zero = tuple({**p, "weight": w} if p else p for p, w in zip(r.params, (1.0, -1.0, 0.0) if r.base is None
                                                                    else (0, 1.0, -1.0)))
        with pytest.raises(MergeSearchError, match="sum to 0"):
            merge_tensor(TensorRecipe(**{**r.__dict__, "params": zero}), xs)
    with pytest.raises(MergeSearchError, match=r"unknown merge method 'nope'; known: linear, task_arithmetic"):
        merge_tensor(TensorRecipe(**{**recipe(method).__dict__, "method": "nope"}), xs)
    nan = INPUTS[1].clone()
    nan[2, 3] = float("nan")
    with pytest.raises(MergeSearchError, match=r"tensor w of m1 \(/x/model.safetensors\): 1 NaN/inf"):
        check_finite(nan, "tensor w of m1 (/x/model.safetensors)")


# What each method's math says for equal inputs and for one-hot weights. Methods outside
# IDENTITY_EXEMPT give x back when every input is x; outside ONE_HOT_EXEMPT, weight 1 on one
# model and 0 on the others gives that model back (up to float rounding where noted).
IDENTITY_EXEMPT: dict[str, str] = {
    "passthrough": "the contract's recipe sets scale 0.6 (its default is None) and passthrough returns 0.6·x; "
                   "scale None gives x back bit for bit (tests/test_method_passthrough.py)",
}
ONE_HOT_EXEMPT: dict[str, str] = {
    "ties": "one-hot weights still trim the chosen task vector to its density",
    "dare_linear": "one-hot weights still drop and rescale the chosen task vector",
    "dare_ties": "one-hot weights still drop and rescale the chosen task vector",
    "breadcrumbs": "one-hot weights still trim the chosen task vector's smallest and largest elements",
    "breadcrumbs_ties": "one-hot weights still trim the chosen task vector's smallest and largest elements",
    "della": "one-hot weights still drop (by magnitude rank) and rescale the chosen task vector",
    "della_linear": "one-hot weights still drop (by magnitude rank) and rescale the chosen task vector",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract_equal_inputs_give_that_input(method):
    if method in IDENTITY_EXEMPT:
        pytest.skip(IDENTITY_EXEMPT[method])
    r = recipe(method)
    x = INPUTS[0]
    out = merge_tensor(r, [x.clone() for _ in r.models])
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if "weight" in METHODS[m].model_params))
def test_contract_one_hot_weights_give_that_source(method):
    if method in ONE_HOT_EXEMPT:
        pytest.skip(ONE_HOT_EXEMPT[method])
    r = recipe(method)
    idx = [i for i in range(len(r.models)) if i != r.base]
    xs = [rand(6, 7, seed=10 + i) for i in range(len(r.models))]
    for chosen in idx:
        params = tuple(p if i == r.base else {**p, "weight": 1.0 if i == chosen else 0.0}
                       for i, p in enumerate(r.params))
        out = merge_tensor(TensorRecipe(**{**r.__dict__, "params": params}), xs)
        torch.testing.assert_close(out, xs[chosen], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].random))
def test_contract_random_methods_are_fixed_by_their_seed(method):
    r = recipe(method)
    xs = INPUTS[: len(r.models)]
    assert bits_equal(merge_tensor(r, xs, seed=3), merge_tensor(r, xs, seed=3))
    assert not bits_equal(merge_tensor(r, xs, seed=3), merge_tensor(r, xs, seed=4))
