"""sce: closed forms on hand-made tensors, the selection's tie rule and cached-rank path, and
parity with real mergekit (fp32: bit-identical for global, gradient and filtered select_topk, and
for the exported search config)."""
from __future__ import annotations

import pytest
import torch

from search.errors import MergeSearchError
from search.methods.sce import select_count, select_mask, sce, variance_rank

Z = torch.zeros(4)
A = torch.tensor([2.0, -1.0, 4.0, 0.0])
B = torch.tensor([-2.0, 3.0, 2.0, 1.0])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --- closed forms -----------------------------------------------------------------------------

def test_one_model_without_selection_gives_it_back():
    assert bits_equal(sce(Z, [A]), A)


def test_energy_weights_over_the_agreeing_signs():
    # sum = [0, 2, 6, 1] >= 0 everywhere: + wins; a agrees at 0 and 2, b at 1, 2 and 3.
    # w ∝ mean(d²): a 21/4, b 18/4 -> 21/39, 18/39; at 2 both agree: (4·21 + 2·18) / 39.
    out = sce(Z, [A, B])
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, 120 / 39, 1.0]), rtol=1e-6, atol=0)


def test_selection_keeps_the_top_variance_elements_then_reweights():
    # var over (a, b) = ((a-b)/2)²: [4, 4, 1, 0.25]; select_topk 0.5 of 4 nonzero: the first two.
    # Then a = [2, -1, 0, 0], b = [-2, 3, 0, 0]: + wins, each element its one agreeing model.
    assert torch.equal(select_mask(torch.stack([A, B]), 0.5), torch.tensor([True, True, False, False]))
    torch.testing.assert_close(sce(Z, [A, B], 0.5), torch.tensor([2.0, 3.0, 0.0, 0.0]), rtol=1e-6, atol=0)
    # tied variances (elements 0 and 1): the lower index is kept first
    assert torch.equal(select_mask(torch.stack([A, B]), 0.25), torch.tensor([True, False, False, False]))


def test_select_count_counts_only_nonzero_variances_in_fp32():
    a, b = torch.tensor([1.0, 5.0, 3.0, 7.0]), torch.tensor([1.0, 5.0, 0.0, 0.0])
    # two elements vary: int(2 · 0.5) = 1, the larger variance (element 3)
    assert torch.equal(select_mask(torch.stack([a, b]), 0.5), torch.tensor([False, False, False, True]))
    # mergekit's k is int(int64 tensor · float): an fp32 product, not the exact one
    for nonzero, frac in [(7, 0.3), (2**24 + 3, 0.7), (123456789, 0.999999), (2**31 + 5, 0.3)]:
        assert select_count(nonzero, frac) == int(torch.tensor(nonzero) * frac)
    assert select_count(2**24 + 3, 0.7) != int((2**24 + 3) * 0.7)


def test_select_topk_zero_or_less_keeps_nothing_and_gives_the_base():
    base = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    xs = [base + torch.randn(5, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for frac in (0.0, -1.0, 0.01):  # 0.01 · 15 nonzero -> k = 0
        assert bits_equal(sce(base, xs, frac), base)


def test_fp32_math_rounded_once_and_bad_values():
    g = torch.Generator().manual_seed(3)
    base, a, b = (torch.randn(6, 5, generator=g) for _ in range(3))
    out = sce(base.bfloat16(), [a.bfloat16(), b.bfloat16()], 0.6)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sce(base.bfloat16().float(), [a.bfloat16().float(), b.bfloat16().float()], 0.6).bfloat16())
    with pytest.raises(MergeSearchError, match="sce: select_topk must be a number but got nan"):
        sce(base, [a, b], float("nan"))
    with pytest.raises(MergeSearchError, match="sce: inputs have different shapes"):
        sce(base, [a, b[:3]])


# --- the selection: mergekit's, and the cacheable rank --------------------------------------

def test_selection_equals_mergekits_where_no_variance_ties_and_keeps_the_same_variances_where_they_do():
    from mergekit.merge_methods.sce import sce_mask

    g = torch.Generator().manual_seed(5)
    noisy = torch.randn(3, 40, 50, generator=g)
    tied = torch.randint(-3, 4, (3, 40, 50), generator=g).float()  # few distinct variances
    for frac in (0.05, 0.3, 0.5, 0.77, 0.999):
        assert torch.equal(select_mask(noisy, frac), sce_mask(noisy, frac).bool())
        ours, theirs = select_mask(tied, frac), sce_mask(tied, frac).bool()
        v = torch.var(tied, dim=0, unbiased=False)
        assert int(ours.sum()) == int(theirs.sum())
        assert torch.equal(v[ours].sort().values, v[theirs].sort().values)  # only tied elements swap


def test_cached_rank_gives_the_same_selection_and_bits():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(30, 20, generator=g)
    xs = [base + torch.randint(-2, 3, (30, 20), generator=g).float() * 0.01 for _ in range(3)]  # many ties
    deltas = torch.stack([x - base for x in xs])
    ranks = variance_rank(deltas)
    assert ranks[1] == int(torch.count_nonzero(torch.var(deltas, dim=0, unbiased=False)))
    for frac in (0.0, 0.1, 0.35, 0.5, 0.9, 1.0):
        assert torch.equal(select_mask(deltas, frac, ranks), select_mask(deltas, frac))
        assert bits_equal(sce(base, xs, frac, ranks=ranks), sce(base, xs, frac))


# --- parity with mergekit ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    pytest.importorskip("mergekit")
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("sce"), torch.float32)


