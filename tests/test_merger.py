"""InMemoryMerger: closed forms, in-place semantics, bit-parity with `merge-search merge` for every
method and granularity, the streaming path, bad sources."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.checkpoints import open_checkpoint
from search.errors import CheckpointError, MergeSearchError
from search.export import to_yaml
from search.merger import InMemoryMerger
from search.methods import METHODS
from search.space import MergeSpace
from search.writer import merge_to_folder
from tiny import make_family, save_tiny_model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base = save_tiny_model(root / "base", seed=10)
    # variants near the base, as fine-tunes are, so slerp and TIES see realistic task vectors
    state = load_file(str(base / "model.safetensors"))
    paths = []
    for i, scale in enumerate((0.05, 0.3, 0.1)):
        p = save_tiny_model(root / f"m{i}", seed=i)
        g = torch.Generator().manual_seed(100 + i)
        noisy = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file(noisy, str(p / "model.safetensors"), metadata={"format": "pt"})
        paths.append(p)
    return paths, base


def _states(paths):
    return [load_file(str(p / "model.safetensors")) for p in paths]


def _merger(paths, base=None, **kw):
    ckb = open_checkpoint("base", base) if base else None
    return InMemoryMerger([open_checkpoint(f"m{i}", p) for i, p in enumerate(paths)], base=ckb, **kw)


def _linear(paths, weights, normalize=True):
    return {"merge_method": "linear", "parameters": {"normalize": normalize},
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]}


def test_single_source_weights_reproduce_each_source_exactly(family):
    paths, _ = family
    merger, states = _merger(paths), _states(paths)
    for i in range(3):
        merger.apply(_linear(paths, [1.0 if j == i else 0.0 for j in range(3)]))
        live = merger.model.state_dict()
        for name, t in states[i].items():
            assert torch.equal(live[name], t), name


def test_uniform_is_the_mean_and_normalize_divides_by_the_sum(family):
    paths, _ = family
    merger, states = _merger(paths), _states(paths)
    merger.apply(_linear(paths, [5.0, 5.0, 5.0]))
    live = merger.model.state_dict()
    for name in states[0]:
        mean = sum(s[name].double() for s in states) / 3
        torch.testing.assert_close(live[name].double(), mean, rtol=0, atol=1e-6)
    merger.apply(_linear(paths, [2.0, 0.0, -1.0], normalize=False))
    name = "lm_head.weight"
    expected = 2 * states[0][name].double() - states[2][name].double()
    torch.testing.assert_close(merger.model.state_dict()[name].double(), expected, rtol=0, atol=1e-6)


def test_apply_writes_in_place_without_new_buffers(family):
    paths, base = family
    merger = _merger(paths, base)
    ptrs = {n: p.data_ptr() for n, p in merger.model.named_parameters()}
    out_ptr, buf_ptr = merger.out.data_ptr(), merger.buffer.data_ptr()
    before = merger.model.model.layers[1].self_attn.q_proj.weight.clone()
    merger.apply(_linear(paths, [0.1, 0.2, 0.7]))
    merger.apply({**_linear(paths, [0.6, 0.3, 0.1]), "merge_method": "task_arithmetic", "base_model": str(base)})
    assert {n: p.data_ptr() for n, p in merger.model.named_parameters()} == ptrs
    assert (merger.out.data_ptr(), merger.buffer.data_ptr()) == (out_ptr, buf_ptr)
    assert merger.out.shape == (merger.numel,)
    assert not torch.equal(merger.model.model.layers[1].self_attn.q_proj.weight, before)
    lo, hi = out_ptr, out_ptr + merger.numel * merger.out.element_size()
    assert all(lo <= p.data_ptr() < hi for p in merger.model.parameters())


def test_live_model_output_equals_the_source_model(family):
    from transformers import LlamaForCausalLM

    paths, _ = family
    merger = _merger(paths)
    merger.apply(_linear(paths, [0.0, 1.0, 0.0]))
    ref = LlamaForCausalLM.from_pretrained(paths[1]).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.inference_mode():
        assert torch.equal(merger.model(ids).logits, ref(ids).logits)


def _inputs(method, paths, base):
    """The sources and the base row a method takes, from the family (3 sources and a base)."""
    spec = METHODS[method]
    n = len(paths) if spec.max_models is None else min(len(paths), spec.max_models - spec.base_row)
    return paths[:n], (base if spec.base_row else None)


def _space(method, paths, base, **kw):
    paths, base = _inputs(method, paths, base)
    models = {f"m{i}": str(p) for i, p in enumerate(paths)}
    return MergeSpace(method, models, base=None if base is None else str(base), num_layers=2, **kw)


def _some_values(space, seed):
    """Deterministic non-trivial values for every cell of `space`."""
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return space.suggest(trial)


SEARCHABLE = [m for m, s in METHODS.items() if s.max_models is None or s.max_models - s.base_row >= 2]  # not passthrough


@pytest.mark.parametrize("method", SEARCHABLE)
@pytest.mark.parametrize("shape", ["global", "per_layer", "filtered"])
def test_in_memory_equals_merge_search_merge_bit_for_bit(family, method, shape, tmp_path):
    paths, base = family
    kw = {"global": {}, "per_layer": {"granularity": 1}, "filtered": {"filters": ["self_attn", "mlp"]}}[shape]
    space = _space(method, paths, base, **kw)
    config = space.to_config(_some_values(space, seed=len(method)))
    merger = _merger(*_inputs(method, paths, base))
    merger.apply(config)
    (tmp_path / "c.yaml").write_text(to_yaml(config))
    merge_to_folder(tmp_path / "c.yaml", tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    live = merger.model.state_dict()
    assert set(written) == set(live)
    for name, t in written.items():
        assert torch.equal(live[name], t), name


def test_ties_ranks_are_cached_and_reused(family):
    paths, base = family
    space = _space("ties", paths, base)
    merger = _merger(paths, base)
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.5)))
    first = merger.model.state_dict()["model.layers.0.mlp.up_proj.weight"].clone()
    n_ranks = len(merger._cache)
    assert n_ranks == 3 * len(merger.segments)  # one per model and tensor
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.2)))
    assert len(merger._cache) == n_ranks
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.5)))
    assert torch.equal(merger.model.state_dict()["model.layers.0.mlp.up_proj.weight"], first)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_streaming_from_host_equals_resident(family, method):
    paths, base = family
    space = _space(method, paths, base, granularity=1)
    config = space.to_config(_some_values(space, seed=3))
    resident = _merger(paths, base)
    streamed = _merger(paths, base, budget_bytes=1000)  # far below the rows: forces streaming
    assert resident.resident and not streamed.resident
    resident.apply(config)
    streamed.apply(config)
    assert torch.equal(resident.out, streamed.out)


def test_compiled_kernels_give_the_eager_bits(family):
    paths, base = family
    config = {**_linear(paths, [0.2, 0.5, 0.3])}
    ta = {**_linear(paths, [0.7, -0.2, 0.4], normalize=True), "merge_method": "task_arithmetic",
          "base_model": str(base)}
    ties = {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(p), "parameters": {"weight": w, "density": d}} for p, w, d in zip(paths, (0.5, 0.3, 0.2), (0.3, 1.0, 0.6))]}
    eager, compiled = _merger(paths, base, compile=False), _merger(paths, base, compile=True)
    for cfg in (config, ta, ties):
        eager.apply(cfg)
        compiled.apply(cfg)
        assert torch.equal(eager.out, compiled.out)
    # the probe passed, so the compiled kernels are the ones in use
    assert set(compiled._kernels) == {"linear", "task_arithmetic", "ties"}
    assert all(compiled._kernels[m] is not METHODS[m].kernel.fn for m in compiled._kernels)


def test_bf16_sources_accumulate_in_fp32_and_round_once(tmp_path):
    paths = make_family(tmp_path, n=3, dtype=torch.bfloat16)
    merger, states = _merger(paths, dtype=torch.bfloat16), _states(paths)
    w = [0.2, 0.3, 0.5]
    merger.apply(_linear(paths, w))
    for name in states[0]:
        exact = sum(wi * s[name].double() for wi, s in zip(w, states))
        got = merger.model.state_dict()[name]
        assert got.dtype == torch.bfloat16
        assert (got != exact.to(torch.bfloat16)).float().mean().item() < 0.01, name


def test_tied_embeddings_are_one_parameter(tmp_path):
    paths = make_family(tmp_path, n=2, tie_word_embeddings=True)
    merger = _merger(paths)
    merger.apply(_linear(paths, [0.5, 0.5]))
    assert merger.model.lm_head.weight.data_ptr() == merger.model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in [s.name for s in merger.segments]


def test_nan_in_a_source_is_named(tmp_path):
    paths = make_family(tmp_path, n=2)
    state = load_file(str(paths[1] / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(paths[1] / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
        _merger(paths)


def test_bad_configs(family, tmp_path):
    paths, base = family
    merger = _merger(paths)
    with pytest.raises(MergeSearchError, match="sum"):
        merger.apply(_linear(paths, [0.0, 0.0, 0.0]))
    with pytest.raises(MergeSearchError, match="not a loaded source"):
        merger.apply(_linear([*paths[:2], tmp_path], [0.5, 0.5, 0.5]))
    with pytest.raises(MergeSearchError, match="task_arithmetic needs a base_model"):
        merger.apply({**_linear(paths, [1, 1, 1]), "merge_method": "task_arithmetic"})
