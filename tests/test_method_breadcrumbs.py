"""breadcrumbs and breadcrumbs_ties: closed forms of the two-sided magnitude trim, the cached rank
and the fused kernel, and bit-parity with real mergekit (fp32) for global, per-layer (gradient)
and filtered parameters and for the configuration a search exports."""
from __future__ import annotations

import pytest
import torch

from search.errors import MergeSearchError
from search.methods import METHODS, magnitude_rank, task_arithmetic, ties, topk_count
from search.methods.base import FlatInputs
from search.methods.breadcrumbs import breadcrumbs, outlier_rank, window
from search.methods.breadcrumbs_ties import breadcrumbs_ties
from test_methods import bits_equal, rand

METHOD_FNS = {"breadcrumbs": breadcrumbs, "breadcrumbs_ties": breadcrumbs_ties}
BASE = rand(8, 5, seed=4)
XS = [rand(8, 5, seed=s) for s in (1, 2, 3)]


# --- closed forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("fn", METHOD_FNS.values())
def test_keeps_the_window_between_the_smallest_and_the_gamma_largest(fn):
    base = torch.zeros(20)
    x = torch.arange(1, 21, dtype=torch.float32) * torch.tensor([1.0, -1.0] * 10)  # |d| = 1..20
    # keep int(0.5·20) = 10, cut int(0.1·20) = 2 outliers, so drop the 8 smallest: |d| in 9..18
    out = fn(base, [x], [1.0], [0.5], [0.1])
    assert torch.equal(out, torch.where((x.abs() >= 9) & (x.abs() <= 18), x, 0.0))
    # keep 18 + cut 4 > 20: the outlier cut shrinks to 2, nothing small is dropped
    out = fn(base, [x], [1.0], [0.9], [0.2])
    assert torch.equal(out, torch.where(x.abs() <= 18, x, 0.0))
    assert window(20, 0.5, 0.1) == (8, 18) and window(20, 0.9, 0.2) == (0, 18)
    # no max(1, ·) as TIES has: int(0.04·20) = 0 keeps nothing
    assert torch.equal(fn(base, [x], [1.0], [0.04], [0.0]), base)


@pytest.mark.parametrize("fn", METHOD_FNS.values())
def test_density_1_ignores_gamma_and_is_task_arithmetic(fn):
    want = task_arithmetic(BASE, XS[:1], [0.7], lambda_=0.6)
    assert bits_equal(fn(BASE, XS[:1], [0.7], [1.0], [0.5], lambda_=0.6, rescale=True), want)


def test_gamma_0_is_ties_trim_with_and_without_sign_election():
    """With distinct magnitudes, no outlier cut keeps TIES' top-density set."""
    w, d = [0.3, 0.5, 0.2], [0.4, 0.7, 1.0]
    for normalize in (True, False):
        assert bits_equal(breadcrumbs_ties(BASE, XS, w, d, [0.0] * 3, normalize=normalize),
                          ties(BASE, XS, w, d, normalize=normalize))
    # the documented op order, with TIES' top-k masks
    masks = [(magnitude_rank(x - BASE) < topk_count(x.numel(), di)).reshape(x.shape) for x, di in zip(XS, d)]
    deltas = torch.stack([(x - BASE) * m for x, m in zip(XS, masks)]) * torch.tensor(w).reshape(-1, 1, 1)
    assert bits_equal(breadcrumbs(BASE, XS, w, d, [0.0] * 3), BASE + deltas.sum(dim=0))


def test_breadcrumbs_ties_elects_signs_after_the_trim():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 2.0, -1.0, 9.0]), torch.tensor([-2.0, 1.5, 0.5, 1.0]), torch.tensor([3.0, -5.0, 0.0, 1.0])]
    # density 0.75, gamma 0.25 on 4 elements: keep 3, cut the 1 largest, nothing small:
    # [1, 2, -1, 0], [0, 1.5, 0.5, 1], [3, 0, 0, 1]; sums 4, 3.5, -0.5, 2 elect +, +, -, +
    out = breadcrumbs_ties(base, xs, [1.0] * 3, [0.75] * 3, [0.25] * 3, normalize=True)
    assert out.tolist() == [2.0, 1.75, -1.0, 1.0]  # means of the agreeing (a 0 agrees with no sign)
    plain = breadcrumbs(base, xs, [1.0] * 3, [0.75] * 3, [0.25] * 3)
    assert plain.tolist() == [4.0, 3.5, -0.5, 2.0]


def test_rescale_restores_the_l1_norm():
    base, x = torch.zeros(10_000), rand(10_000, seed=9)
    out = breadcrumbs(base, [x], [1.0], [0.3], [0.02], rescale=True)
    kept = out != 0
    assert int(kept.sum()) == 3000
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    assert torch.equal(kept, breadcrumbs(base, [x], [1.0], [0.3], [0.02]) != 0)


def test_outlier_rank_is_the_ascending_sort_order_ties_included():
    delta = torch.randint(-3, 4, (5000,)).float()  # many equal magnitudes
    order = torch.sort(delta.abs(), descending=False).indices
    rank = outlier_rank(delta)
    assert rank.dtype == torch.int32
    assert torch.equal(order[rank.long()], torch.arange(5000))
    # not TIES' descending rank reversed: equal magnitudes are ordered differently
    assert not torch.equal(rank.long(), 4999 - magnitude_rank(delta).long())


def test_the_kept_set_among_tied_magnitudes_is_mergekits():
    from mergekit.sparsify import magnitude_outliers

    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, 4, (64, 97), generator=g).float() * (torch.randint(0, 2, (64, 97), generator=g) * 2 - 1)
    for density, gamma in ((0.5, 0.01), (0.3, 0.2), (0.9, 0.3), (0.05, 0.0)):
        theirs = magnitude_outliers(x, density, gamma=gamma)
        ours = breadcrumbs(torch.zeros_like(x), [x], [1.0], [density], [gamma])
        assert torch.equal(ours, theirs), (density, gamma)


