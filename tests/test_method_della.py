"""della and della_linear (search/methods/della.py, della_linear.py): closed forms on small
tensors, and parity with real mergekit on the same YAML in fp32.

Parity: bit-identical at density 1 (nothing dropped); at real densities, bit-identical when both
tools get the same uniform draws (mergekit's `torch.bernoulli(p)` and our `magprune_uniform`
replaced by one fixed draw per tensor shape), which proves the keep probabilities, the rescale
and the combine equal; and with each tool's own generator, the keep rate per magnitude rank and
the rescale factor agree statistically.
"""
from __future__ import annotations

import math

import pytest
import torch

from search.errors import MergeSearchError
from search.mergeconfig import TensorRecipe
from search.methods import METHODS, dare_linear, dare_ties, merge_tensor, task_arithmetic, ties
from search.methods import della as della_module
from search.methods.della import della, keep_probability, magprune_rank, magprune_uniform
from search.methods.della_linear import della_linear

METHODS_HERE = ["della", "della_linear"]
FN = {"della": della, "della_linear": della_linear}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


BASE, A, B = rand(8, 6, seed=1), rand(8, 6, seed=2), rand(8, 6, seed=3)


# --- closed forms ---------------------------------------------------------------------------

def test_ranks_are_ascending_per_row_and_ties_rank_by_position():
    d = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.0, -2.0, 2.0, 0.0]])
    rank = magprune_rank(d)
    assert rank.dtype == torch.int16  # rows of at most 32768: 2 bytes per cached element
    assert rank.tolist() == [[3, 1, 2, 0], [0, 2, 3, 1]]  # |−2| = |2|, 0 = 0: the earlier ranks lower
    assert magprune_rank(torch.tensor([2.0, -5.0, 1.0])).tolist() == [1, 2, 0]  # 1-D: one row
    assert magprune_rank(torch.zeros(40_000)).dtype == torch.int32  # a row too long for int16
    assert magprune_rank(torch.zeros(40_000)).tolist() == list(range(40_000))


def test_keep_probability_runs_linearly_from_density_minus_to_plus_epsilon():
    rank = magprune_rank(torch.tensor([[5.0, -1.0, 3.0, 2.0, -4.0]]))  # ranks 4 0 2 1 3
    p = keep_probability(rank, 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.4, 0.5, 0.45, 0.55]]))
    assert p.dtype == torch.float32 and p.mean().item() == pytest.approx(0.5)
    # fp32 arithmetic exactly as mergekit's: rank_norm = r / (n - 1), then (d - ε) + rank_norm * 2 * ε
    expect = (0.5 - 0.1) + (torch.tensor([[4.0, 0.0, 2.0, 1.0, 3.0]]) / 4) * 2 * 0.1
    assert bits_equal(p, expect)
    one = keep_probability(magprune_rank(torch.tensor(3.0)), 0.4, 0.1)  # one element per row: density
    assert one.shape == () and one.item() == pytest.approx(0.4)


@pytest.mark.parametrize("method", METHODS_HERE)
def test_density_1_drops_nothing_whatever_epsilon(method):
    out = FN[method](BASE, [A, B], [0.6, 0.3], [1.0, 1.0], [0.15, 0.9], name="x")
    expect = (ties(BASE, [A, B], [0.6, 0.3], [1.0, 1.0]) if method == "della"
              else task_arithmetic(BASE, [A, B], [0.6, 0.3]))
    assert bits_equal(out, expect)


@pytest.mark.parametrize("method", METHODS_HERE)
def test_epsilon_0_is_dare_with_the_same_draws(method):
    kw = dict(name="model.layers.0.mlp.up_proj.weight", seed=5)
    out = FN[method](BASE, [A, B], [0.6, 0.3], [0.4, 0.7], [0.0, 0.0], **kw)
    expect = (dare_ties(BASE, [A, B], [0.6, 0.3], [0.4, 0.7], normalize=True, **kw) if method == "della"
              else dare_linear(BASE, [A, B], [0.6, 0.3], [0.4, 0.7], **kw))
    assert bits_equal(out, expect)


