"""InMemoryMerger: closed forms of the linear merge, in-place semantics, bad sources."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.checkpoints import open_checkpoint
from search.errors import CheckpointError, MergeSearchError
from search.merger import InMemoryMerger
from tiny import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), n=3)


def _states(paths):
    return [load_file(str(p / "model.safetensors")) for p in paths]


def _merger(paths, **kw):
    return InMemoryMerger([open_checkpoint(f"m{i}", p) for i, p in enumerate(paths)], **kw)


def test_single_source_weights_reproduce_each_source_exactly(family):
    merger, states = _merger(family), _states(family)
    for i in range(3):
        merger.apply(merger.source_weights(i))
        live = merger.model.state_dict()
        for name, t in states[i].items():
            assert torch.equal(live[name], t), name


def test_uniform_is_the_mean_and_normalize_divides_by_the_sum(family):
    merger, states = _merger(family), _states(family)
    merger.apply([5.0, 5.0, 5.0])  # normalized to 1/3 each
    live = merger.model.state_dict()
    for name in states[0]:
        mean = (states[0][name].double() + states[1][name].double() + states[2][name].double()) / 3
        torch.testing.assert_close(live[name].double(), mean, rtol=0, atol=1e-6)
    merger.apply([3.0, 1.0, 0.0])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = 0.75 * states[0][name].double() + 0.25 * states[1][name].double()
    torch.testing.assert_close(merger.model.state_dict()[name].double(), expected, rtol=0, atol=1e-6)


def test_without_normalize_weights_apply_as_given(family):
    merger, states = _merger(family, normalize=False), _states(family)
    merger.apply([2.0, 0.0, -1.0])
    name = "lm_head.weight"
    expected = 2 * states[0][name].double() - states[2][name].double()
    torch.testing.assert_close(merger.model.state_dict()[name].double(), expected, rtol=0, atol=1e-6)
    assert merger.effective_weights([2.0, 0.0, -1.0]) == [2.0, 0.0, -1.0]


def test_apply_writes_in_place_without_new_buffers(family):
    merger = _merger(family)
    ptrs = {n: p.data_ptr() for n, p in merger.model.named_parameters()}
    out_ptr, buf_ptr = merger.out.data_ptr(), merger.buffer.data_ptr()
    before = merger.model.model.layers[1].self_attn.q_proj.weight.clone()
    merger.apply([0.1, 0.2, 0.7])
    merger.apply([0.6, 0.3, 0.1])
    assert {n: p.data_ptr() for n, p in merger.model.named_parameters()} == ptrs
    assert (merger.out.data_ptr(), merger.buffer.data_ptr()) == (out_ptr, buf_ptr)
    assert merger.out.shape == (merger.numel,)
    assert not torch.equal(merger.model.model.layers[1].self_attn.q_proj.weight, before)
    # every parameter is a view into the one output buffer
    lo, hi = out_ptr, out_ptr + merger.numel * merger.out.element_size()
    assert all(lo <= p.data_ptr() < hi for p in merger.model.parameters())


def test_live_model_output_equals_the_source_model(family):
    from transformers import LlamaForCausalLM

    merger = _merger(family)
    merger.apply(merger.source_weights(1))
    ref = LlamaForCausalLM.from_pretrained(family[1]).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.inference_mode():
        assert torch.equal(merger.model(ids).logits, ref(ids).logits)


def test_bf16_sources_accumulate_in_fp32_and_round_once(tmp_path):
    paths = make_family(tmp_path, n=3, dtype=torch.bfloat16)
    merger, states = _merger(paths, dtype=torch.bfloat16), _states(paths)
    w = [0.2, 0.3, 0.5]
    merger.apply(w)
    for name in states[0]:
        exact = sum(wi * s[name].double() for wi, s in zip(w, states))
        # fp32 accumulation then one rounding: equal to the correctly rounded value almost always
        got = merger.model.state_dict()[name]
        assert got.dtype == torch.bfloat16
        diff = (got != exact.to(torch.bfloat16)).float().mean().item()
        assert diff < 0.01, (name, diff)


def test_tied_embeddings_are_one_parameter(tmp_path):
    paths = make_family(tmp_path, n=2, tie_word_embeddings=True)
    merger = _merger(paths)
    merger.apply([0.5, 0.5])
    assert merger.model.lm_head.weight.data_ptr() == merger.model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in [s.name for s in merger.segments]


def test_nan_in_a_source_is_named(tmp_path):
    paths = make_family(tmp_path, n=2)
    state = load_file(str(paths[1] / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(paths[1] / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
        _merger(paths)


def test_bad_weights(family):
    merger = _merger(family)
    with pytest.raises(MergeSearchError, match="sum to 0"):
        merger.apply([0.0, 0.0, 0.0])
    with pytest.raises(MergeSearchError, match="expected 3 weights but got 2"):
        merger.apply([0.5, 0.5])