SETTINGS = {
    "default": None,
    "global": 0.5,
    "gradient": [0.2, 0.9, 0.6],
    "filtered": [{"filter": "mlp", "value": [0.3, 0.7]}, {"filter": "self_attn", "value": 0.15}, {"value": 0.8}],
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fp32_bit_identical_to_mergekit(setting, fam, tmp_path):
    from test_parity import compare, run_both

    cfg = {"merge_method": "sce", "base_model": fam["base"], "dtype": "float32",
           "models": [{"model": fam[m]} for m in ("m0", "m1", "m2")]}
    if SETTINGS[setting] is not None:
        cfg["parameters"] = {"select_topk": SETTINGS[setting]}
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


def test_exported_search_config_merges_identically_in_mergekit(fam, tmp_path):
    import optuna

    from search.space import MergeSpace
    from test_parity import LAYERS, compare, run_both

    space = MergeSpace("sce", {n: fam[n] for n in ("m0", "m1", "m2")}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    assert space.shared_keys == ("select_topk",) and space.model_keys == ()
    values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask())
    config = space.to_config(values)
    assert isinstance(config["parameters"]["select_topk"], list)  # per filter, per layer
    theirs, ours = run_both(config, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"


def test_the_in_memory_merger_caches_sces_ranks_once_per_tensor(tmp_path):
    """The variance ranks depend only on the sources: computed at the first merge with
    select_topk < 1, reused at any other select_topk, none kept for select_topk 1; the merges
    equal the tensor function's without the cache (merge-search merge)."""
    from search.checkpoints import open_checkpoint
    from search.merger import InMemoryMerger
    from search.methods import merge_tensor
    from search.mergeconfig import parse_merge_config, resolve
    from tiny import make_family, save_tiny_model

    paths = make_family(tmp_path / "m", n=3)
    base = save_tiny_model(tmp_path / "m" / "base", seed=7)
    merger = InMemoryMerger([open_checkpoint(f"m{i}", p) for i, p in enumerate(paths)],
                            base=open_checkpoint("base", base))

    def config(k):
        return {"merge_method": "sce", "base_model": str(base), "parameters": {"select_topk": k},
                "models": [{"model": str(p)} for p in paths]}

    merger.apply(config(1.0))
    assert not [k for k in merger._cache if k[1] == "group"]
    merger.apply(config(0.5))
    groups = [k for k in merger._cache if k[1] == "group"]
    assert len(groups) == len(merger.segments)  # one per tensor, for all three models at once
    for k in (0.3, 0.5):
        merger.apply(config(k))
        assert len([k for k in merger._cache if k[1] == "group"]) == len(groups)
        cfg = parse_merge_config(config(k))
        name = "model.layers.0.mlp.up_proj.weight"
        rec = resolve(cfg, name, merger.num_layers)
        from safetensors.torch import load_file

        tensors = [load_file(str(p / "model.safetensors"))[name] for p in (*paths, base)]
        order = {str(p): t for p, t in zip((*paths, base), tensors)}
        want = merge_tensor(rec, [order[m] for m in rec.models])
        assert torch.equal(merger.model.state_dict()[name], want)
