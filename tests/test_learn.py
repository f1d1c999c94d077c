"""The learner's gradient core (search/learn.py): the hook-reduced cell gradient against autograd
through an explicit merge and against finite differences, on a tiny random Llama family."""

from __future__ import annotations

import pytest
import torch

from search.checkpoints import open_checkpoint
from search.errors import MergeSearchError
from search.learn import LinearWeightGradient, tensor_cells
from search.merger import InMemoryMerger
from search.space import MergeSpace
from tiny import make_family

NAMES = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_family(tmp_path_factory.mktemp("learn"))
    merger = InMemoryMerger([open_checkpoint(n, p) for n, p in zip(NAMES, paths)], device="cpu")
    space = MergeSpace("linear", {n: str(p) for n, p in zip(NAMES, paths)}, normalize=True, granularity=1,
                       filters=["self_attn"], num_layers=merger.num_layers)
    ids = torch.randint(6, merger.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    return merger, space, paths, ids


def _loss(ids):
    def loss(model):
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


def test_each_tensor_is_in_the_cell_of_its_layer_and_filter(setup):
    merger, space, _, _ = setup
    cells = dict(zip((s.name for s in merger.segments), (space.cells[k] for k in tensor_cells(merger, space))))
    assert space.cells == ["g0.self_attn", "g0.rest", "g1.self_attn", "g1.rest"]
    assert cells["model.layers.0.self_attn.q_proj.weight"] == "g0.self_attn"
    assert cells["model.layers.1.self_attn.o_proj.weight"] == "g1.self_attn"
    assert cells["model.layers.0.mlp.up_proj.weight"] == "g0.rest"
    assert cells["model.layers.1.input_layernorm.weight"] == "g1.rest"
    assert cells["model.embed_tokens.weight"] == "g0.rest"  # before the layers: the first group
    # mergekit reads a per-layer list at t = 0 for every tensor outside the layers: its first value
    assert cells["lm_head.weight"] == "g0.rest" and cells["model.norm.weight"] == "g0.rest"


def test_the_hook_reduced_gradient_is_autograd_through_an_explicit_merge(setup):
    from safetensors.torch import load_file
    from torch.func import functional_call

    merger, space, paths, ids = setup
    learner = LinearWeightGradient(merger, space)
    logits = torch.randn(learner.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, grad = learner.backward(logits, _loss(ids))

    sources = [load_file(p / "model.safetensors") for p in paths]
    theta = logits.clone().requires_grad_(True)
    w = torch.softmax(theta, -1).float()
    cells = tensor_cells(merger, space)
    params = {s.name: sum(w[c, i] * sources[i][s.name] for i in range(len(NAMES)))
              for s, c in zip(merger.segments, cells)}
    ref = _loss(ids)(_FunctionalModel(merger.model, params, functional_call))
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(grad, theta.grad, rtol=1e-4, atol=1e-7), (grad, theta.grad)
    assert grad.abs().sum() > 0 and torch.allclose(grad.sum(-1), torch.zeros(len(space.cells), dtype=torch.float64),
                                                   atol=1e-9)  # softmax: shifting a cell's logits changes nothing


def test_the_gradient_matches_finite_differences_per_cell(setup):
    merger, space, _, ids = setup
    learner = LinearWeightGradient(merger, space)
    logits = torch.randn(learner.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, grad = learner.backward(logits, _loss(ids))
    eps = 0.05  # float32 losses (Llama's norms compute in float32): a step large enough to stand out of their noise
    for c in range(learner.shape[0]):
        for i in range(learner.shape[1]):
            step = torch.zeros_like(logits)
            step[c, i] = eps
            values = []
            for sign in (1, -1):
                learner.apply(logits + sign * step)
                with torch.no_grad():
                    values.append(float(_loss(ids)(merger.model)))
            fd = (values[0] - values[1]) / (2 * eps)
            assert fd == pytest.approx(float(grad[c, i]), rel=0.05, abs=1e-4), (space.cells[c], NAMES[i])
    assert grad.abs().max() > 20 * 1e-4  # the absolute tolerance is well below the largest gradients


def test_the_learned_weights_stay_on_the_simplex_and_export_as_the_space_does(setup):
    merger, space, _, _ = setup
    learner = LinearWeightGradient(merger, space)
    logits = torch.tensor([[30.0, -30.0, 0.0]] * len(space.cells), dtype=torch.float64)
    values = learner.values(logits)
    for v in values.values():
        assert all(x >= 0 for x in v["weight"]) and sum(v["weight"]) == pytest.approx(1.0)
    assert space.to_config(values)["parameters"]["normalize"] is True
    with pytest.raises(MergeSearchError, match=r"logits need shape \(4, 3\)"):
        learner.apply(torch.zeros(2, 3))


def test_only_normalized_linear_merges_are_learned(setup):
    _, _, paths, _ = setup
    models = {n: str(p) for n, p in zip(NAMES, paths)}
    merger = setup[0]
    for space in (MergeSpace("task_arithmetic", models, base=str(paths[0]), num_layers=2),
                  MergeSpace("linear", models, normalize=False, num_layers=2)):
        with pytest.raises(MergeSearchError, match="learned weights need merge.method linear with normalize: true"):
            LinearWeightGradient(merger, space)


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
    learner = LinearWeightGradient(merger, space)
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
    eps = 0.05
    for i in range(3):
        step = torch.zeros_like(logits)
        step[0, i] = eps
        values = []
        for sign in (1, -1):
            learner.apply(logits + sign * step)
            values.append(float(suite.smooth_loss(merger.model)))
        assert (values[0] - values[1]) / (2 * eps) == pytest.approx(float(grad[0, i]), rel=0.05, abs=1e-4), i
    assert grad.abs().max() > 1e-2


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


@pytest.mark.slow
def test_run_with_a_learner_scores_the_learned_weights_as_one_trial(demo_family, tmp_path):
    """`study.learner` in `run`: the learned weights are trial `learned`, scored on the search split
    like every candidate (above uniform on the smooth objective it learned), and a resumed run
    does not learn again."""
    import csv
    import json
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from search.cli import main
    from search.demo import MODEL_NAMES as MODEL_NAMES_DEMO

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    cfg["study"].update(learner={"steps": 8, "lr": 0.1}, n_trials=6)
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    for trials in ("6", "7"):
        result = CliRunner().invoke(main, ["run", str(path), "--out", str(out), "--device", "cpu", "-q",
                                           "--trials", trials])
        assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    learned = [r for r in rows if r["label"] == "learned"]
    assert len(learned) == 1 and len(rows) == 7
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


def test_a_learner_needs_a_normalized_linear_merge(tmp_path):
    from search.config import load_config
    from search.errors import MergeSearchError as Err

    with pytest.raises((Err, SystemExit, ValueError)) as err:
        load_config(None, **{"study.learner": {"steps": 3}, "merge.normalize": False})
    assert "study.learner learns the weights of merge.method linear with normalize: true" in str(err.value)
