"""nuslerp, multislerp, karcher: closed forms on hand-made vectors, tensor-level parity with
mergekit's kernels (the base form included), config-level parity with mergekit on tiny models
in fp32 (bit for bit, global / gradient / filtered / slices), and the exported search config.

mergekit computes these methods in the load dtype and we in fp32, so parity is asserted in fp32,
where the two run the same fp32 ops in the same order.
"""
from __future__ import annotations

import math

import pytest
import torch

from search.errors import MergeSearchError
from search.mergeconfig import parse_merge_config, resolve
from search.methods.karcher import karcher
from search.methods.multislerp import multislerp
from search.methods.nuslerp import nuslerp, nuslerp_t

E0, E1, E2 = torch.eye(3)
R = math.sqrt(0.5)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (+0 and -0 differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# --- nuslerp: closed forms ------------------------------------------------------------------

def test_nuslerp_t_is_the_second_weights_share():
    assert nuslerp_t([1.0, 3.0]) == 0.75 and nuslerp_t([2.0, 0.0]) == 0.0
    assert nuslerp_t([1.0, -1.0]) == 0.5  # sum ~0: the midpoint, as mergekit


def test_nuslerp_on_orthogonal_vectors_follows_the_arc():
    close(nuslerp(E0, E1, [1.0, 1.0]), [R, R, 0])
    close(nuslerp(E0, E1, [1.0, 3.0]), [math.sin(math.pi / 8), math.sin(3 * math.pi / 8), 0])
    # the coefficients are sin((1-t)θ)/sin θ and sin(tθ)/sin θ on the *unnormalized* vectors
    close(nuslerp(E0, 3 * E1, [1.0, 1.0]), [R, 3 * R, 0])
    close(nuslerp(E0, E1, [0.0, 0.0]), [R, R, 0])  # weights summing to 0: t = 0.5


def test_nuslerp_on_parallel_and_antipodal_vectors_interpolates_linearly():
    a = torch.tensor([1.0, 2.0, -2.0])
    close(nuslerp(a, 2 * a, [3.0, 1.0]), 1.25 * a)
    close(nuslerp(a, -a, [3.0, 1.0]), 0.5 * a)


def test_nuslerp_rows_and_columns_are_separate_spheres():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    # per row: row 0 orthogonal (the arc), row 1 parallel (linear)
    close(nuslerp(a, b, [1.0, 1.0], flatten=False), [[R, R], [0.0, 1.5]])
    # per column: column 0 is (1, 0) -> (0, 0), a zero vector (cos 0, θ = π/2), column 1 (0, 1) -> (1, 2)
    col1 = (math.sin(math.acos(2 / math.sqrt(5)) / 2) / math.sin(math.acos(2 / math.sqrt(5))))
    close(nuslerp(a, b, [1.0, 1.0], flatten=False, row_wise=True),
          [[R, col1 * 1.0], [0.0, col1 * (1.0 + 2.0)]])
    flat = nuslerp(a, b, [1.0, 1.0])  # the default: one sphere over the whole tensor
    assert not torch.allclose(flat, nuslerp(a, b, [1.0, 1.0], flatten=False))


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = torch.tensor([5.0, -1.0, 2.0])
    close(nuslerp(base + E0, base + E1, [1.0, 1.0], base=base), base + torch.tensor([R, R, 0]))


def test_nuslerp_rounds_once_from_fp32():
    a, b = rand(6, 7, seed=1), rand(6, 7, seed=2)
    out = nuslerp(a.bfloat16(), b.bfloat16(), [0.3, 0.6])
    assert out.dtype == torch.bfloat16
    assert bits_equal(out, nuslerp(a.bfloat16().float(), b.bfloat16().float(), [0.3, 0.6]).bfloat16())


# --- multislerp: closed forms ---------------------------------------------------------------

def test_multislerp_is_the_normalized_weighted_mean_direction_times_the_mean_norm():
    # the tangent vectors at the normalized Euclidean mean m sum to M - (M·m)m = 0, so the exp
    # map returns m itself: out = (Σ w_i u_i / ‖Σ w_i u_i‖) · Σ w_i ‖x_i‖
    close(multislerp([2 * E0, E1], [3.0, 1.0]), 7 / 4 * torch.tensor([3.0, 1.0, 0.0]) / math.sqrt(10))
    close(multislerp([E0, E1, E2], [1.0, 1.0, 1.0]), torch.ones(3) / math.sqrt(3))
    close(multislerp([2 * E0, E1], [3.0, 1.0], normalize_weights=False),
          7 * torch.tensor([3.0, 1.0, 0.0]) / math.sqrt(10))


def test_multislerp_antipodal_inputs():
    a = torch.tensor([1.0, -2.0, 2.0])
    close(multislerp([a, -a], [1.0, 3.0]), -a)  # unbalanced: the heavier direction, at the mean norm
    # balanced: two inputs fall back to the linear w0·a + w1·(-a), more are an error
    close(multislerp([a, -a], [1.0, 1.0]), torch.zeros(3))
    with pytest.raises(MergeSearchError, match=r"multislerp: the weighted mean of the 4 unit vectors is ~0"):
        multislerp([a, -a, 2 * a, -2 * a], [1.0, 1.0, 1.0, 1.0])


def test_multislerp_one_input_and_weights_that_cannot_be_normalized():
    a = rand(4, 3, seed=5)
    assert bits_equal(multislerp([a], [0.3]), a)
    with pytest.raises(MergeSearchError, match="multislerp: weights .* sum to 0"):
        multislerp([a, 2 * a], [1.0, -1.0])
    # unnormalized, the same weights are fine: direction of E0 - E1, scaled by 1·1 - 1·1 = 0
    close(multislerp([E0, E1], [1.0, -1.0], normalize_weights=False), torch.zeros(3))


def test_multislerp_with_a_base_interpolates_the_task_vectors():
    base = torch.tensor([5.0, -1.0, 2.0])
    close(multislerp([base + E0, base + E1], [1.0, 1.0], base=base), base + torch.tensor([R, R, 0]))


# --- karcher: closed forms ------------------------------------------------------------------

def test_karcher_of_orthonormal_vectors_is_their_normalized_sum():
    close(karcher([E0, E1]), [R, R, 0])
    close(karcher([E0, E1, E2]), torch.ones(3) / math.sqrt(3))
    close(karcher([2 * E0, 4 * E1]), 3 * torch.tensor([R, R, 0]))  # scaled by the mean norm


def test_karcher_iterates_from_the_euclidean_mean_to_the_mean_angle():
    # on a circle the Karcher mean of angles 0, 0, 90° is their mean angle, 30°; the normalized
    # Euclidean mean it starts from is atan(1/2) = 26.57°
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    angle = lambda v: math.degrees(math.atan2(v[1].item(), v[0].item()))  # noqa: E731
    assert abs(angle(karcher(xs, max_iter=0)) - math.degrees(math.atan(0.5))) < 1e-4
    assert abs(angle(karcher(xs, max_iter=50, tol=1e-7)) - 30.0) < 1e-3
    assert abs(angle(karcher(xs)) - 30.0) < 0.05  # the defaults: 10 steps, tol 1e-5
    close(karcher(xs).norm(), 1.0)


def test_karcher_zero_vectors_take_no_direction_but_count_in_the_norm():
    close(karcher([E0, torch.zeros(3)]), 0.5 * E0)
    assert bits_equal(karcher([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    a = rand(4, 3, seed=6)
    assert bits_equal(karcher([a]), a)
    with pytest.raises(MergeSearchError, match="karcher: max_iter and tol must be >= 0"):
        karcher([a, a], max_iter=-1)


# --- tensor-level parity with mergekit's kernels (the base form included) -------------------

def _mergekit(method: str, tensors, base=None, **params):
    mk = pytest.importorskip("mergekit.merge_methods")
    from mergekit.merge_methods.base import TensorGroup

    inputs = [*tensors, base] if base is not None else list(tensors)
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else len(tensors))
    return mk.get(method)([group], parameters=params)[0]


TENSORS = [rand(24, 16, seed=s) for s in range(3)]
BASE = rand(24, 16, seed=9)
NEAR = [BASE + 0.1 * t for t in TENSORS]  # fine-tunes of BASE: near-parallel, small task vectors


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_kernel_bit_identical_to_mergekit(flatten, row_wise, with_base):
    a, b = NEAR[:2]
    base = BASE if with_base else None
    theirs = _mergekit("nuslerp", [a, b], base, weight=[0.35, 0.45], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    ours = nuslerp(a, b, [0.35, 0.45], base=base, flatten=flatten, row_wise=row_wise)
    assert bits_equal(ours, theirs)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_kernel_bit_identical_to_mergekit(normalize, with_base):
    base = BASE if with_base else None
    w = [0.45, 0.35, 0.3]
    theirs = _mergekit("multislerp", NEAR, base, weight=w, normalize_weights=normalize)
    assert bits_equal(multislerp(NEAR, w, base=base, normalize_weights=normalize), theirs)


@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (3, 1e-7), (0, 1e-5)])
def test_karcher_kernel_bit_identical_to_mergekit(max_iter, tol):
    theirs = _mergekit("karcher", TENSORS, max_iter=max_iter, tol=tol)  # far apart: several steps
    assert bits_equal(karcher(TENSORS, max_iter=max_iter, tol=tol), theirs)


# --- config-level parity with mergekit on tiny models (fp32) --------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    from test_parity import build_family

    return build_family(tmp_path_factory.mktemp("spherical"), torch.float32)


WEIGHTS = {
    "global": [0.45, 0.35, 0.3],
    "gradient": [[0.1, 0.8, 0.3], [0.6, 0.2], 0.3],
    "filtered": [[{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.2, 0.5]}, {"value": 0.4}],
                 0.3, [{"filter": "embed", "value": 1.0}, {"value": 0.2}]],
}


def _config(method: str, gran: str, fam: dict[str, str], shared: dict | None = None, n: int = 3) -> dict:
    names = ["m0", "m1", "m2"][:n]
    weighted = method != "karcher"
    if gran == "slices":  # layers 0-1 global, 2-3 a gradient
        slices = [{"sources": [{"model": fam[m], "layer_range": [lo, lo + 2],
                                **({"parameters": {"weight": WEIGHTS[g][i]}} if weighted else {})}
                               for i, m in enumerate(names)]}
                  for lo, g in ((0, "global"), (2, "gradient"))]
        cfg = {"slices": slices}
    else:
        cfg = {"models": [{"model": fam[m], **({"parameters": {"weight": WEIGHTS[gran][i]}} if weighted else {})}
                          for i, m in enumerate(names)]}
    return {"merge_method": method, "dtype": "float32", **cfg, **({"parameters": shared} if shared else {})}


def _assert_identical(cfg, tmp_path):
    from test_parity import compare, run_both

    theirs, ours = run_both(cfg, tmp_path)
    total, differ, worst = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ, up to {worst} ulp"


NUSLERP_CASES = {
    "global": ("global", None),
    "gradient": ("gradient", None),
    "filtered": ("filtered", None),
    "slices": ("slices", None),
    "per_row": ("global", {"nuslerp_flatten": False}),
    "per_column": ("gradient", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "filtered_flatten": ("global", {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}],
                                    "nuslerp_row_wise": True}),
}


