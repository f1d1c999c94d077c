"""Tests of search/mergeconfig.py: the YAML subset, its one-line errors, and `resolve` compared
with mergekit's own planner (its per-tensor parameters) on the same YAML."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.errors import MergeSearchError
from search.mergeconfig import (
    load_merge_config, output_layer_count, output_tensors, parse_merge_config, resolve,
)
from search.methods import METHODS

LAYERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """Config-only tiny models (mergekit's planner reads config.json and the tensor index)."""
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("cfgfamily")
    return {name: str(save_tiny_model(root / name, seed=s, num_hidden_layers=LAYERS))
            for s, name in enumerate(["m0", "m1", "m2", "base"])}


def cfg(text: str, family: dict[str, str]) -> dict:
    for name, path in family.items():
        text = text.replace(f"${name}", path)
    return yaml.safe_load(text)


CASES = {
    "linear_global": """
merge_method: linear
parameters: {normalize: false}
models:
  - {model: $m0, parameters: {weight: 0.5}}
  - {model: $m1, parameters: {weight: 0.3}}
  - {model: $m2, parameters: {weight: 0.2}}
""",
    "linear_base_appended": """
merge_method: linear
base_model: $base
parameters: {weight: 0.25}
models:
  - {model: $m0, parameters: {weight: [0.1, 0.9, 0.4]}}
  - {model: $m1}
""",
    "ties_gradient_filters": """
merge_method: ties
base_model: $base
models:
  - model: $m0
    parameters: {weight: [0.2, 0.8], density: [0.3, 0.9]}
  - model: $m1
    parameters:
      weight: [{filter: self_attn, value: [1, 0, 2]}, {filter: mlp, value: 0.5}, {value: 0.1}]
      density: 0.7
  - model: $m2
    parameters: {weight: {filter: lm_head, value: 3}, density: 0.6}
parameters: {weight: 0.05, normalize: [true, false]}
""",
    "task_arithmetic_base_listed": """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $base
  - {model: $m0, parameters: {weight: [{filter: "*", value: 0.7}]}}
  - {model: $m1, parameters: {weight: [{filter: embed, value: 2}]}}
parameters: {weight: 0.4, lambda: [0.5, 1.5], normalize: true}
""",
    "linear_slices": """
merge_method: linear
slices:
  - sources:
      - {model: $m0, layer_range: [0, 2], parameters: {weight: [{filter: layers.1., value: 0.9}, {value: 0.1}]}}
      - {model: $m1, layer_range: [1, 3]}
    parameters: {weight: [0.3, 0.6]}
  - sources:
      - {model: $m0, layer_range: [2, 4]}
      - {model: $m1, layer_range: [0, 2], parameters: {weight: 2}}
    parameters: {weight: 0.5}
parameters: {normalize: false, weight: 7}
""",
    "slerp_slices": """
merge_method: slerp
base_model: $m0
slices:
  - sources:
      - {model: $m0, layer_range: [0, 3]}
      - {model: $m1, layer_range: [1, 4]}
  - sources:
      - {model: $m0, layer_range: [3, 4]}
      - {model: $m1, layer_range: [0, 1]}
parameters:
  t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]
""",
    "dare_ties_slice_base": """
merge_method: dare_ties
slices:
  - base_model: $base
    sources:
      - {model: $base, layer_range: [0, 4]}
      - {model: $m0, layer_range: [0, 4], parameters: {weight: 0.6, density: [0.2, 0.8]}}
      - {model: $m2, layer_range: [0, 4], parameters: {weight: 0.4, density: 0.5}}
    parameters: {rescale: false}
""",
}


def mergekit_plan(data: dict) -> list[tuple]:
    """(tensor, method, models, inputs, base, shared, per-model) as mergekit's planner resolves them."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(data)
    options = MergeOptions()
    arch = get_architecture_info(config, options)
    planner = MergePlanner(config, arch, options, _model_out_config(config, arch))
    planner._plan()
    rows = []
    for weight, task in planner._tensors:
        order = list(task.model_order)
        rows.append((weight.name, task.method_name, [str(m) for m in order],
                     [task.gather_tensors.weight_info[m].name for m in order],
                     str(task.base_model) if task.base_model else None, dict(task.parameters),
                     [dict(task.input_parameters[m]) for m in order]))
    return rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_resolve_matches_mergekits_planner(case, family):
    pytest.importorskip("mergekit")
    data = cfg(CASES[case], family)
    config = parse_merge_config(data)
    from search.checkpoints import open_checkpoint

    with open_checkpoint("m0", Path(family["m0"])) as ck:
        names = output_tensors(config, list(ck.tensors), LAYERS)
    theirs = mergekit_plan(data)
    assert sorted(names) == sorted(row[0] for row in theirs)  # (order within a layer may differ)
    needs_base = METHODS[config.merge_method].needs_base
    for (name, method, models, inputs, base, shared, per_model) in theirs:
        r = resolve(config, name, LAYERS)
        assert (r.tensor, r.method, list(r.models), list(r.inputs)) == (name, method, models, inputs)
        if needs_base:
            assert r.models[r.base] == base
        assert r.shared == shared, name
        assert list(r.params) == per_model, name


def test_outside_tensors_take_the_first_gradient_value_and_the_end_slices(family):
    config = parse_merge_config(cfg(CASES["linear_slices"], family))
    assert output_layer_count(config, LAYERS) == 4
    embed = resolve(config, "model.embed_tokens.weight", LAYERS)
    head = resolve(config, "lm_head.weight", LAYERS)
    assert [p["weight"] for p in embed.params] == [0.1, 0.3]  # slice 0, t = 0
    assert [p["weight"] for p in head.params] == [0.5, 2.0]  # last slice
    mid = resolve(config, "model.layers.1.mlp.up_proj.weight", LAYERS)
    assert mid.inputs == ("model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight")
    assert [p["weight"] for p in mid.params] == [0.9, 0.6]  # m0's filter sees its own layer 1; t = 1


def test_slices_change_the_layer_count_and_one_layer_slices_use_t_1(family):
    config = parse_merge_config(cfg(CASES["slerp_slices"], family))
    assert output_layer_count(config, LAYERS) == 4
    last = resolve(config, "model.layers.3.self_attn.q_proj.weight", LAYERS)
    assert last.shared == {"t": 1.0} and last.inputs[1] == "model.layers.0.self_attn.q_proj.weight"
    six = parse_merge_config({"merge_method": "linear", "parameters": {"weight": 1}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]}, {"sources": [{"model": "a", "layer_range": [1, 4]}]}]})
    assert output_layer_count(six, LAYERS) == 6
    with pytest.raises(MergeSearchError, match="no slice produces output layer 6"):
        resolve(six, "model.layers.6.mlp.up_proj.weight", LAYERS)
    with pytest.raises(MergeSearchError, match=r"layer_range \[1, 4\] goes past the model's 3 layers"):
        resolve(six, "model.layers.4.mlp.up_proj.weight", 3)


def test_missing_required_parameter_names_model_and_tensor():
    config = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}, {"model": "b", "parameters": {"weight": 1}}]})
    assert resolve(config, "model.layers.0.mlp.up_proj.weight", 2).params[0] == {"weight": 1.0}
    with pytest.raises(MergeSearchError, match="linear: no value for parameter weight .model a, tensor model.norm.weight"):
        resolve(config, "model.norm.weight", 2)


def test_weights_summing_to_zero_under_normalize_are_refused_at_resolve():
    config = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": -1}}]})
    with pytest.raises(MergeSearchError, match=r"linear: weights \[1.0, -1.0\] sum to 0 at tensor model.norm.weight"):
        resolve(config, "model.norm.weight", 2)


BAD = [
    ({"models": [{"model": "a", "lora": "x"}]}, "models[0].lora: key not supported by merge-search merge"),
    ({"modules": {}}, "modules: key not supported by merge-search merge"),
    ({"merge_method": "frankenmerge"}, "merge_method: unknown merge method 'frankenmerge'; known: linear, "
                                       "task_arithmetic, ties, dare_linear, dare_ties, slerp"),
    ({"merge_method": "ties"}, "ties needs a base_model (none given)"),
    ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
      "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]},
     "models: slerp takes exactly 2 models, the base included, but got 3"),
    ({"merge_method": "ties", "base_model": "z", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0}}]},
     "models[0].parameters.density: density must be in (0, 1] but got 0"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "t": 0.5}}]},
     "models[0].parameters.t: not a parameter of merge method linear (its parameters: weight, normalize)"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "normalize": True}}]},
     "models[0].parameters.normalize: normalize is a global parameter of linear; set it under parameters"),
    ({"models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
     "models[0].parameters.weight: 'heavy' is not a valid float"),
    ({"models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1, "x": 2}]}}]},
     "models[0].parameters.weight: {filter, value} entry: key 'x' not supported by merge-search merge"),
    ({"models": [{"model": "a+adapter"}]}, "models[0].model: 'a+adapter': LoRA references (model+lora) are not supported"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported by merge-search merge"),
    ({"chat_template": "chatml"}, "chat_template: named templates ('chatml') are not supported"),
    ({"dtype": "int8"}, "dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'int8')"),
    ({"merge_method": "ties", "models": None, "slices": [{"base_model": "z", "sources": [{"model": "a", "layer_range": [0, 2]}]}]},
     "slices[0]: base_model 'z' must be one of the slice's sources"),
    ({"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]},
     "slices[0]: layer_range [[0, 2], [0, 3]]: every source must cover the same number of layers"),
    ({"models": [{"model": "a"}, {"model": "a"}]}, "models: model 'a' listed twice"),
]


@pytest.mark.parametrize("patch,message", BAD)
def test_bad_configs_are_one_line_errors_naming_the_key(patch, message):
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}], **patch}
    with pytest.raises(MergeSearchError) as info:
        parse_merge_config(data, "best.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("best.yaml: ") and message in text, text


def test_load_merge_config_reports_file_problems(tmp_path):
    with pytest.raises(MergeSearchError, match=r"nope.yaml: cannot read"):
        load_merge_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [linear\n")
    with pytest.raises(MergeSearchError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_merge_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(MergeSearchError, match=r"bad.yaml: expected a mapping"):
        load_merge_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0e-3}\n"
                    "parameters: {normalize: 'false'}\ndtype: torch.bfloat16\n")
    config = load_merge_config(good)
    assert config.dtype == "bfloat16"
    r = resolve(config, "model.norm.weight", 2)
    assert r.params == ({"weight": 0.001},) and r.shared == {"normalize": False}
