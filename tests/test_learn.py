"""The learner's gradient core (search/learn.py): the hook-reduced cell gradient against autograd
through an explicit merge and against finite differences, on a tiny random Llama family."""

from __future__ import annotations

import pytest
import torch

from search.checkpoints import open_checkpoint
from search.errors import MergeSearchError
from search.learn import WeightGradient, tensor_cells
from search.merger import InMemoryMerger
from search.space import MergeSpace
from tiny import make_family

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

NAMES = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Four tiny random Llamas (the fourth the base of task_arithmetic) and a merger over them."""
    paths = make_family(tmp_path_factory.mktemp("learn"), n=4)
    merger = InMemoryMerger([open_checkpoint(n, p) for n, p in zip((*NAMES, "base"), paths)], device="cpu")
    ids = torch.randint(6, merger.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    return merger, paths, ids


def _space(method: str, paths, num_layers: int, **kw) -> MergeSpace:
    names = NAMES[:2] if method == "slerp" else NAMES
    models = {n: str(p) for n, p in zip(names, paths)}
    base = str(paths[3]) if method in ("task_arithmetic", "ties") else None
    return MergeSpace(method, models, base=base, granularity=1, filters=["self_attn"], num_layers=num_layers, **kw)


SPACES = {  # id -> (method, MergeSpace keywords)
    "linear": ("linear", {"normalize": True}),
    "linear-unnormalized": ("linear", {"normalize": False, "weight_range": (0.0, 1.5)}),
    "task_arithmetic": ("task_arithmetic", {"lambda_": 0.8}),
    "task_arithmetic-normalized": ("task_arithmetic", {"normalize": True}),
    "slerp": ("slerp", {}),
    "ties": ("ties", {}),
    "ties-unnormalized": ("ties", {"normalize": False, "lambda_": 0.9, "weight_range": (0.0, 1.5)}),
}
DENSITY = [0.6, 0.9, 0.5]  # TIES' densities, held (not learned): m1's and m2's trims overlap m0's


def _learner(merger, space: MergeSpace, **kw) -> WeightGradient:
    """The space's learner; TIES' densities held at DENSITY in every cell."""
    learner = WeightGradient(merger, space, **kw)
    if space.method == "ties":
        learner.hold({cell: {"weight": [1.0] * 3, "density": list(DENSITY)} for cell in space.cells})
    return learner


@pytest.fixture(scope="module")
def setup(family):
    merger, paths, ids = family
    return merger, _space("linear", paths, merger.num_layers, normalize=True), paths, ids


def _loss(ids):
    def loss(model):
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


def _explicit(space: MergeSpace, values: torch.Tensor, x: list[torch.Tensor], base: torch.Tensor,
              at: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of the merge of `space` with a cell's `values` (weights, or [t]), written out
    from the methods' definitions (search/methods/) in float64, differentiable in `values`;
    TIES' trim and sign masks computed in float32 as the merge does at the values `at` (default
    `values`), and held (detached)."""
    if space.method == "ties":
        from search.methods.taskvec import magnitude_rank, topk_count

        b32, w32 = base.float(), (values if at is None else at).detach().float()
        trimmed = [(t.float() - b32) * (magnitude_rank(t.float() - b32).reshape(t.shape) < topk_count(t.numel(), d))
                   for t, d in zip(x, DENSITY)]
        total = sum(w32[i] * trimmed[i] for i in range(len(x)))
        majority = (total >= 0).float() * 2 - 1
        agree = [((w32[i] * trimmed[i]).sign() == majority).double() for i in range(len(x))]
        mixed = sum(values[i] * agree[i] * trimmed[i].double() for i in range(len(x)))
        if space.normalize:
            div = sum(values[i] * agree[i] for i in range(len(x)))
            mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
        return base.double() + space.lambda_ * mixed
    x = [t.double() for t in x]
    if space.method == "slerp":
        a, b, t = x[0], x[1], values[0]
        cos = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
        if cos.abs() > 0.9995:  # nearly parallel (the norms' ones): slerp interpolates linearly
            return (1 - t) * a + t * b
        omega = torch.acos(cos)
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    total = values.sum() if space.normalize else 1.0
    if space.method == "linear":
        return sum(values[i] * x[i] for i in range(len(x))) / total
    base = base.double()
    return base + space.lambda_ * sum(values[i] * (x[i] - base) for i in range(len(x))) / total


