"""The search end to end on tiny models: outputs, baselines, resume, export, CLI exit codes."""

import csv
import json
import math

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from search.cli import main
from search.config import load_config
from search.report import leaderboard_rows
from search.study import TEST_ATTR, run_search
from tiny import make_family

ITEMS = [
    {"id": f"q{i}", "question": q, "choices": c, "answer": a}
    for i, (q, c, a) in enumerate([
        ("一是？", ["大", "小"], 0), ("二是？", ["小", "大"], 1), ("三是？", ["大大", "小"], 0),
        ("四是？", ["一", "二", "三"], 2), ("五是？", ["是", "的"], 0), ("六是？", ["七", "八"], 1),
    ])
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = make_family(root / "models", n=3)
    suite = root / "suite"
    suite.mkdir()
    for split, items in (("dev", ITEMS[:4]), ("test", ITEMS[2:])):
        (suite / f"c.{split}.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in items))
    (suite / "suite.yaml").write_text("name: s\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n")
    cfg = {
        "name": "tiny",
        "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
        "eval": {"suite": str(suite), "rescore_top": 2, "batch_size": 4},
        "study": {"n_trials": 6, "seed": 0, "baseline_methods": []},  # karcher's row: tests/test_baseline_methods.py
        "device": "cpu",
        "out": str(root / "run"),
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, paths, root


def test_run_writes_outputs_and_resumes(setup):
    config, paths, root = setup
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 0, result.output
    out = root / "run"
    for name in ("study.db", "best.yaml", "best.json", "leaderboard.md", "leaderboard.csv"):
        assert (out / name).is_file(), name

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 6
    labels = [t.user_attrs.get("label") for t in study.trials[:4]]
    assert labels == ["m0", "m1", "m2", "uniform"]  # baselines first
    weights = [list(t.user_attrs["weights"].values()) for t in study.trials[:4]]
    assert weights[:3] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert weights[3] == pytest.approx([1 / 3] * 3)
    for t in study.trials:
        tasks = t.user_attrs["dev"]["score"]["tasks"]
        assert set(tasks["c"]) == {"acc", "acc_norm", "answer_logprob"}
        assert t.value == tasks["c"]["acc"] == t.user_attrs["dev_score"]
        assert t.user_attrs["examples"]["score"] == [  # per example, in the stored fixed order
            1.0 if v else 0.0 for v in t.user_attrs["examples"]["score"]]
        assert sum(t.user_attrs["examples"]["score"]) / 4 == tasks["c"]["acc"]
        assert sum(t.user_attrs["weights"].values()) == pytest.approx(1.0)

    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert list(rows[0])[:14] == [
        "rank", "trial", "label", "state", "selected", "dev_score", "dev_vs_uniform", "dev_vs_uniform_low",
        "dev_vs_uniform_high", "test_score", "test_vs_uniform", "test_vs_uniform_low", "test_vs_uniform_high", "w:m0"]
    assert {"m0", "m1", "m2", "uniform"} <= {r["label"] for r in rows}
    assert float(rows[0]["dev_score"]) >= max(float(r["dev_score"]) for r in rows)
    # baselines and the top 2 are re-scored on test
    for r in rows:
        is_baseline = r["label"] in ("m0", "m1", "m2", "uniform")
        if is_baseline or int(r["rank"]) <= 2:
            assert r["test_score"] != "", r
    best = json.loads((out / "best.json").read_text())
    chosen = [r for r in rows if r["selected"] == "True"]
    assert len(chosen) == 1 and int(chosen[0]["trial"]) == best["trial"]
    assert best["dev_score"] == float(chosen[0]["dev_score"]) and best["select"] == "robust"
    uniform = next(r for r in rows if r["label"] == "uniform")
    assert (float(uniform["dev_vs_uniform"]), float(uniform["dev_vs_uniform_low"])) == (0.0, 0.0)
    assert best["test_score"] == study.user_attrs[f"{TEST_ATTR}{best['trial']}"]["score"]

    exported = yaml.safe_load((out / "best.yaml").read_text())
    assert exported["merge_method"] == "linear" and exported["parameters"] == {"normalize": True}
    assert [m["model"] for m in exported["models"]] == [str(p.resolve()) for p in paths]
    assert [m["parameters"]["weight"] for m in exported["models"]] == list(best["weights"].values())

    # the same command again: nothing to run; more trials: resumes, keeping the first six
    params_before = [t.params for t in study.trials]
    assert CliRunner().invoke(main, ["run", str(config)]).exit_code == 0
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").trials) == 6
    assert CliRunner().invoke(main, ["run", str(config), "--trials", "8"]).exit_code == 0
    study2 = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study2.trials) == 8
    assert [t.params for t in study2.trials[:6]] == params_before


def test_mergekit_accepts_the_exported_config(setup):
    mergekit_config = pytest.importorskip("mergekit.config")
    config, _, root = setup
    if not (root / "run" / "best.yaml").exists():
        run_search(load_config(config))
    runner = CliRunner()
    out = root / "exported.yaml"
    result = runner.invoke(main, ["export", str(root / "run"), "--trial", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    parsed = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(out.read_text()))
    assert parsed.merge_method == "linear"
    assert [m.parameters["weight"] for m in parsed.models] == pytest.approx([1 / 3] * 3)


def test_leaderboard_command_formats(setup):
    config, _, root = setup
    runner = CliRunner()
    md = runner.invoke(main, ["leaderboard", str(root / "run"), "--format", "md"])
    assert md.exit_code == 0 and md.output.startswith("| rank | trial | label | state | selected | dev_score | dev_vs_uniform |")
    js = json.loads(runner.invoke(main, ["leaderboard", str(root / "run"), "--format", "json"]).output)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'run' / 'study.db'}")
    assert js == json.loads(json.dumps(leaderboard_rows(study)))


def test_bad_input_exits_2_with_one_line(setup, tmp_path):
    config, paths, root = setup
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("n_trials", "n_trails"))
    r = runner.invoke(main, ["run", str(bad)])
    assert r.exit_code == 2 and r.output.strip() == f"error: {bad}: study.n_trails: unknown key"
    missing = tmp_path / "missing.yaml"
    missing.write_text(config.read_text().replace(str(paths[1]), str(tmp_path / "nowhere")))
    r = runner.invoke(main, ["check", str(missing)])
    assert r.exit_code == 2 and "nowhere" in r.output and len(r.output.strip().splitlines()) == 1
    gran = tmp_path / "gran.yaml"
    data = yaml.safe_load(config.read_text())
    data.update(out=str(tmp_path / "gran-run"), merge={"method": "linear", "granularity": 3})
    gran.write_text(yaml.safe_dump(data))
    r = runner.invoke(main, ["run", str(gran)])
    assert r.exit_code == 2  # (the progress bar line may precede the error in this captured output)
    assert r.output.strip().splitlines()[-1] == "error: merge.granularity must divide the layer count 2 but got 3"
    assert not (tmp_path / "gran-run").exists()  # nothing written for bad input
    r = runner.invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2 and "not a run folder" in r.output
    r = runner.invoke(main, ["export", str(root / "run"), "--trial", "99", "-o", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2 and "trial 99 is not a completed trial" in r.output


def test_a_ties_search_with_layer_groups_exports_exactly_the_scored_candidate(setup, tmp_path):
    from safetensors.torch import load_file

    from search.checkpoints import open_checkpoint
    from search.merger import InMemoryMerger
    from tiny import save_tiny_model

    config, paths, root = setup
    base = save_tiny_model(tmp_path / "base", seed=42)
    data = yaml.safe_load(config.read_text())
    data.update(name="tiny-ties", out=str(tmp_path / "run"),
                merge={"method": "ties", "base_model": str(base), "granularity": 1, "filters": ["mlp"]})
    data["study"]["n_trials"] = 5
    cfg_path = tmp_path / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(cfg_path)]).exit_code == 0
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    assert best["merge_method"] == "ties" and best["base_model"] == str(base.resolve())
    weight = best["models"][0]["parameters"]["weight"]
    assert [e.get("filter") for e in weight] == ["mlp", None] and len(weight[0]["value"]) == 2  # per layer
    r = runner.invoke(main, ["merge", str(tmp_path / "run" / "best.yaml"), "-o", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merger = InMemoryMerger([open_checkpoint(f"m{i}", p) for i, p in enumerate(paths)],
                            base=open_checkpoint("base", base))
    merger.apply(best)
    written = load_file(str(tmp_path / "merged" / "model.safetensors"))
    live = merger.model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in written.items())


def test_the_leaderboard_says_which_metric_of_each_task_makes_the_score(setup, tmp_path):
    config, _, root = setup
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("c.dev.jsonl", "c.test.jsonl"):
        (suite / name).write_text((root / "suite" / name).read_text())
    refs = [{"id": f"r{i}", "prompt": p, "reference": r} for i, (p, r) in enumerate([("一二", "三"), ("大", "小的")])]
    (suite / "r.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in refs))
    (suite / "suite.yaml").write_text(
        "name: mixed\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n"
        "  - {name: r, kind: reference, weight: 3, data: {dev: r.jsonl, test: r.jsonl}}\n")
    data = yaml.safe_load(config.read_text())
    data.update(name="mixed", out=str(tmp_path / "run"))
    data["eval"].update(suite=str(suite), system="你好")
    data["study"]["n_trials"] = 4
    cfg_path = tmp_path / "mixed.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(cfg_path)]).exit_code == 0
    study = optuna.load_study(study_name="mixed", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    for t in study.trials:  # the score is the weighted mean of c's acc and r's prob
        s = t.user_attrs["dev"]["score"]["tasks"]
        assert t.value == pytest.approx((s["c"]["acc"] + 3 * s["r"]["prob"]) / 4, abs=1e-12)
        # per item prob = exp(logprob); the task means: mean(exp) >= exp(mean) (Jensen)
        assert 0 < s["r"]["prob"] <= 1 and s["r"]["prob"] >= math.exp(s["r"]["logprob"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "leaderboard.csv")))
    assert [c for c in rows[0] if c.startswith("dev:")] == ["dev:c:acc", "dev:r:prob"]
    md = (tmp_path / "run" / "leaderboard.md").read_text()
    assert "dev_score: the weighted mean, on split `dev` of suite `mixed`, of c `acc` (×1), r `prob` (×3)." in md
    assert "- `prob`: exp of the mean per-token log-probability of the reference answer, in (0, 1]" in md
    assert runner.invoke(main, ["leaderboard", str(tmp_path / "run"), "--format", "md"]).output == md
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["score_terms"]["r"] == {"kind": "reference", "metric": "prob", "weight": 3.0}

    # another system prompt gives other values: resuming that study is refused, nothing is run
    data["eval"]["system"] = "您好"
    cfg_path.write_text(yaml.safe_dump(data))
    r = runner.invoke(main, ["run", str(cfg_path), "--trials", "6"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        f"error: study 'mixed' in sqlite:///{tmp_path / 'run' / 'study.db'} was scored with another eval setup "
        "(system differ), so its trial values would not compare: use another --study-name")
    assert len(optuna.load_study(study_name="mixed", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").trials) == 4


def test_resume_is_refused_when_a_source_changed_on_disk(setup, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    config, paths, root = setup
    models = tmp_path / "models"
    shutil.copytree(paths[0].parent, models)
    cfg = yaml.safe_load(config.read_text())
    cfg["models"] = [{"name": f"m{i}", "path": str(models / p.name)} for i, p in enumerate(paths)]
    cfg["out"] = str(tmp_path / "run")
    cfg["study"]["n_trials"] = 5
    moved = tmp_path / "c.yaml"
    moved.write_text(yaml.safe_dump(cfg))
    assert CliRunner().invoke(main, ["run", str(moved)]).exit_code == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    fp = study.user_attrs["sources"]["m1"]
    assert fp["path"] == str((models / paths[1].name).resolve()) and fp["files"]["model.safetensors"]["bytes"] > 0
    # retrain m1 in place: same names, shapes and file size, other values
    weights = models / paths[1].name / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    before = (tmp_path / "run" / "leaderboard.md").read_text()
    out = CliRunner().invoke(main, ["run", str(moved), "--trials", "7"])
    assert out.exit_code == 2
    assert "was run with other weights for model 'm1'" in out.output and "its weight files changed" in out.output
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").trials) == 5
    assert (tmp_path / "run" / "leaderboard.md").read_text() == before
