"""nearswap: closed forms on hand-made tensors, the documented op order, the fused kernel, and
bit-parity with mergekit 0.1.5 in fp32 (global, gradient, filtered, slices, and the exported
search config)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.methods import METHODS
from search.methods.nearswap import NEARSWAP_EPS, SPEC, _args, _kernel, _probe, nearswap


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- closed forms -----------------------------------------------------------------------------

def test_near_elements_swap_far_ones_move_by_t():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.0])
    b = torch.tensor([0.5, -0.25, 3.0, -3.0, 2.0, 4.0])
    # |b-a| = .5, .25 (<= t: b), 2, 4 (> t: a moved by t towards b), 0 (eps: b), 4
    assert nearswap(a, b, 0.5).tolist() == [0.5, -0.25, 1.5, 0.5, 2.0, 0.5]
    assert nearswap(a, b, 1.0).tolist() == [0.5, -0.25, 2.0, 0.0, 2.0, 1.0]


def test_t_zero_is_the_base_and_a_large_t_the_other_model():
    a, b = rand(8, 5, seed=1), rand(8, 5, seed=2)
    assert bits_equal(nearswap(a, b, 0.0), a)
    assert bits_equal(nearswap(a, b, 1e9), b)
    assert bits_equal(nearswap(a, a.clone(), 0.3), a)  # |d| = 0 counts as eps: w = 1, out = b


def test_is_the_base_plus_the_task_vector_clipped_to_t():
    a = rand(64, 33, seed=3)
    b = a + 1e-3 * rand(64, 33, seed=4)
    for t in (1e-4, 5e-4, 2e-3):
        torch.testing.assert_close(nearswap(a, b, t), a + (b - a).clamp(-t, t), rtol=0, atol=1e-6)


def test_differences_below_eps_count_as_eps():
    a, b = torch.zeros(1), torch.full((1,), 5e-7)
    # w = 1e-7 / max(5e-7, 1e-6) = 0.1, not 0.2
    torch.testing.assert_close(nearswap(a, b, 1e-7), torch.full((1,), 0.1 * 5e-7))
    assert NEARSWAP_EPS == 1e-6


def test_follows_the_documented_op_order_bit_for_bit():
    a, b = rand(100_000, seed=5), rand(100_000, seed=6)
    t = 0.37
    w = (a - b).abs().clamp(min=1e-6).reciprocal() * t
    w = w.clamp(0, 1)
    assert bits_equal(nearswap(a, b, t), w * b + (1 - w) * a)
    true_div = (t / (a - b).abs().clamp(min=1e-6).double()).float().clamp(0, 1)
    assert not bits_equal(nearswap(a, b, t), true_div * b + (1 - true_div) * a)  # the order matters


def test_rounds_half_precision_once_from_fp32():
    a, b = rand(40, 7, seed=7).bfloat16(), rand(40, 7, seed=8).bfloat16()
    out = nearswap(a, b, 0.3)
    assert out.dtype == torch.bfloat16
    assert bits_equal(out, nearswap(a.float(), b.float(), 0.3).bfloat16())
    assert nearswap(a, b, 0.3, out_dtype=torch.float32).dtype == torch.float32


def test_fused_kernel_gives_the_tensor_function_bits():
    from types import SimpleNamespace

    xs = tuple(rand(10_007, seed=s) for s in (9, 10, 11))
    a, b, t = _probe(xs, torch.device("cpu"))
    out = torch.empty_like(a)
    _kernel(a, b, t, out)
    assert bits_equal(out, nearswap(a, b, float(t)))
    f = SimpleNamespace(base=a, members=(b,), recipe=SimpleNamespace(shared={"t": 0.05}))
    _kernel(*_args(f), out)
    assert bits_equal(out, nearswap(a, b, 0.05))
    half = torch.empty(a.shape, dtype=torch.bfloat16)
    _kernel(a.bfloat16(), b.bfloat16(), t, half)
    assert bits_equal(half, nearswap(a.bfloat16(), b.bfloat16(), float(t)))


def test_spec_searches_t_and_takes_the_base_first():
    assert METHODS["nearswap"] is SPEC
    assert SPEC.needs_base and SPEC.base_is_first_model and (SPEC.min_models, SPEC.max_models) == (2, 2)
    assert SPEC.searched_shared_params == ("t",) and SPEC.shared_params["t"].search == (0.0, 1e-3)
    assert SPEC.baselines(["a", "b"]) == [("a", {"t": [0.0]}), ("t=0.0001", {"t": [1e-4]})]


# --- parity with mergekit (fp32) --------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("nearswap"), torch.float32)


T = {"global": 5e-4, "gradient": [1e-4, 1e-3, 3e-4],
     "filtered": [{"filter": "self_attn", "value": [2e-4, 8e-4]}, {"filter": "mlp", "value": 5e-4}, {"value": 1e-4}]}


def _config(fam, gran):
    cfg = {"merge_method": "nearswap", "base_model": fam["base"], "dtype": "float32"}
    if gran == "slices":
        cfg["slices"] = [{"sources": [{"model": fam[m], "layer_range": r} for m in ("base", "m0")],
                          "parameters": {"t": t}} for r, t in (([0, 2], T["global"]), ([2, 4], T["gradient"]))]
    else:
        cfg["models"] = [{"model": fam["base"]}, {"model": fam["m0"]}]
        cfg["parameters"] = {"t": T[gran]}
    return cfg


@pytest.mark.parametrize("gran", ["global", "gradient", "filtered", "slices"])
def test_fp32_bit_identical_to_mergekit(fam, gran, tmp_path):
    from test_parity import compare, read_folder, run_both

    theirs, ours = run_both(_config(fam, gran), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"
    # the t values meet both branches: some elements swapped to m0, some only moved by t
    base, m0 = read_folder(Path(fam["base"])), read_folder(Path(fam["m0"]))
    name = "model.layers.0.mlp.up_proj.weight"
    swapped = float((ours[name] == m0[name]).float().mean())
    assert 0.05 < swapped < 0.95, swapped


def test_exported_search_config_merges_identically_in_mergekit(fam, tmp_path):
    import optuna

    from search.space import MergeSpace
    from test_parity import LAYERS, compare, run_both

    space = MergeSpace("nearswap", {"base": fam["base"], "m0": fam["m0"]}, granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask())
    config = space.to_config(values)
    assert config["base_model"] == fam["base"] and [m["model"] for m in config["models"]] == [fam["base"], fam["m0"]]
    assert all(0 <= v <= 1e-3 for cell in values.values() for v in cell["t"])
    theirs, ours = run_both(config, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"
