"""Run config: validation errors name the file, the field and the value."""

from pathlib import Path

import pytest

from search.config import DEFAULT_CONFIG, load_config
from search.errors import ConfigError

GOOD = """
name: t
models:
  - {name: a, path: ./a}
  - {name: b, path: /abs/b}
study: {n_trials: 5}
"""


def _write(tmp_path, text) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_derived_paths(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.merge.method == "linear" and cfg.merge.normalize is None  # the method's default (true)
    assert cfg.study.n_trials == 5 and cfg.study.sampler == "auto" and cfg.study.select == "robust"
    assert cfg.study.pruner is None and cfg.eval.search_metric == "primary" and cfg.eval.bootstrap == 1000
    assert cfg.out_dir == Path("runs/t") and cfg.study_name == "t"
    assert cfg.storage_url == f"sqlite:///{(Path('runs/t') / 'study.db').resolve()}"
    assert cfg.base_dir == tmp_path.resolve()


def test_demo_config_is_valid_and_the_default():
    cfg = load_config()
    assert load_config(DEFAULT_CONFIG) == cfg
    assert [m.name for m in cfg.models] == ["inst-v1", "inst-v2", "inst-meta"]
    real = load_config(DEFAULT_CONFIG.parent / "chinese-llama-alpaca-3.yaml")
    assert real.dtype == "bfloat16" and len(real.models) == 3


def test_misspelt_key_names_file_and_field(tmp_path):
    p = _write(tmp_path, GOOD + "studdy: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: studdy: unknown key"
    p = _write(tmp_path, GOOD.replace("n_trials: 5", "n_trails: 5"))
    with pytest.raises(ConfigError, match=r"run\.yaml: study\.n_trails: unknown key"):
        load_config(p)


def test_wrong_type_names_field_and_value(tmp_path):
    p = _write(tmp_path, GOOD.replace("n_trials: 5", "n_trials: many"))
    with pytest.raises(ConfigError, match=r"run\.yaml: study\.n_trials: .*integer.*\(got 'many'\)"):
        load_config(p)
    p = _write(tmp_path, GOOD + "device: tpu\n")
    with pytest.raises(ConfigError, match=r"device: .*'auto', 'cpu' or 'cuda'.*\(got 'tpu'\)"):
        load_config(p)
    p = _write(tmp_path, GOOD.replace("path: ./a", "path: 3"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.path: .*string.*\(got 3\)"):
        load_config(p)


def test_cross_field_rules(tmp_path):
    p = _write(tmp_path, GOOD.replace("{name: b, path: /abs/b}", "{name: a, path: /abs/b}"))
    with pytest.raises(ConfigError, match=r"models: model names must be unique but got \['a'\]"):
        load_config(p)
    one = "name: t\nmodels:\n  - {name: a, path: ./a}\n"
    with pytest.raises(ConfigError, match="at least 2 models but got 1"):
        load_config(_write(tmp_path, one))


def test_overrides_are_validated_like_the_file(tmp_path):
    p = _write(tmp_path, GOOD)
    assert load_config(p, **{"study.n_trials": 9, "device": "cpu"}).study.n_trials == 9
    with pytest.raises(ConfigError, match=r"study\.n_trials: .*greater than or equal to 1.*\(got 0\)"):
        load_config(p, **{"study.n_trials": 0})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"run\.yaml: line \d+ not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))


def test_merge_method_rules(tmp_path):
    p = _write(tmp_path, GOOD + "merge: {method: ties}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: merge: method ties needs base_model"):
        load_config(p)
    p = _write(tmp_path, GOOD + "merge: {method: slerp}\n")
    assert load_config(p).merge.method == "slerp"
    three = GOOD.replace("  - {name: b, path: /abs/b}", "  - {name: b, path: /abs/b}\n  - {name: c, path: /abs/c}")
    with pytest.raises(ConfigError, match="slerp merges exactly 2 models but got 3"):
        load_config(_write(tmp_path, three + "merge: {method: slerp}\n"))
    with pytest.raises(ConfigError, match=r"merge: density_range must satisfy 0 < low <= high <= 1 but got \[0\.5, 1\.5\]"):
        load_config(_write(tmp_path, GOOD + "merge: {method: ties, base_model: /b, density_range: [0.5, 1.5]}\n"))
    cfg = load_config(_write(tmp_path, GOOD + "merge: {method: task_arithmetic, base_model: /b, lambda: 0.8, granularity: 2}\n"))
    assert cfg.merge.lambda_ == 0.8 and cfg.merge.granularity == 2
