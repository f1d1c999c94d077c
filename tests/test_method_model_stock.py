"""model_stock: closed forms of the interpolation ratio on hand-made task vectors, filter_wise rows,
and parity with real mergekit (fp32: bit-identical for every filter_wise setting and for the
exported config of its (empty) search space)."""
from __future__ import annotations

import pytest
import torch

from search.errors import MergeSearchError
from search.mergeconfig import TensorRecipe
from search.methods import METHODS, merge_tensor, parameter_free
from search.methods.model_stock import model_stock

BASE = torch.tensor([1.0, -2.0, 0.5, 3.0])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def models(*deltas):
    return [BASE + torch.tensor(d) for d in deltas]


# --- closed forms: t = N cos / (1 + (N-1) cos), out = t·mean + (1-t)·base --------------------

def test_orthogonal_task_vectors_give_the_base():
    assert bits_equal(model_stock(BASE, models([1.0, 0, 0, 0], [0, 2.0, 0, 0])), BASE)


def test_parallel_task_vectors_give_the_average():
    xs = models([1.0, 2.0, 0, -1.0], [2.0, 4.0, 0, -2.0])  # cos 1: t = 2 / 2 = 1
    torch.testing.assert_close(model_stock(BASE, xs), (xs[0] + xs[1]) / 2, rtol=1e-6, atol=1e-6)


def test_half_cosine_interpolates_two_thirds_of_the_way():
    xs = models([1.0, 1.0, 0, 0], [1.0, 0, 1.0, 0])  # cos 1/2: t = 1 / 1.5
    mean = (xs[0] + xs[1]) / 2
    torch.testing.assert_close(model_stock(BASE, xs), BASE + (mean - BASE) * 2 / 3, rtol=1e-6, atol=1e-6)


def test_three_models_use_the_mean_pairwise_cosine():
    # cosines: (d1, d2) 1/2, (d1, d3) 0, (d2, d3) 1/2 -> cos 1/3, t = 3·(1/3) / (1 + 2/3) = 3/5
    xs = models([1.0, 1.0, 0, 0], [1.0, 0, 1.0, 0], [0, 0, 1.0, 1.0])
    mean = (xs[0] + xs[1] + xs[2]) / 3
    torch.testing.assert_close(model_stock(BASE, xs), BASE + (mean - BASE) * 3 / 5, rtol=1e-6, atol=1e-6)


def test_opposite_task_vectors_are_singular_and_keep_the_base():
    assert bits_equal(model_stock(BASE, models([1.0, -1.0, 2.0, 0], [-1.0, 1.0, -2.0, 0])), BASE)  # den = 1 - 1


def test_filter_wise_takes_one_ratio_per_row():
    base = torch.stack([BASE, BASE])
    a = base + torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    b = base + torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0]])  # row 0 parallel (t 1), row 1 orthogonal (t 0)
    out = model_stock(base, [a, b], filter_wise=True)
    torch.testing.assert_close(out[0], (a[0] + b[0]) / 2, rtol=1e-6, atol=1e-6)
    assert bits_equal(out[1], BASE)
    # whole tensor: one cosine 3 / (√2·√10) for both rows
    cos = 3 / 20**0.5
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(model_stock(base, [a, b]), base + t * ((a + b) / 2 - base), rtol=1e-6, atol=1e-6)
    xs = models([1.0, 2.0, 0, -1.0], [0.5, -1.0, 1.0, 0])
    assert bits_equal(model_stock(BASE, xs, filter_wise=True), model_stock(BASE, xs))  # 1-D: one row


def test_fp32_math_rounded_once_and_bad_inputs():
    g = torch.Generator().manual_seed(1)
    base, a, b = (torch.randn(6, 5, generator=g) for _ in range(3))
    half = [x.bfloat16() for x in (base, a, b)]
    out = model_stock(half[0], half[1:])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, model_stock(half[0].float(), [x.float() for x in half[1:]]).bfloat16())
    with pytest.raises(MergeSearchError, match="model_stock needs at least 2 models besides the base but got 1"):
        model_stock(base, [a])
    r = TensorRecipe("w", "model_stock", ("base", "m0"), ("w", "w"), 0, ({}, {}), {"filter_wise": False})
    with pytest.raises(MergeSearchError, match="model_stock takes at least 3 models, the base included, but got 2"):
        merge_tensor(r, [base, a])
    assert parameter_free(METHODS["model_stock"])


# --- parity with mergekit ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    pytest.importorskip("mergekit")
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("model_stock"), torch.float32)


SETTINGS = {
    "default": None,
    "filter_wise": True,
    "gradient": [False, True],  # bools pick per layer: values[int(t·(len-1))]
    "filtered": [{"filter": "self_attn", "value": True}, {"value": False}],
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fp32_bit_identical_to_mergekit(setting, fam, tmp_path):
    from test_parity import compare, run_both

    cfg = {"merge_method": "model_stock", "base_model": fam["base"], "dtype": "float32",
           "models": [{"model": fam[m]} for m in ("m0", "m1", "m2")]}
    if SETTINGS[setting] is not None:
        cfg["parameters"] = {"filter_wise": SETTINGS[setting]}
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


def test_exported_config_merges_identically_in_mergekit(fam, tmp_path):
    from search.space import MergeSpace
    from test_parity import LAYERS, compare, run_both

    space = MergeSpace("model_stock", {n: fam[n] for n in ("m0", "m1")}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    assert space.n_params == 0
    theirs, ours = run_both(space.to_config(space.uniform_values([0.5, 0.5])), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"