def test_each_tensor_is_in_the_cell_of_its_layer_and_filter(family):
    merger, paths, _ = family
    for method in ("linear", "slerp"):  # a weight marker, a t marker
        space = _space(method, paths, merger.num_layers)
        cells = dict(zip((s.name for s in merger.segments), (space.cells[k] for k in tensor_cells(merger, space))))
        assert space.cells == ["g0.self_attn", "g0.rest", "g1.self_attn", "g1.rest"]
        assert cells["model.layers.0.self_attn.q_proj.weight"] == "g0.self_attn"
        assert cells["model.layers.1.self_attn.o_proj.weight"] == "g1.self_attn"
        assert cells["model.layers.0.mlp.up_proj.weight"] == "g0.rest"
        assert cells["model.layers.1.input_layernorm.weight"] == "g1.rest"
        assert cells["model.embed_tokens.weight"] == "g0.rest"  # before the layers: the first group
        # mergekit reads a per-layer list at t = 0 for every tensor outside the layers: its first value
        assert cells["lm_head.weight"] == "g0.rest" and cells["model.norm.weight"] == "g0.rest"


@pytest.mark.parametrize("case", list(SPACES))
def test_the_hook_reduced_gradient_is_autograd_through_an_explicit_merge(family, case):
    from safetensors.torch import load_file
    from torch.func import functional_call

    merger, paths, ids = family
    method, kw = SPACES[case]
    space = _space(method, paths, merger.num_layers, **kw)
    learner = _learner(merger, space, sign_bandwidth=0.0)  # TIES: the explicit merge holds its masks
    theta0 = torch.randn(learner.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, grad = learner.backward(theta0, _loss(ids))

    theta = theta0.clone().requires_grad_(True)
    ref = _explicit_loss(learner, theta, paths, ids)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    assert grad.abs().sum() > 0 and torch.allclose(grad, theta.grad, rtol=1e-4, atol=1e-7), (grad, theta.grad)
    if space.simplex:  # softmax: shifting a cell's logits changes nothing
        assert torch.allclose(grad.sum(-1), torch.zeros(len(space.cells), dtype=torch.float64), atol=1e-9)


def _explicit_loss(learner: WeightGradient, theta: torch.Tensor, paths, ids, at: torch.Tensor | None = None):
    """The loss of the explicit merge (`_explicit`) of `theta`, TIES' masks held at `at`'s values."""
    from safetensors.torch import load_file
    from torch.func import functional_call

    merger, space = learner.merger, learner.space
    sources = [load_file(p / "model.safetensors") for p in paths]
    values = learner.decode(theta)
    held = None if at is None else learner.decode(at)
    params = {s.name: _explicit(space, values[c], [sources[i][s.name] for i in range(len(space.names))],
                                sources[3][s.name], None if held is None else held[c]).float()
              for s, c in zip(merger.segments, tensor_cells(merger, space))}
    return _loss(ids)(_FunctionalModel(merger.model, params, functional_call))


@pytest.mark.parametrize("case", [c for c in SPACES if SPACES[c][0] != "ties"])
def test_the_gradient_matches_finite_differences_of_the_real_merge(family, case):
    """Finite differences through the merger's own merge (search/methods/): per cell and column.
    (TIES': on the demo family, whose tensors have the elements for its kernel estimate of the
    sign flips, test_ties_gradient_counts_the_sign_flips_of_the_real_merge.)"""
    merger, paths, ids = family
    method, kw = SPACES[case]
    learner = _learner(merger, _space(method, paths, merger.num_layers, **kw))
    theta = torch.randn(learner.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, grad = learner.backward(theta, _loss(ids))
    eps = 0.05  # float32 losses (Llama's norms compute in float32): a step large enough to stand out of their noise
    for c in range(learner.shape[0]):
        for i in range(learner.shape[1]):
            step = torch.zeros_like(theta)
            step[c, i] = eps
            values = []
            for sign in (1, -1):
                learner.apply(theta + sign * step)
                with torch.no_grad():
                    values.append(float(_loss(ids)(merger.model)))
            fd = (values[0] - values[1]) / (2 * eps)
            assert fd == pytest.approx(float(grad[c, i]), rel=0.05, abs=1e-4), (learner.space.cells[c], i)
    assert grad.abs().max() > 20 * 1e-4  # the absolute tolerance is well below the largest gradients


@pytest.mark.parametrize("case", [c for c in SPACES if SPACES[c][0] == "ties"])
def test_ties_gradient_is_the_finite_difference_of_its_merge_with_the_masks_held(family, case):
    """With sign_bandwidth 0, TIES' gradient is the merge's with its trim and sign masks held at
    the current weights: it matches finite differences of that merge (the masks of theta, the
    weights of theta +- eps), and not those of the real merge, whose sign election flips
    elements (the jumps the held-mask gradient leaves out, search/learn.py). Per cell and column."""
    merger, paths, ids = family
    method, kw = SPACES[case]
    learner = _learner(merger, _space(method, paths, merger.num_layers, **kw), sign_bandwidth=0.0)
    theta = torch.randn(learner.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, grad = learner.backward(theta, _loss(ids))
    eps, tol, off = 0.05, 1e-5, 0  # float32 losses of float64 merges: their noise is ~1e-6
    for c in range(learner.shape[0]):
        for i in range(learner.shape[1]):
            step = torch.zeros_like(theta)
            step[c, i] = eps
            with torch.no_grad():
                held = [float(_explicit_loss(learner, theta + sign * step, paths, ids, at=theta)) for sign in (1, -1)]
                learner.apply(theta + step)
                up = float(_loss(ids)(merger.model))
                learner.apply(theta - step)
                real = (up - float(_loss(ids)(merger.model))) / (2 * eps)
            fd = (held[0] - held[1]) / (2 * eps)
            assert fd == pytest.approx(float(grad[c, i]), rel=0.05, abs=tol), (learner.space.cells[c], i)
            off += abs(real - float(grad[c, i])) > 0.5 * abs(float(grad[c, i])) + 10 * tol
    assert grad.abs().max() > 20 * tol
    assert off > 0  # the real merge's flips: what the held-mask gradient does not see


def test_a_loss_in_parts_has_the_gradient_of_their_sum(setup):
    merger, space, _, ids = setup
    learner = WeightGradient(merger, space)
    theta = torch.randn(learner.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole, grad = learner.backward(theta, _loss(ids))
    parts = lambda model: (_loss(ids[i:i + 1])(model) / 3 for i in range(3))  # noqa: E731 (equal row lengths)
    summed, grad_parts = learner.backward(theta, parts)
    assert summed == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(grad_parts, grad, rtol=1e-4, atol=1e-8)


def test_the_learned_values_stay_in_the_space_and_export_as_the_space_does(family):
    merger, paths, _ = family
    learner = WeightGradient(merger, _space("linear", paths, merger.num_layers, normalize=True))
    logits = torch.tensor([[30.0, -30.0, 0.0]] * len(learner.space.cells), dtype=torch.float64)
    values = learner.values(logits)
    for v in values.values():
        assert all(x >= 0 for x in v["weight"]) and sum(v["weight"]) == pytest.approx(1.0)
    assert learner.space.to_config(values)["parameters"]["normalize"] is True
    with pytest.raises(MergeSearchError, match=r"logits need shape \(4, 3\)"):
        learner.apply(torch.zeros(2, 3))
    start = {cell: {"weight": [0.2, 0.0, 0.8]} for cell in learner.space.cells}  # a 0 at the simplex's edge
    back = learner.values(learner.encode(start))
    assert all(v["weight"] == pytest.approx([0.2, 0.0, 0.8], abs=1e-5) for v in back.values())
    ranged = WeightGradient(merger, _space("task_arithmetic", paths, merger.num_layers, weight_range=(-0.5, 1.5)))
    big = ranged.values(torch.full(ranged.shape, 50.0, dtype=torch.float64))
    assert all(v["weight"] == pytest.approx([1.5] * 3) for v in big.values())
    middle = {cell: {"weight": [0.1, 0.7, 1.5]} for cell in ranged.space.cells}
    assert all(v["weight"] == pytest.approx([0.1, 0.7, 1.5], abs=1e-5)
               for v in ranged.values(ranged.encode(middle)).values())
    slerp = WeightGradient(merger, _space("slerp", paths, merger.num_layers))
    assert slerp.shape == (4, 1) and all(v["t"] == [0.5] for v in slerp.values(torch.zeros(4, 1)).values())


def test_ties_densities_are_held_at_the_starts_and_merged(family):
    """TIES learns its weights; its densities stay those `hold` was given, in the values it
    exports and in the merge it applies (the trimmed task vectors)."""
    from search.methods import ties

    merger, paths, _ = family
    learner = _learner(merger, _space("ties", paths, merger.num_layers))
    theta = torch.randn(learner.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    values = learner.values(theta)
    assert all(v["density"] == DENSITY and sum(v["weight"]) == pytest.approx(1.0) for v in values.values())
    learner.apply(theta)
    seg = next(s for s in merger.segments if s.name == "model.layers.1.mlp.down_proj.weight")
    w = values["g1.rest"]["weight"]
    rows = [merger.buffer[r, seg.offset:seg.offset + seg.numel].view(seg.shape) for r in learner.rows]
    want = ties(rows[3], rows[:3], w, DENSITY, normalize=True)
    assert torch.equal(dict(merger.model.named_parameters())[seg.name].detach(), want)
    assert not torch.equal(want, ties(rows[3], rows[:3], w, [1.0] * 3, normalize=True))


def test_methods_that_pick_elements_are_not_learned(family):
    merger, paths, _ = family
    models = {n: str(p) for n, p in zip(NAMES, paths)}
    for method in ("dare_ties", "dare_linear", "della"):
        space = MergeSpace(method, models, base=str(paths[3]), num_layers=merger.num_layers)
        with pytest.raises(MergeSearchError, match=f"linear, task_arithmetic, ties, slerp .* but got {method}"):
            WeightGradient(merger, space)


def test_early_stopping_returns_the_best_held_out_step_and_stops_after_patience(setup):
    """A held-out loss that falls to its lowest at step 2 and then rises: learn returns step 2's
    parameters, stops `patience` steps later, and the live model holds that merge."""
    from search.learn import learn

    merger, space, _, ids = setup
    learner = WeightGradient(merger, space)
    held = iter([3.0, 2.0, 1.0, 1.5, 1.6, 1.7, 1.8, 1.9])
    seen = []
    loss = _loss(ids)

    def fn(model):
        seen.append(next(p for p in merger.model.parameters()).detach().clone())
        return loss(model)

    out = learn(learner, fn, steps=20, lr=0.1, held=lambda: next(held), patience=3)
    assert out.best_step == 2 and out.steps == 6 and out.held == [3.0, 2.0, 1.0, 1.5, 1.6, 1.7]
    assert torch.equal(next(p for p in merger.model.parameters()), seen[2])  # step 2's merge is live
    with pytest.raises(MergeSearchError, match="patience >= 1"):
        learn(learner, fn, steps=2, patience=0)


class _FunctionalModel:
    """`model` called with `params` in place of its own (torch.func.functional_call)."""

    def __init__(self, model, params, call):
        self.model, self.params, self.call = model, params, call

    def __call__(self, **kw):
        return self.call(self.model, self.params, args=(), kwargs=kw)


@pytest.fixture(scope="module")
def demo_learner(demo_family):
    """The demo's three variants in a merger, the global linear space's learner and the dev suite
    scored on the smooth metric."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from evaluation.suite import EvalSuite
    from evaluation.tasks import load_suite
    from search.demo import MODEL_NAMES

    merger = InMemoryMerger([open_checkpoint(n, demo_family[n]) for n in MODEL_NAMES], device="cpu")
    space = MergeSpace("linear", {n: str(demo_family[n]) for n in MODEL_NAMES}, normalize=True,
                       num_layers=merger.num_layers)
    suite = EvalSuite(load_suite(str(Path(__file__).resolve().parents[1] / "evaluation" / "data" / "demo")),
                      AutoTokenizer.from_pretrained(demo_family["base"]), "dev", batch_size=64, metric="smooth")
    learner = WeightGradient(merger, space)
    return merger, suite, learner


@pytest.mark.slow
def test_the_learning_loss_is_the_scorers_smooth_objective_and_its_gradient_holds(demo_learner):
    """On the demo family and suite: `EvalSuite.smooth_loss` is minus the objective `score` reports
    with `search_metric: smooth` (the same rows and log-likelihoods), and the learner's gradient of
    it through the merge matches finite differences."""
    merger, suite, learner = demo_learner
    logits = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    loss, grad = learner.backward(logits, suite.smooth_loss)
    assert loss == pytest.approx(-suite.score(merger.model).objective, rel=1e-6)
    fd = _central_differences(learner, logits, suite.smooth_loss, 0.05)
    assert torch.allclose(fd, grad[0], rtol=0.05, atol=1e-4), (fd, grad)
    assert grad.abs().max() > 1e-2


def _central_differences(learner: WeightGradient, theta: torch.Tensor, loss_fn, eps: float) -> torch.Tensor:
    """(L(theta + eps e_i) - L(theta - eps e_i)) / 2 eps for each column i of theta's one cell,
    through the merger's own merge."""
    out = []
    for i in range(theta.shape[1]):
        step = torch.zeros_like(theta)
        step[0, i] = eps
        values = []
        for sign in (1, -1):
            learner.apply(theta + sign * step)
            with torch.no_grad():
                values.append(float(loss_fn(learner.merger.model)))
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.slow
def test_ties_gradient_counts_the_sign_flips_of_the_real_merge(demo_family):
    """TIES on the demo family (global weights, densities 1): its gradient, the held-mask term
    plus the kernel estimate of the sign flips, matches finite differences of the real merge;
    the held-mask term alone (sign_bandwidth 0) is a tenth of it and does not."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from evaluation.suite import EvalSuite
    from evaluation.tasks import load_suite
    from search.demo import MODEL_NAMES

    names = [*MODEL_NAMES, "base"]
    merger = InMemoryMerger([open_checkpoint(n, demo_family[n]) for n in names], device="cpu")
    space = MergeSpace("ties", {n: str(demo_family[n]) for n in MODEL_NAMES}, base=str(demo_family["base"]),
                       num_layers=merger.num_layers)
    suite = EvalSuite(load_suite(str(Path(__file__).resolve().parents[1] / "evaluation" / "data" / "demo")),
                      AutoTokenizer.from_pretrained(demo_family["base"]), "dev", batch_size=64, metric="smooth")
    theta = torch.tensor([[-2.0, -2.0, 1.0]], dtype=torch.float64)  # inst-meta 0.91
    learner = WeightGradient(merger, space)
    _, grad = learner.backward(theta, suite.smooth_loss)
    _, held = WeightGradient(merger, space, sign_bandwidth=0.0).backward(theta, suite.smooth_loss)
    fd = _central_differences(learner, theta, suite.smooth_loss, 0.2)  # the flips are discrete: cross many
    assert fd.abs().max() > 0.3
    assert torch.allclose(grad[0], fd, rtol=0.15, atol=0.02), (grad, fd)
    assert (held[0] - fd).abs().max() > 0.3 and held.abs().max() < 0.2 * fd.abs().max(), (held, fd)


@pytest.mark.slow
def test_learning_moves_the_demo_weights_towards_the_light_variant(demo_learner):
    """The demo's optimum gives inst-meta 0.7 (the grid, search/demo.py): a few steps from uniform
    lower the smooth loss and give inst-meta the largest weight; l2 towards uniform holds them back."""
    from search.demo import MODEL_NAMES
    from search.learn import learn

    merger, suite, learner = demo_learner
    free = learn(learner, suite.smooth_loss, steps=8, lr=0.1)
    w = learner.weights(free.logits)[0]
    assert float(suite.smooth_loss(merger.model)) < free.losses[0] - 0.02  # the live model holds the last merge
    assert int(w.argmax()) == MODEL_NAMES.index("inst-meta") and float(w.sum()) == pytest.approx(1.0)
    held = learn(learner, suite.smooth_loss, steps=8, lr=0.1, l2=100.0)
    assert float(learner.weights(held.logits)[0, 2]) < float(w[2])
    with pytest.raises(MergeSearchError, match="steps >= 1"):
        learn(learner, suite.smooth_loss, steps=0)


def _demo_config(tmp_path, name: str = "learn.yaml", **study):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["study"].update(study)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.slow
def test_run_with_a_learner_scores_the_learned_weights_as_one_trial(demo_family, tmp_path):
    """`study.learner` in `run`: after the search, the learned weights are trial `learned`, one
    trial past study.n_trials, scored on the search split like every candidate (above uniform on
    the smooth objective it learned); a resumed run searches on and does not learn again."""
    import csv
    import json

    import yaml
    from click.testing import CliRunner

    from search.cli import main
    from search.demo import MODEL_NAMES as MODEL_NAMES_DEMO

    path, _ = _demo_config(tmp_path, learner={"steps": 8, "lr": 0.1}, n_trials=6)
    out = tmp_path / "run"
    for trials, rows_wanted in (("6", 7), ("7", 8)):
        result = CliRunner().invoke(main, ["run", str(path), "--out", str(out), "--device", "cpu", "-q",
                                           "--trials", trials])
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(open(out / "leaderboard.csv")))
        assert len(rows) == rows_wanted
    learned = [r for r in rows if r["label"] == "learned"]
    assert len(learned) == 1 and learned[0]["trial"] == "6"  # after the 6 trials of the first run's search
    uniform = next(r for r in rows if r["label"] == "uniform")
    assert float(learned[0]["dev_objective"]) > float(uniform["dev_objective"]) + 0.02
    weights = {n: float(learned[0][f"w:{n}"]) for n in MODEL_NAMES_DEMO}
    assert max(weights, key=weights.get) == "inst-meta"
    exported = tmp_path / "learned.yaml"
    result = CliRunner().invoke(main, ["export", str(out), "--trial", learned[0]["trial"], "-o", str(exported)])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(exported.read_text())
    got = [m["parameters"]["weight"] for m in config["models"]]
    assert got == pytest.approx([weights[n] for n in MODEL_NAMES_DEMO], abs=1e-9)
    assert json.loads((out / "best.json").read_text())["trial"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "slerp", "ties"])
def test_the_learned_config_merges_to_the_model_that_was_scored(demo_family, tmp_path, method):
    """`merge-search learn` on a fresh study scores the baselines, then the learned candidate; its
    exported config rebuilds, in memory and with `merge-search merge`, the tensors that were scored,
    and the rebuilt model from disk scores the trial's dev score. TIES learns from the best of a
    short search (`--start best`), its densities held at that trial's (on the demo a baseline's, 1)."""
    import optuna
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evaluation.suite import EvalSuite
    from evaluation.tasks import load_suite
    from search.cli import main
    from search.study import LEARNED

    path, cfg = _demo_config(tmp_path)
    if method == "slerp":
        cfg["models"] = cfg["models"][1:]  # inst-v2 (t = 0) and inst-meta (t = 1)
        cfg["merge"] = {"method": "slerp", "granularity": 2}
        path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    start = []
    if method == "ties":
        cfg["merge"] = {"method": "ties", "base_model": "demo:base", "density_range": [0.3, 0.9]}
        cfg["study"].update(sampler="random", n_trials=6, pruner="none")
        path.write_text(yaml.safe_dump(cfg))
        result = CliRunner().invoke(main, ["run", str(path), "--out", str(out), "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
        start = ["--start", "best"]
    result = CliRunner().invoke(main, ["learn", str(path), "--steps", "4", "--lr", "0.2", "--out", str(out),
                                       "--device", "cpu", "-q", *start])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{out / 'study.db'}")
    labels = [t.user_attrs.get("label") for t in study.trials]
    assert labels[-1] == LEARNED and {"uniform", "inst-meta"} <= set(labels) and len(labels) == len(set(labels))
    trial = study.trials[-1]
    assert trial.user_attrs["learner"]["steps_run"] == 4 and trial.user_attrs["dev_score"] > 0
    if method == "slerp":
        ts = [v["t"][0] for v in trial.user_attrs["cells"].values()]
        assert len(ts) == 2 and all(0 < t < 1 for t in ts) and ts != [0.5, 0.5]
    if method == "ties":
        first = study.trials[trial.user_attrs["learner"]["start_trial"]].user_attrs["cells"]
        for cell, v in trial.user_attrs["cells"].items():
            assert v["density"] == first[cell]["density"]
            assert v["weight"] != pytest.approx(first[cell]["weight"], abs=1e-3)  # learned from the start's
    exported = tmp_path / "learned.yaml"
    result = CliRunner().invoke(main, ["export", str(out), "--trial", str(trial.number), "-o", str(exported)])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(exported), "-o", str(model_dir)])
    assert result.exit_code == 0, result.output

    names = [m["name"] for m in cfg["models"]] + (["base"] if method == "ties" else [])
    merger = InMemoryMerger([open_checkpoint(n, demo_family[n]) for n in names], device="cpu")
    merger.apply(trial.user_attrs["merge_config"])  # what the trial scored
    scored = {k: v.detach().clone() for k, v in merger.model.state_dict().items()}
    merger.apply(yaml.safe_load(exported.read_text()))
    assert all(torch.equal(scored[k], v) for k, v in merger.model.state_dict().items())
    on_disk = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(on_disk[k], scored[k]) for k in on_disk)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    suite = EvalSuite(load_suite(str(ROOT / "evaluation" / "data" / "demo")), AutoTokenizer.from_pretrained(model_dir),
                      "dev", batch_size=64)
    assert suite.score(model).score == pytest.approx(trial.user_attrs["dev_score"], abs=1e-12)


@pytest.mark.slow
def test_early_stopping_reads_only_the_search_split(demo_family, tmp_path, monkeypatch):
    """While the learner runs, every suite it touches is the search split's: the held-out share
    for early stopping is a quarter of each dev task, and the test split is never scored."""
    from click.testing import CliRunner

    import search.learn
    from evaluation.suite import EvalSuite
    from search.cli import main

    seen, learning = [], [False]
    real_learn, real_parts, real_score = search.learn.learn, EvalSuite.loss_parts, EvalSuite.score_shards

    def spy_learn(*args, **kw):
        learning[0] = True
        try:
            return real_learn(*args, **kw)
        finally:
            learning[0] = False

    def spy_parts(self, model, **kw):
        seen.append(("loss", self.split, learning[0], len(kw.get("holdout", ()))))
        return real_parts(self, model, **kw)

    def spy_score(self, *args, **kw):
        seen.append(("score", self.split, learning[0], 0))
        return real_score(self, *args, **kw)

    monkeypatch.setattr(search.learn, "learn", spy_learn)
    monkeypatch.setattr(EvalSuite, "loss_parts", spy_parts)
    monkeypatch.setattr(EvalSuite, "score_shards", spy_score)
    path, _ = _demo_config(tmp_path, learner={"batch_size": 16, "checkpoint": True})  # the learner's own suite
    result = CliRunner().invoke(main, ["learn", str(path), "--steps", "12", "--lr", "0.1", "--early-stop", "0.25",
                                       "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    during = [s for s in seen if s[2]]
    assert during and all(kind == "loss" and split == "dev" for kind, split, _, _ in during)
    assert {n for *_, n in during} == {60}  # 20 of each of the three dev tasks' 80 items
    assert any(kind == "score" and split == "test" for kind, split, learning_, _ in seen if not learning_)
    import optuna

    info = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").trials[-1]
    assert info.user_attrs["learner"]["checkpoint"] is True and info.user_attrs["learner"]["held_out"] == 60


@pytest.mark.parametrize("over, message", [
    ({"merge.method": "dare_ties", "merge.base_model": "demo:base"}, "study.learner learns the parameters of merge.method linear, task_arithmetic, ties, slerp"),
    ({"study.learner": {"early_stop": 1.0}}, "study.learner.early_stop"),
    ({"study.learner": {"loss": "mse"}}, "study.learner.loss"),
    ({"study.learner": {"start": "median"}}, "study.learner.start"),
    ({"study.learner": {"patience": 0}}, "study.learner.patience"),
])
def test_bad_learner_settings_are_one_line(over, message):
    from search.config import load_config
    from search.errors import MergeSearchError as Err

    over = {"study.learner": {"steps": 3}, **over}
    with pytest.raises((Err, SystemExit, ValueError)) as err:
        load_config(None, **over)
    assert message in str(err.value) and "\n" not in str(err.value).strip()


def test_activation_checkpointing_gives_the_same_gradient(setup):
    """The decoder layers run under torch.utils.checkpoint: the same loss and gradient, and the
    layers' own forward is back afterwards."""
    merger, space, _, ids = setup
    theta = torch.randn((len(space.cells), 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plain = WeightGradient(merger, space).backward(theta, _loss(ids))
    ckpt = WeightGradient(merger, space, checkpoint=True).backward(theta, _loss(ids))
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert torch.allclose(ckpt[1], plain[1], rtol=1e-5, atol=1e-9)
    assert all("forward" not in vars(layer) for layer in merger.model.model.layers)


@pytest.mark.slow
def test_the_loss_in_parts_is_the_scorers_per_example_values(demo_learner):
    """On the demo: the fitted parts sum to minus the task-weighted mean of the scorer's own
    per-example smooth values over the examples not held out, the held-out parts to the same over
    the held-out ones; `entropy` is the options' softmax entropy from the scorer's log-likelihoods."""
    import math

    from search.learn import held_out_examples

    merger, suite, learner = demo_learner
    learner.apply(torch.tensor([[0.2, -0.1, 0.4]], dtype=torch.float64))
    values = suite.score(merger.model).objective_examples
    holdout = held_out_examples(suite, 0.25, seed=3)
    tasks = suite.loss_tasks()
    assert sum(len(k) for k in tasks.values()) == 240 and len(holdout) == 60
    assert all(sum(k in holdout for k in keys) == 20 for keys in tasks.values())  # a quarter of each task

    def mean_over(chosen):
        per = [[values[k] for k in keys if chosen(k)] for keys in tasks.values()]
        return -sum(sum(v) / len(v) for v in per) / len(per)

    held: list[float] = []
    with torch.no_grad():
        fit = sum(float(p) for p in suite.loss_parts(merger.model, holdout=holdout, held=held))
        lp = suite.sequence_logprobs(merger.model)
        entropy = sum(float(p) for p in suite.loss_parts(merger.model, loss="entropy"))
    assert fit == pytest.approx(mean_over(lambda k: k not in holdout), rel=1e-9)
    assert sum(held) == pytest.approx(mean_over(lambda k: k in holdout), rel=1e-9)
    per_task = []
    for plan in suite._plans:
        hs = []
        for ii in range(len(plan.items)):
            options = lp[plan.first_seq[ii]: plan.first_seq[ii] + len(plan.chars[ii])]
            logp = options - torch.logsumexp(options, 0)
            hs.append(-float((logp.exp() * logp).sum()))
        per_task.append(sum(hs) / len(hs))
    assert entropy == pytest.approx(sum(per_task) / len(per_task), rel=1e-9)
    assert 0 < entropy < math.log(4)


@pytest.mark.slow
def test_checkpointing_needs_rows_that_carry_their_prefix(demo_learner):
    """A shared-prefix cache would be updated twice by a recomputed layer: refused in one line.
    Rows that carry their prefix give the same loss and gradient as the shared-prefix ones."""
    from evaluation.suite import EvalSuite

    merger, suite, learner = demo_learner
    theta = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    ckpt = WeightGradient(merger, learner.space, checkpoint=True)
    with pytest.raises(MergeSearchError, match="cannot run rows that read a shared-prefix cache"):
        ckpt.backward(theta, suite.loss_parts)
    carried = EvalSuite(suite.suite, suite.tokenizer, "dev", batch_size=16, metric="smooth", share_prefix=False)
    loss, grad = ckpt.backward(theta, carried.loss_parts)
    want, want_grad = learner.backward(theta, suite.loss_parts)
    assert loss == pytest.approx(want, rel=1e-5)
    assert torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_a_failed_learned_trial_is_learned_again(demo_family, tmp_path):
    """A study whose learned trial failed (a crash mid-learning) gets a scored one on the next
    invocation; a study with a scored one is not learned again."""
    import optuna
    from click.testing import CliRunner

    from search.cli import main
    from search.study import LEARNED

    path, _ = _demo_config(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"label": LEARNED}))
    args = ["learn", str(path), "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="demo", storage=storage).trials
    states = [t.state for t in trials if t.user_attrs.get("label") == LEARNED]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
