"""Parameter-free merge methods (karcher, model_stock) are baseline rows of a study, next to each
source alone and uniform: scored like every candidate, never searched, exported like any other."""

import json

import optuna
from optuna.search_space import intersection_search_space
import pytest
import yaml
from click.testing import CliRunner

from search.cli import main
from search.methods import METHODS, baseline_methods, parameter_free
from tiny import make_family, save_tiny_model

ITEMS = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate([
    ("一是？", ["大", "小"], 0), ("二是？", ["小", "大"], 1), ("三是？", ["大大", "小"], 0), ("四是？", ["一", "二", "三"], 2)])]
FREE = sorted(m for m, s in METHODS.items() if parameter_free(s))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    paths = make_family(root / "models", n=3)
    base = save_tiny_model(root / "models" / "base", seed=9)
    suite = root / "suite"
    suite.mkdir()
    for split in ("dev", "test"):
        (suite / f"c.{split}.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in ITEMS))
    (suite / "suite.yaml").write_text("name: s\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n")
    return paths, base, suite, root


def _config(setup, name, **over):
    paths, base, suite, root = setup
    cfg = {"name": name, "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
           "merge": {"method": "linear", "base_model": str(base)},
           "eval": {"suite": str(suite), "rescore_top": 1, "batch_size": 4},
           "study": {"n_trials": 9, "seed": 0, "sampler": "random"}, "device": "cpu", "out": str(root / name)}
    for key, value in over.items():
        section, field = key.split(".")
        cfg[section][field] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_registry_has_parameter_free_methods_and_which_apply():
    assert {"karcher", "model_stock"} <= set(FREE)
    assert "model_stock" in baseline_methods(3, has_base=True) and "model_stock" not in baseline_methods(3, has_base=False)
    assert "karcher" in baseline_methods(3, has_base=False)
    assert not set(baseline_methods(3, has_base=True)) & {"linear", "ties", "slerp"}


@pytest.fixture(scope="module")
def rows(setup):
    done = CliRunner().invoke(main, ["run", str(_config(setup, "rows")), "-q"])
    assert done.exit_code == 0, done.output
    return setup[3] / "rows"


def test_parameter_free_methods_are_baseline_rows(setup, rows):
    root = setup[3]
    study = optuna.load_study(study_name="rows", storage=f"sqlite:///{root / 'rows' / 'study.db'}")
    labels = [t.user_attrs.get("label") for t in study.trials]
    free = baseline_methods(3, has_base=True)
    assert labels[:4] == ["m0", "m1", "m2", "uniform"] and labels[-len(free):] == free  # the methods last:
    assert len(study.trials) == 9 and not any(labels[4:-len(free)])  # they never steer the search
    assert set(intersection_search_space(study.get_trials())) == set(study.trials[3].params)
    for t in study.trials[-len(free):]:
        assert t.params == study.trials[3].params  # uniform's: the samplers' search space stays whole
        assert t.user_attrs["merge_config"]["merge_method"] == t.user_attrs["label"] and "cells" not in t.user_attrs
        assert t.state == optuna.trial.TrialState.COMPLETE and f"test/{t.number}" in study.user_attrs
    rows = {r["label"]: r for r in csv_rows(root / "rows" / "leaderboard.csv")}
    assert set(free) <= set(rows)
    # a method's row is exported like any other candidate and rebuilt by merge-search merge
    karcher = next(t for t in study.trials if t.user_attrs.get("label") == "karcher")
    out = root / "karcher.yaml"
    exported = CliRunner().invoke(main, ["export", str(root / "rows"), "--trial", str(karcher.number), "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert yaml.safe_load(out.read_text())["merge_method"] == "karcher"
    merged = CliRunner().invoke(main, ["merge", str(out), "-o", str(root / "karcher-model")])
    assert merged.exit_code == 0, merged.output


def csv_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_baseline_methods_can_be_chosen_or_turned_off(setup):
    config = _config(setup, "none", **{"study.baseline_methods": [], "study.n_trials": 5})
    done = CliRunner().invoke(main, ["run", str(config), "-q"])
    assert done.exit_code == 0, done.output
    study = optuna.load_study(study_name="none", storage=f"sqlite:///{setup[3] / 'none' / 'study.db'}")
    assert [t.user_attrs.get("label") for t in study.trials[:4]] == ["m0", "m1", "m2", "uniform"]
    assert not any(t.user_attrs.get("baseline_method") for t in study.trials)


@pytest.mark.parametrize("over, message", [
    ({"study.baseline_methods": ["ties"]}, "study.baseline_methods: 'ties' is not a parameter-free method"),
    ({"study.baseline_methods": ["karcher", "karcher"]}, "study.baseline_methods: listed twice"),
    ({"merge.method": "karcher"}, "karcher has nothing to search: merge with it directly"),
])
def test_bad_baseline_settings_are_one_line(setup, over, message):
    config = _config(setup, "bad", **over)
    done = CliRunner().invoke(main, ["check", str(config)])
    assert done.exit_code == 2 and message in done.stderr, done.output
    assert len(done.stderr.strip().splitlines()) == 1


def test_leaderboard_and_export_import_no_torch(rows, tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom search.cli import main\n"
            f"for argv in (['leaderboard', {str(rows)!r}], ['export', {str(rows)!r}, '-o', {str(tmp_path / 'b.yaml')!r}]):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, None), e.code\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "torch loaded: False"
