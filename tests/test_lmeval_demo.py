"""lm-eval parity on the demo family: the demo suite's choice tasks scored natively and by
lm-eval's `evaluator.evaluate` on the live merged model agree exactly, before and after the merger
changes the weights in place; `merge-search bench eval --json` reports it."""

import copy
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from evaluation.lmeval import load_lmeval_tasks, native_task_yaml
from evaluation.suite import EvalSuite
from evaluation.tasks import load_suite


@pytest.mark.slow
def test_demo_family_parity_before_and_after_an_in_place_merge(demo_family, tmp_path):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from search.checkpoints import open_checkpoint
    from search.demo import MODEL_NAMES
    from search.merger import InMemoryMerger

    merger = InMemoryMerger([open_checkpoint(n, demo_family[n]) for n in MODEL_NAMES], device="cpu")

    def linear(weights):
        return {"merge_method": "linear", "parameters": {"normalize": True},
                "models": [{"model": str(demo_family[n]), "parameters": {"weight": w}} for n, w in zip(MODEL_NAMES, weights)]}

    tok = AutoTokenizer.from_pretrained(demo_family[MODEL_NAMES[0]])
    suite = load_suite("demo")
    native = EvalSuite(suite, tok, "dev", batch_size=32)
    (chat, system), = {native.settings(t) for t in suite.tasks}
    assert chat  # the demo tokenizer has a chat template, so lm-eval runs with apply_chat_template
    loaded = load_lmeval_tasks([str(native_task_yaml(t, "dev", tmp_path)) for t in suite.tasks])
    task_dict = {"tasks": {k: v for d in loaded for k, v in d["tasks"].items()}, "groups": {}, "group_map": {}}
    lm = HFLM(pretrained=merger.model, tokenizer=copy.deepcopy(tok), batch_size=32, softmax_dtype="float32")
    seen = []
    for weights in ([1.0, 0.0, 0.0], [1.0, 1.0, 1.0]):  # inst-v1 alone, then the uniform merge, in place
        merger.apply(linear(weights))
        got = native.score(merger.model).tasks
        res = evaluator.evaluate(lm, task_dict, bootstrap_iters=0, log_samples=False,
                                 apply_chat_template=chat, system_instruction=system)["results"]
        for task, d in zip(suite.tasks, loaded):
            ref = res[next(iter(d["tasks"]))]
            assert (got[task.name]["acc"], got[task.name]["acc_norm"]) == (ref["acc,none"], ref["acc_norm,none"]), task.name
        seen.append(got)
    assert seen[0] != seen[1]  # the merge changed the scores, and both scorers followed
    assert seen[0]["numerals"]["acc"] > seen[0]["daxie"]["acc"]  # inst-v1 knows its own skill


@pytest.mark.slow
def test_bench_eval_json(demo_family):
    from search.cli import main

    out = CliRunner().invoke(main, ["bench", "eval", "--json", "--repeats", "1", "--threads", "1",
                                    "--suite-models", "demo"])
    assert out.exit_code == 0, out.output
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["acc_identical"] is True and fig["acc_native"] == fig["acc_lmeval"]
    assert fig["items"] == 240 and fig["speedup_vs_lmeval"] > 1  # 3 tasks x 80 dev items
    timing = fig["suite_timing"]
    kinds = timing["models"]["demo"]["kinds"]
    assert set(kinds) == {"choice", "generate", "reference", "verifiable"}
    assert sum(k["items"] for k in kinds.values()) == timing["items"] >= 400
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1, abs=0.01)
    assert all(k["s"] > 0 for k in kinds.values()) and timing["models"]["demo"]["suite_s"] > 0


@pytest.mark.slow
def test_eval_command_on_a_model_folder_with_the_builtin_suite(demo_family):
    """The issue's command: `merge-search eval MODEL_DIR --suite zh-instruct-lite --split dev`."""
    from search.cli import main

    out = CliRunner().invoke(main, ["eval", str(demo_family["inst-v1"]), "--suite", "zh-instruct-lite",
                                    "--split", "dev", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    primary = {"knowledge": "acc", "reasoning": "acc", "reading": "acc", "math": "exact_match",
               "instruct": "prob", "idiom_poetry": "acc", "verifiable": "prompt_level_strict_acc"}
    assert report["suite"] == "zh-instruct-lite" and report["split"] == "dev" and report["primary_metric"] == primary
    result = report["models"]["inst-v1"]
    names = {"acc": ["acc", "acc_norm", "answer_logprob"], "exact_match": ["exact_match", "contains", "zh_fidelity"],
             "prob": ["prob", "logprob"],
             "prompt_level_strict_acc": ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                         "inst_level_loose_acc", "zh_fidelity"]}  # IFEval's names
    assert {t: sorted(m) for t, m in result["tasks"].items()} == {t: sorted(names[m]) for t, m in primary.items()}
    # instruct has weight 0: the suite score is the mean of the other six tasks' primary metrics
    assert result["score"] == pytest.approx(
        sum(result["tasks"][t][m] for t, m in primary.items() if t != "instruct") / 6, abs=1e-12)
    assert all(0 <= v <= 1 for t, m in result["tasks"].items() for k, v in m.items() if k not in ("logprob", "answer_logprob"))
