"""passthrough: closed forms, bit-parity with mergekit 0.1.5 in fp32 on `slices:` configs that
stack layers (with and without `scale`, global / gradient / filtered), one-model `models:`
configs, and the search space's one-line refusal (there is nothing to search)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.errors import MergeSearchError
from search.methods import METHODS
from search.methods.passthrough import SPEC, passthrough


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


X = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))


# --- closed forms -----------------------------------------------------------------------------

def test_no_scale_is_the_input_bit_for_bit_in_a_new_tensor():
    out = passthrough(X)
    assert bits_equal(out, X) and out.data_ptr() != X.data_ptr()
    neg_zero = torch.tensor([-0.0, 1.5])
    assert bits_equal(passthrough(neg_zero), neg_zero)


def test_scale_multiplies_once_in_fp32():
    assert passthrough(torch.tensor([1.0, -3.0, 0.25]), 2.0).tolist() == [2.0, -6.0, 0.5]
    assert bits_equal(passthrough(X, 0.3), X * 0.3)
    half = X.bfloat16()
    assert bits_equal(passthrough(half, 0.3), (half.float() * 0.3).bfloat16())
    assert bits_equal(passthrough(X, out_dtype=torch.bfloat16), X.bfloat16())
    assert passthrough(half, out_dtype=torch.float32).dtype == torch.float32


def test_spec_takes_exactly_one_model_and_searches_nothing():
    assert METHODS["passthrough"] is SPEC
    assert (SPEC.min_models, SPEC.max_models, SPEC.needs_base) == (1, 1, False)
    assert SPEC.model_params["scale"].default is None and SPEC.model_params["scale"].search is None
    assert not SPEC.searched_model_params and not SPEC.searched_shared_params


def test_search_space_refuses_it_in_one_line(tmp_path):
    from search.space import MergeSpace

    for models in ({"a": "x"}, {"a": "x", "b": "y"}):
        with pytest.raises(MergeSearchError) as err:
            MergeSpace("passthrough", models)
        assert "\n" not in str(err.value)
        assert str(err.value) == ("passthrough takes one model: there is nothing to merge or search "
                                  "(use it in a `slices:` config with merge-search merge)")


# --- parity with mergekit (fp32) --------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("passthrough"), torch.float32)


def _stack(fam, ranges, scales=None):
    """slices: one source per slice, (model, layer_range) from `ranges`, optional scale per slice."""
    slices = []
    for k, (m, r) in enumerate(ranges):
        src = {"model": fam[m], "layer_range": list(r)}
        if scales is not None:
            src["parameters"] = {"scale": scales[k]}
        slices.append({"sources": [src]})
    return {"merge_method": "passthrough", "dtype": "float32", "slices": slices}


STACK = [("m0", (0, 2)), ("m1", (2, 4))]
CASES = {
    "stack": lambda fam: _stack(fam, STACK),
    "global_scale": lambda fam: _stack(fam, STACK, [0.5, 1.25]),
    "gradient_scale": lambda fam: _stack(fam, STACK, [[0.0, 2.0], [1.0, 0.3]]),
    "filtered_scale": lambda fam: _stack(fam, STACK, [[{"filter": "self_attn", "value": 0.0},
                                                       {"filter": "embed", "value": [0.5, 0.7]}, {"value": 1.1}],
                                                      0.9]),
    # a frankenmerge that repeats layers: 0-2 of m0, then 1-3 of m2 (6 output layers)
    "duplicated_layers": lambda fam: _stack(fam, [("m0", (0, 3)), ("m2", (1, 4))]),
    "one_model_models": lambda fam: {"merge_method": "passthrough", "dtype": "float32",
                                     "models": [{"model": fam["m1"], "parameters": {"scale": 0.75}}]},
    "slice_level_scale": lambda fam: {**_stack(fam, STACK), "parameters": {"scale": 0.6}},
}
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_bit_identical_to_mergekit(fam, case, tmp_path):
    from test_parity import compare, read_folder, run_both

    cfg = CASES[case](fam)
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"
    if case == "global_scale":  # the stack really is m0's layers 0-1 then m1's layers 2-3, scaled
        m0, m1 = read_folder(Path(fam["m0"])), read_folder(Path(fam["m1"]))
        q = "model.layers.{}.self_attn.q_proj.weight"
        assert bits_equal(ours[q.format(1)], m0[q.format(1)] * 0.5)
        assert bits_equal(ours[q.format(3)], m1[q.format(3)] * 1.25)
        assert bits_equal(ours["model.embed_tokens.weight"], m0["model.embed_tokens.weight"] * 0.5)
        assert bits_equal(ours["lm_head.weight"], m1["lm_head.weight"] * 1.25)  # the last slice's


def test_two_models_are_refused_in_one_line(fam, tmp_path):
    from search.writer import merge_to_folder

    (tmp_path / "c.yaml").write_text(
        f"merge_method: passthrough\nmodels:\n  - model: {fam['m0']}\n  - model: {fam['m1']}\n")
    want = r"models: passthrough takes exactly 1 models, the base included, but got 2"
    with pytest.raises(MergeSearchError, match=want):
        merge_to_folder(tmp_path / "c.yaml", tmp_path / "out")
