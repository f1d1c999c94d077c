"""lm-eval parity and bridge on tiny models: the same data as a native task and as an lm-eval task
give the same acc, acc_norm and per-option log-likelihoods; lm-eval tasks run on the live model."""

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing may download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evaluation.errors import EvalError
from evaluation.lmeval import load_lmeval_tasks, native_task_yaml
from evaluation.suite import EvalSuite
from evaluation.tasks import DATA_DIR, load_suite
from tiny import CHAT_TEMPLATE, tiny_config

LMEVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
SPECIAL = ["<|pad|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def char_tokenizer(text: str, chat: bool = True) -> PreTrainedTokenizerFast:
    """A char-level tokenizer over `text`'s characters (+ ASCII), BOS from the post-processor."""
    chars = sorted(set(text) | set("ABCDEFGHIJ abcdefghijklmnopqrstuvwxyz0123456789.:\n"))
    vocab = {t: i for i, t in enumerate(SPECIAL + [c for c in chars if c not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIAL[3:])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def write_data(root: Path) -> dict[str, Path]:
    """Items of the built-in suite as native JSONL, and as a C-Eval-layout CSV."""
    lite = DATA_DIR / "zh-instruct-lite"
    know = [json.loads(x) for x in (lite / "knowledge.dev.jsonl").read_text(encoding="utf-8").splitlines()][:16]
    read = [json.loads(x) for x in (lite / "reading.dev.jsonl").read_text(encoding="utf-8").splitlines()][:8]
    paths = {"knowledge": root / "knowledge.jsonl", "reading": root / "reading.jsonl", "ceval": root / "accountant_val.csv"}
    for key, items in (("knowledge", know), ("reading", read)):
        paths[key].write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    with open(paths["ceval"], "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        for i, x in enumerate(know):
            w.writerow([i, x["question"], *x["choices"], "ABCD"[x["answer"]], ""])
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    paths = write_data(root)
    text = "".join(p.read_text(encoding="utf-8") for p in paths.values())
    tok = char_tokenizer(text + "以下是中国关于考试注册会计师的单项选择题，请选出其中正确答案。：你是一个助手")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=32, max_position_embeddings=1024)).eval()
    return root, paths, tok, model


def lmeval_run(lm, yaml_path, chat, system):
    """(metrics, per-doc option log-likelihoods) of one lm-eval task through evaluator.evaluate."""
    from lm_eval import evaluator

    task_dict = load_lmeval_tasks([str(yaml_path)])[0]
    name = next(iter(task_dict["tasks"]))
    res = evaluator.evaluate(lm, task_dict, bootstrap_iters=0, log_samples=True,
                             apply_chat_template=chat, system_instruction=system)
    docs = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    lls = [ll for d in docs for ll, _ in d["filtered_resps"]]
    args = docs[0]["arguments"][0]
    return res["results"][name], torch.tensor(lls, dtype=torch.float64), args


def hflm(model, tok):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=5, softmax_dtype="float32")


@pytest.mark.parametrize("data,style,system,chat", [
    ("knowledge", "cloze", None, True),
    ("knowledge", "letters", "你是一个助手", True),
    ("reading", "cloze", "你是一个助手", True),  # with a passage
    ("knowledge", "cloze", None, False),  # plain text: continuation " " + option
    ("ceval", "letters", None, False),  # C-Eval layout, ceval-valid prompt
])
def test_native_choice_equals_the_same_data_as_an_lmeval_task(setup, data, style, system, chat):
    root, paths, tok, model = setup
    suite = load_suite(paths[data])
    suite = replace(suite, tasks=[replace(suite.tasks[0], style=style)])
    native = EvalSuite(suite, tok, "dev", batch_size=4, system=system, chat=chat)
    chat_used, system_used = native.settings(suite.tasks[0])
    assert chat_used == chat and system_used == system
    yaml_path = native_task_yaml(suite.tasks[0], "dev", root / f"yaml-{data}-{style}-{chat}")
    ref, ref_lls, (ctx, cont) = lmeval_run(hflm(model, tok), yaml_path, chat, system)
    got = native.score(model).tasks[suite.tasks[0].name]
    assert got["acc"] == ref["acc,none"] and got["acc_norm"] == ref["acc_norm,none"]
    assert 0 < got["acc"] < 1 or 0 < got["acc_norm"] < 1  # a real spread, not a degenerate tie
    torch.testing.assert_close(native.sequence_logprobs(model), ref_lls, rtol=0, atol=2e-4)
    # The very same prompt strings.
    item = suite.tasks[0].items("dev")[0]
    native_ctx, native_conts, _ = native._loglik_prompt(suite.tasks[0], item, chat, system)
    assert (native_ctx, native_conts[0]) == (ctx, cont)


def test_ceval_csv_equals_lmevals_shipped_ceval_valid_task(setup):
    """The shipped ceval-valid_accountant task, pointed at the local CSV, scores like the native one."""
    root, paths, tok, model = setup
    local = root / "shipped" / "ceval_local_accountant.yaml"
    local.parent.mkdir(exist_ok=True)
    local.write_text(
        f"include: {LMEVAL_TASKS / 'ceval' / 'ceval-valid_accountant.yaml'}\n"
        "task: ceval-local_accountant\ndataset_path: csv\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    val: {paths['ceval']}\n    dev: {paths['ceval']}\n",
        encoding="utf-8")
    native = EvalSuite(load_suite(paths["ceval"]), tok, "dev", batch_size=8)
    ref, ref_lls, (ctx, cont) = lmeval_run(hflm(model, tok), local, False, None)
    got = native.score(model).tasks["accountant_val"]
    assert (got["acc"], got["acc_norm"]) == (ref["acc,none"], ref["acc_norm,none"])
    torch.testing.assert_close(native.sequence_logprobs(model), ref_lls, rtol=0, atol=2e-4)
    assert ctx.startswith("以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n") and ctx.endswith("\n答案：")
    assert cont == " A"


def test_bridge_runs_lmeval_tasks_on_the_live_model_and_is_never_stale(setup):
    root, paths, tok, model = setup
    model = LlamaForCausalLM(model.config).eval()
    model.load_state_dict(setup[3].state_dict())  # a private copy: this test changes weights
    twin = native_task_yaml(load_suite(paths["knowledge"]).tasks[0], "dev", root / "bridge")
    (root / "bridge" / "suite.yaml").write_text(
        f"name: bridged\ntasks:\n  - {{name: native, file: {paths['knowledge']}, weight: 1}}\n"
        f"  - {{name: twin, lmeval: {twin.name}, weight: 3, chat: true}}\n", encoding="utf-8")
    suite = EvalSuite(load_suite(root / "bridge"), tok, "dev", batch_size=4)
    first = suite.score(model)
    assert first.tasks["twin"]["acc"] == first.tasks["native"]["acc"]
    assert first.tasks["twin"]["acc_norm"] == first.tasks["native"]["acc_norm"]
    assert first.score == pytest.approx(first.tasks["native"]["acc"])
    lm = suite._lmeval.lm(model)
    before = suite.sequence_logprobs(model)
    with torch.no_grad():  # in place, as the merger does
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    second = suite.score(model)
    assert suite._lmeval.lm(model) is lm  # HFLM built once per live model
    assert not torch.allclose(before, suite.sequence_logprobs(model))
    assert second.tasks["twin"] == {k: second.tasks["native"][k] for k in ("acc", "acc_norm")}
    assert first.tasks["native"] != second.tasks["native"]  # the weights changed the scores...
    # ...and lm-eval followed them: no cached responses.


def test_an_lmeval_task_yaml_is_a_suite(setup):
    root, paths, tok, model = setup
    twin = native_task_yaml(load_suite(paths["knowledge"]).tasks[0], "dev", root / "as-suite")
    suite = load_suite(twin)
    assert [(t.kind, t.lmeval) for t in suite.tasks] == [("lmeval", str(twin.resolve()))]
    native = EvalSuite(load_suite(paths["knowledge"]), tok, "dev", batch_size=4, chat=False)
    bridged = EvalSuite(suite, tok, "dev", batch_size=4)  # lm-eval tasks: no chat template by default
    assert bridged.score(model).tasks[suite.tasks[0].name]["acc"] == native.score(model).tasks["knowledge"]["acc"]


def test_lmeval_yamls_with_function_tags_and_entries_tied_to_a_split(setup, tmp_path):
    root, paths, tok, model = setup
    twin = native_task_yaml(load_suite(paths["knowledge"]).tasks[0], "dev", tmp_path)
    tagged = tmp_path / "tagged.yaml"  # lm-eval's own tasks use `!function` (safe_load refuses it)
    tagged.write_text(twin.read_text() + "process_docs: !function utils.process_docs\n", encoding="utf-8")
    assert [(t.kind, t.lmeval) for t in load_suite(tagged).tasks] == [("lmeval", str(tagged.resolve()))]
    (tmp_path / "suite.yaml").write_text(
        f"name: s\ntasks:\n  - {{name: k, file: {paths['knowledge']}}}\n"
        f"  - {{name: twin, lmeval: {twin.name}, split: dev}}\n", encoding="utf-8")
    suite = load_suite(tmp_path)
    assert suite.tasks[1].lm_splits == ("dev",)
    assert [t.name for t in EvalSuite(suite, tok, "dev").tasks] == ["k", "twin"]
    test = EvalSuite(suite, tok, "test", batch_size=4)  # the lm-eval entry is not scored on test
    assert [t.name for t in test.tasks] == ["k"] and list(test.score_terms()) == ["k"]
    assert set(test.score(model).tasks) == {"k"}


def test_registered_names_unknown_names_and_offline_data(setup, tmp_path):
    """One scan of lm-eval's registry (~15 s): a typo gets suggestions, a hub task a local-copy hint."""
    with pytest.raises(EvalError, match=r"Unknown lm-eval task 'ceval-valid_acountant'\. Did you mean: ceval-valid_accountant"):
        load_lmeval_tasks(["ceval-valid_acountant"])
    with pytest.raises(EvalError, match=r"lm-eval task 'ceval-valid_accountant' could not be loaded: .*evaluation/README\.md"):
        load_lmeval_tasks(["ceval-valid_accountant"])