@pytest.mark.parametrize("fn", METHOD_FNS.values())
def test_precomputed_ranks_give_the_same_bits(fn):
    ranks = [outlier_rank(x - BASE) for x in XS]
    for density in (0.1, 0.5, 0.9):
        d, g = [density, density / 2, 1.0], [0.05, 0.0, 0.3]
        assert bits_equal(fn(BASE, XS, [0.3, 0.5, 0.2], d, g, ranks=ranks), fn(BASE, XS, [0.3, 0.5, 0.2], d, g))


@pytest.mark.parametrize("method", METHOD_FNS)
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_kernel_gives_the_tensor_functions_bits(method, normalize):
    from search.mergeconfig import TensorRecipe

    spec, fn = METHODS[method], METHOD_FNS[method]
    w, d, g = [0.3, -0.5, 0.4], [0.45, 1.0, 0.6], [0.03, 0.2, 0.0]
    params = [{"weight": wi, "density": di, "gamma": gi} for wi, di, gi in zip(w, d, g)]
    shared = {"normalize": normalize, "rescale": False, "lambda": 0.8, "int8_mask": False}
    rec = TensorRecipe("w", method, ("b", "x0", "x1", "x2"), ("w",) * 4, 0, ({}, *params), shared)
    cache = [spec.precompute(BASE, x).reshape(-1) if spec.cache_when(p) else None for x, p in zip(XS, params)]
    flat = FlatInputs(members=tuple(x.reshape(-1) for x in XS), base=BASE.reshape(-1),
                      weights=torch.tensor(w), recipe=rec, member_params=params, cache=cache, numel=BASE.numel())
    out = torch.empty(BASE.numel())
    spec.kernel.fn(*spec.kernel.args(flat), out)
    want = fn(BASE, XS, w, d, g, normalize=normalize, lambda_=0.8)
    assert bits_equal(out.reshape(BASE.shape), want)
    rescaling = FlatInputs(**{**flat.__dict__, "recipe": TensorRecipe(**{**rec.__dict__,
                                                                        "shared": {**shared, "rescale": True}})})
    assert spec.kernel.args(rescaling) is None  # l1 norms: the tensor function


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_0_1_is_a_one_line_error(gamma):
    with pytest.raises(MergeSearchError, match=r"breadcrumbs_ties: gamma must be in \[0, 1\]"):
        breadcrumbs_ties(BASE, XS[:1], [1.0], [0.5], [gamma])


# --- parity with mergekit (fp32) ------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("breadcrumbs"), torch.float32)


GAMMAS = {"global": [0.01, 0.05, 0.0],
          "gradient": [[0.0, 0.1], 0.02, [0.05, 0.01, 0.03]],
          "filtered": [[{"filter": "mlp", "value": 0.08}, {"value": 0.01}], 0.03, None]}  # None: mergekit's default


def config(method: str, gran: str, fam: dict[str, str], shared: dict | None = None) -> dict:
    from test_parity import member_params

    models = []
    for i, m in enumerate(["m0", "m1", "m2"]):
        params = member_params("ties", i, gran)  # weight and density, at this granularity
        if GAMMAS[gran][i] is not None:
            params["gamma"] = GAMMAS[gran][i]
        models.append({"model": fam[m], "parameters": params})
    return {"merge_method": method, "base_model": fam["base"], "dtype": "float32", "models": models,
            **({"parameters": shared} if shared else {})}


CASES = [("global", None), ("gradient", None), ("filtered", None),
         ("global", {"normalize": True, "rescale": True, "lambda": 0.8})]


@pytest.mark.parametrize("gran,shared", CASES, ids=["global", "gradient", "filtered", "normalize-rescale-lambda"])
@pytest.mark.parametrize("method", METHOD_FNS)
def test_fp32_bit_identical_to_mergekit(method, gran, shared, fam, tmp_path):
    from test_parity import compare, run_both

    theirs, ours = run_both(config(method, gran, fam, shared), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


@pytest.mark.parametrize("method", METHOD_FNS)
def test_exported_search_config_merges_identically_in_mergekit(method, fam, tmp_path):
    import optuna

    from search.space import MergeSpace
    from test_parity import LAYERS, compare, run_both

    space = MergeSpace(method, {n: fam[n] for n in ("m0", "m1", "m2")}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    assert space.model_keys == ("weight", "density", "gamma")
    values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask())
    cfg = space.to_config(values)
    assert isinstance(cfg["models"][0]["parameters"]["gamma"], list)  # per filter and layer
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"


def test_in_memory_merger_caches_the_ranks_once(fam):
    from search.checkpoints import open_checkpoint
    from search.merger import InMemoryMerger
    from search.space import MergeSpace

    names = ("m0", "m1", "m2")
    merger = InMemoryMerger([open_checkpoint(n, fam[n]) for n in names], base=open_checkpoint("base", fam["base"]))
    space = MergeSpace("breadcrumbs", {n: fam[n] for n in names}, base=fam["base"], num_layers=4)
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.5, gamma=0.02)))
    first = merger.out.clone()
    n_ranks = len(merger._cache)
    assert n_ranks == 3 * len(merger.segments)  # one per model and tensor
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.2, gamma=0.1)))
    assert len(merger._cache) == n_ranks and not torch.equal(merger.out, first)
    merger.apply(space.to_config(space.uniform_values([0.3, 0.3, 0.4], density=0.5, gamma=0.02)))
    assert torch.equal(merger.out, first)