def test_drop_rate_follows_the_magnitude_rank_and_rescale_restores_the_l1_norm():
    base, x = torch.zeros(200, 500), rand(200, 500, seed=9)
    plain = della_linear(base, [x], [1.0], [0.4], [0.15], rescale=False, name="t")
    kept = plain != 0
    assert torch.equal(plain[kept], x[kept])  # kept elements untouched without rescale
    rank_norm = magprune_rank(x).float() / 499
    for lo in (0.0, 0.2, 0.4, 0.6, 0.8):  # five rank bins of 100 ranks x 200 rows
        inside = (rank_norm >= lo) & (rank_norm < lo + 0.2 - 1e-6)
        want = 0.25 + 0.3 * rank_norm[inside].mean().item()
        rate = kept[inside].float().mean().item()
        assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / int(inside.sum())), (lo, rate, want)
    scaled = della_linear(base, [x], [1.0], [0.4], [0.15], name="t")  # rescale is on by default
    assert torch.equal(scaled != 0, kept)  # the same draw
    torch.testing.assert_close(scaled.abs().sum(), x.abs().sum())
    factor = (scaled[kept] / x[kept]).mean().item()
    assert factor == pytest.approx(x.abs().sum().item() / x[kept].abs().sum().item(), rel=1e-5)


def test_draws_are_seeded_per_tensor_and_model_and_nested_in_density():
    kw = dict(rescale=False, name="w")
    out = lambda d, **o: della_linear(BASE, [A], [1.0], [d], [0.1], **{**kw, **o}) != BASE  # noqa: E731
    assert torch.equal(out(0.5), out(0.5))
    assert not torch.equal(out(0.5), out(0.5, seed=1))
    assert not torch.equal(out(0.5), out(0.5, name="v"))
    assert not torch.equal(out(0.5), out(0.5, indices=[2]))
    assert not (out(0.3) & ~out(0.6)).any()  # p grows with density at every rank: a subset
    u = magprune_uniform((8, 6), seed=0, name="w", index=1)
    assert bits_equal(u, magprune_uniform((8, 6), seed=0, name="w", index=1)) and u.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS_HERE)
def test_density_plus_or_minus_epsilon_outside_0_1_is_a_one_line_error(method):
    for density, eps in ((0.9, 0.15), (0.1, 0.15), (0.5, 0.5)):
        with pytest.raises(MergeSearchError, match=rf"^{method}: density ± epsilon must lie inside \(0, 1\) but "
                                                   rf"got density {density} and epsilon {eps} at tensor w$"):
            FN[method](BASE, [A], [1.0], [density], [eps], name="w")
    with pytest.raises(MergeSearchError, match=f"{method}: 1 tensors, 2 epsilons"):
        FN[method](BASE, [A], [1.0], [0.5], [0.1, 0.1])


@pytest.mark.parametrize("method", METHODS_HERE)
def test_merge_tensor_with_cached_ranks_gives_the_same_bits(method):
    spec = METHODS[method]
    params = ({}, {"weight": 0.5, "density": 0.3, "epsilon": 0.1}, {"weight": 0.7, "density": 1.0, "epsilon": 0.15})
    shared = {k: p.default for k, p in spec.shared_params.items()}
    r = TensorRecipe("w", method, ("base", "a", "b"), ("w",) * 3, 0, params, shared)
    cache = [None] + [spec.precompute(BASE, x) if spec.cache_when(p) else None for x, p in zip([A, B], params[1:])]
    assert cache[2] is None  # density 1 needs no ranks
    assert cache[1].dtype == torch.int16 and cache[1].shape == A.shape
    assert bits_equal(merge_tensor(r, [BASE, A, B], seed=2, cache=cache), merge_tensor(r, [BASE, A, B], seed=2))


def test_spec_searches_weight_density_and_epsilon_in_ranges_that_stay_valid():
    for method in METHODS_HERE:
        spec = METHODS[method]
        assert spec.searched_model_params == ("weight", "density", "epsilon") and spec.random
        (d_lo, d_hi), (e_lo, e_hi) = spec.model_params["density"].search, spec.model_params["epsilon"].search
        assert d_hi + e_hi < 1 and d_lo - e_hi > 0 and e_lo >= 0
    assert METHODS["della"].normalize_default is True and METHODS["della_linear"].normalize_default is False


# --- parity with mergekit (fp32) ------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    pytest.importorskip("mergekit")
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("della"), torch.float32)


DENSITY = {"global": [0.5, 0.7, 0.3], "gradient": [[0.2, 0.8], 0.7, 0.4],
           "filtered": [[{"filter": "mlp", "value": 0.3}, {"value": 0.8}], 0.5, 0.6]}
EPSILON = {"global": [0.1, 0.15, 0.05], "gradient": [0.1, [0.05, 0.15], 0.12],
           "filtered": [0.1, [{"filter": "self_attn", "value": 0.2}, {"value": 0.05}], 0.15]}