@pytest.mark.parametrize("case", list(NUSLERP_CASES))
def test_nuslerp_fp32_bit_identical_to_mergekit(case, fam, tmp_path):
    gran, shared = NUSLERP_CASES[case]
    _assert_identical(_config("nuslerp", gran, fam, shared, n=2), tmp_path)


MULTISLERP_CASES = {
    "global": ("global", None),
    "gradient": ("gradient", None),
    "filtered": ("filtered", None),
    "unnormalized": ("global", {"normalize_weights": False}),
    "filtered_eps": ("gradient", {"eps": [{"filter": "mlp", "value": 1e-3}, {"value": 1e-8}]}),
}


@pytest.mark.parametrize("case", list(MULTISLERP_CASES))
def test_multislerp_fp32_bit_identical_to_mergekit(case, fam, tmp_path):
    gran, shared = MULTISLERP_CASES[case]
    _assert_identical(_config("multislerp", gran, fam, shared), tmp_path)


def test_karcher_fp32_bit_identical_to_mergekit(fam, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "base").mkdir()
    _assert_identical(_config("karcher", "global", fam), tmp_path / "plain")
    # a base_model is one more input in both (mergekit's karcher ignores the base role);
    # per-tensor settings through filters
    cfg = {**_config("karcher", "global", fam), "base_model": fam["base"],
           "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 10}],
                          "tol": [{"filter": "self_attn", "value": 1e-3}, {"value": 1e-5}]}}
    _assert_identical(cfg, tmp_path / "base")


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher"])
def test_exported_search_config_merges_identically_in_mergekit(method, fam, tmp_path):
    """What `export` writes for these methods (MergeSpace.to_config) is valid mergekit
    configuration, and mergekit's model equals ours bit for bit (fp32)."""
    import optuna

    from search.space import MergeSpace

    names = ["m0", "m1"] if method == "nuslerp" else ["m0", "m1", "m2"]
    space = MergeSpace(method, {n: fam[n] for n in names}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=4)
    values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask())
    cfg = space.to_config(values)
    assert "base_model" not in cfg  # the no-base form: the only one a run config selects today
    if method == "karcher":
        assert space.n_params == 0 and all(m.keys() == {"model"} for m in cfg["models"])
    else:
        assert isinstance(cfg["models"][0]["parameters"]["weight"], list)  # filters x layer groups
    _assert_identical(cfg, tmp_path)


# --- the base form at config level: refused in one line (not implemented) --------------------

@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
@pytest.mark.parametrize("listed", [False, True])
def test_a_base_model_is_refused_for_nuslerp_and_multislerp(fam, method, listed):
    """mergekit's optional base (task-vector mode) is not implemented: a base_model, listed among
    the models or not, is a one-line error, never merged differently from mergekit."""
    cfg = _config(method, "global", fam, n=2) if method == "nuslerp" else _config(method, "global", fam)
    if listed:
        cfg["models"].append({"model": fam["base"], "parameters": {"weight": 1.0}})
    with pytest.raises(MergeSearchError, match=rf"base_model: {method} with a base \(mergekit's task-vector mode\) "
                                               "is not supported by merge-search; drop base_model"):
        parse_merge_config({**cfg, "base_model": fam["base"]})