def make_config(method: str, gran: str, fam: dict, density_one: bool = False) -> dict:
    from test_parity import member_params

    models = []
    for i, m in enumerate(["m0", "m1", "m2"]):
        params = {**member_params(method, i, gran), "density": 1.0 if density_one else DENSITY[gran][i],
                  "epsilon": EPSILON[gran][i]}
        models.append({"model": fam[m], "parameters": params})
    shared = {"lambda": 0.9} if method == "della_linear" else {}
    return {"merge_method": method, "base_model": fam["base"], "dtype": "float32", "models": models,
            "parameters": shared}


def _fixed_uniform(numel: int) -> torch.Tensor:
    return torch.rand(numel, generator=torch.Generator().manual_seed(numel + 7))


@pytest.fixture
def same_draws(monkeypatch):
    """One uniform draw per tensor shape for both tools: mergekit's `torch.bernoulli(p)` becomes
    `u < p`, and our `magprune_uniform` returns that u (every model of a tensor shares it)."""
    def bernoulli(p, *args, **kwargs):
        return (_fixed_uniform(p.numel()).reshape(p.shape) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    monkeypatch.setattr(della_module, "magprune_uniform",
                        lambda shape, **kw: _fixed_uniform(math.prod(shape)).reshape(tuple(shape)))


@pytest.mark.parametrize("gran", ["global", "gradient", "filtered"])
@pytest.mark.parametrize("method", METHODS_HERE)
def test_density_1_is_bit_identical_to_mergekit(method, gran, fam, tmp_path):
    from test_parity import compare, run_both

    theirs, ours = run_both(make_config(method, gran, fam, density_one=True), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


@pytest.mark.parametrize("gran", ["global", "gradient", "filtered"])
@pytest.mark.parametrize("method", METHODS_HERE)
def test_same_draws_are_bit_identical_to_mergekit(method, gran, fam, same_draws, tmp_path):
    from test_parity import compare, run_both

    theirs, ours = run_both(make_config(method, gran, fam), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


def test_keep_probabilities_are_mergekits_bit_for_bit(monkeypatch):
    from mergekit.sparsify import della_magprune

    seen = []
    monkeypatch.setattr(torch, "bernoulli", lambda p: seen.append(p.clone()) or torch.ones_like(p))
    for shape in ((37, 53), (301,)):
        x = rand(*shape, seed=len(shape))
        della_magprune(x, 0.45, 0.13)
        assert bits_equal(seen.pop().reshape(shape), keep_probability(magprune_rank(x), 0.45, 0.13))


def test_drop_rate_per_rank_and_rescale_match_mergekit_statistically():
    """mergekit's own generator against ours, on one 200 x 500 task vector: the keep rate of
    each fifth of the magnitude ranks and the l1 rescale factor."""
    from mergekit.sparsify import RescaleNorm, della_magprune

    torch.manual_seed(0)
    x = rand(200, 500, seed=11)
    rank_norm = magprune_rank(x).float() / 499
    theirs = della_magprune(x, 0.35, 0.12, RescaleNorm.l1)
    ours = della_linear(torch.zeros_like(x), [x], [1.0], [0.35], [0.12], name="t")
    for lo in (0.0, 0.2, 0.4, 0.6, 0.8):
        inside = (rank_norm >= lo) & (rank_norm < lo + 0.2 - 1e-6)
        want = 0.23 + 0.24 * rank_norm[inside].mean().item()
        sigma = math.sqrt(want * (1 - want) / int(inside.sum()))
        rates = [(out[inside] != 0).float().mean().item() for out in (theirs, ours)]
        assert all(abs(r - want) < 5 * sigma for r in rates), (lo, rates, want)
        assert abs(rates[0] - rates[1]) < 5 * math.sqrt(2) * sigma, (lo, rates)
    factors = [(out[out != 0] / x[out != 0]).mean().item() for out in (theirs, ours)]
    assert factors[0] == pytest.approx(factors[1], rel=0.01)  # ~1/0.35 each: l1 restored
    torch.testing.assert_close(theirs.abs().sum(), ours.abs().sum())


@pytest.mark.parametrize("method", METHODS_HERE)
def test_exported_search_config_merges_identically_in_mergekit(method, fam, same_draws, tmp_path):
    """MergeSpace.to_config (per-layer gradients, a filter list) is valid mergekit configuration
    and, with the same draws, mergekit's model equals ours bit for bit."""
    import optuna

    from search.space import MergeSpace
    from test_parity import LAYERS, compare, run_both

    space = MergeSpace(method, {n: fam[n] for n in ("m0", "m1", "m2")}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    config = space.to_config(space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask()))
    assert {"weight", "density", "epsilon"} == set(config["models"][0]["parameters"])
    theirs, ours = run_both(config, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"
