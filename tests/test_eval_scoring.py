"""Scoring: prompts as lm-eval builds them, shared option rows, shards with per-example scores,
greedy `generate` tasks and answer normalisation, and `merge-search eval` on a model folder."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from tokenizers import decoders
from transformers import LlamaForCausalLM

from evaluation.generate import cut_at_stop
from evaluation.prompts import answer_metrics, encode_pair, normalize_answer, render_prompt
from evaluation.suite import EvalSuite
from evaluation.tasks import load_suite
from test_eval import constant_model
from test_lmeval import char_tokenizer
from tiny import tiny_config, tiny_tokenizer

CHOICE = [
    {"id": "c1", "question": "一二", "choices": ["大", "小", "是"], "answer": 1},
    {"id": "c2", "question": "三", "choices": ["大小", "大是", "小"], "answer": 0},
    {"id": "c3", "question": "四五六", "choices": ["的", "大大大", "大大"], "answer": 2},
    {"id": "c4", "question": "七", "choices": ["一", "二"], "answer": 0},
    {"id": "c5", "question": "八九", "choices": ["小的", "小是", "大的", "是"], "answer": 3},
]
GEN = [
    {"id": "g1", "question": "一", "answer": "大大大"},
    {"id": "g2", "question": "二", "answer": "大", "aliases": ["小"]},
    {"id": "g3", "question": "三", "answer": "小"},
]


def _write(tmp_path, extra=""):
    for name, rows in (("c", CHOICE), ("g", GEN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(
        "name: mixed\ntasks:\n  - {name: pick, file: c.jsonl}\n"
        f"  - {{name: letters, file: c.jsonl, style: letters}}\n  - {{name: say, file: g.jsonl, max_new_tokens: 3{extra}}}\n")
    return load_suite(tmp_path)


def _random_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def test_normalisation_strips_full_width_and_chinese_punctuation():
    assert normalize_answer("  １２０个。") == "120个"
    assert normalize_answer("Ｈｅｌｌｏ，  World！") == "helloworld"
    assert normalize_answer("《静夜思》——李白") == "静夜思李白"
    assert normalize_answer("-5") != normalize_answer("5")
    assert normalize_answer("3.5") == "3.5" and normalize_answer("3/4") == "3/4" and normalize_answer("1,000") == "1000"
    assert answer_metrics("答案：120。", ["120", "一百二十"]) == {"exact_match": 0.0, "contains": 1.0}
    assert answer_metrics("一百二十！", ["120", "一百二十"]) == {"exact_match": 1.0, "contains": 1.0}
    assert cut_at_stop(" 四十七\n下一题", ("\n",)) == "四十七"


def test_prompts_follow_lmeval():
    tok = tiny_tokenizer()
    chat = render_prompt(tok, "一", system="二", description="三")
    assert chat == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n二\n\n三<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n一<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    plain = tiny_tokenizer(chat=False)
    assert render_prompt(plain, "一", description="三\n\n") == "三\n\n一"
    # Trailing whitespace of the context is scored with the continuation; BOS as the tokenizer adds it.
    ids = lambda s: plain(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode_pair(plain, "一 ", "二") == ([1] + ids("一"), ids(" 二"))
    assert encode_pair(plain, "一 ", "二", move_whitespace=False) == ([1] + ids("一 "), ids("二"))
    assert encode_pair(tok, render_prompt(tok, "一"), "二")[1] == ids("\n\n二")


def test_ceval_prompt_and_system_prompt_settings(tmp_path):
    csv = tmp_path / "my_exam.csv"
    csv.write_text("id,question,A,B,C,D,answer\n0, 一二 ,三,四,五,六,B\n", encoding="utf-8")
    tok = tiny_tokenizer()
    suite = load_suite(csv)
    evals = EvalSuite(suite, tok, "dev")
    assert evals.settings(suite.tasks[0]) == (False, None)  # C-Eval data: no chat template unless asked
    assert EvalSuite(suite, tok, "dev", chat=True).settings(suite.tasks[0]) == (True, None)  # asked (--chat)
    ctx, conts, chars = evals._loglik_prompt(suite.tasks[0], suite.tasks[0].items("dev")[0], False, None)
    assert ctx == "以下是中国关于考试的单项选择题，请选出其中的正确答案。\n\n一二\nA. 三\nB. 四\nC. 五\nD. 六\n答案："
    assert (conts, chars) == ([" A", " B", " C", " D"], [1, 1, 1, 1])
    (tmp_path / "suite.yaml").write_text(
        "name: s\nsystem: 九\ntasks:\n  - {name: a, file: my_exam.csv, subject: law}\n"
        "  - {name: b, file: my_exam.csv, chat: true, system: 八}\n")
    suite = load_suite(tmp_path)
    evals = EvalSuite(suite, tok, "dev")
    assert [evals.settings(t) for t in suite.tasks] == [(False, "九"), (True, "八")]
    assert evals._loglik_prompt(suite.tasks[0], suite.tasks[0].items("dev")[0], False, None)[0].startswith("以下是中国关于法学的")
    assert EvalSuite(suite, tok, "dev", system="七", chat=False).settings(suite.tasks[1]) == (False, "八")


def test_options_share_one_trie_row_with_the_same_loglikelihoods(tmp_path):
    suite, tok, model = _write(tmp_path), tiny_tokenizer(), _random_model()
    shared = EvalSuite(suite, tok, "dev", batch_size=3)
    alone = EvalSuite(suite, tok, "dev", batch_size=3, share_context=False)
    batches = lambda s: [b for sh in s._shards for b in sh.batches]  # noqa: E731
    # 15 options per style: one row each alone; shared, one row per item (the trie of its options).
    assert [sum(b.input_ids.shape[0] for b in batches(s)) for s in (alone, shared)] == [30, 10]
    # What rows begin with in common goes once into the prefix row: the chat template's header
    # (9 tokens) and each question (一二, 三, 四五六, 七, 八九: both styles of an item start with it).
    prefix = shared._shards[0].prefix
    assert "".join(tok.convert_ids_to_tokens(prefix.input_ids[0].tolist())[2:]) == "user<|end_header_id|>\n\n一二三四五六七八九"
    assert prefix.input_ids.shape[1] == 18 and alone._shards[0].prefix is None
    assert sum(b.input_ids.numel() for b in batches(shared)) < sum(b.input_ids.numel() for b in batches(alone)) / 2
    torch.testing.assert_close(shared.sequence_logprobs(model), alone.sequence_logprobs(model), rtol=0, atol=1e-5)
    a, b = shared.score(model), alone.score(model)
    for task in ("pick", "letters"):
        assert (a.tasks[task]["acc"], a.tasks[task]["acc_norm"]) == (b.tasks[task]["acc"], b.tasks[task]["acc_norm"])
        assert a.tasks[task]["answer_logprob"] == pytest.approx(b.tasks[task]["answer_logprob"], abs=1e-6)


def _rows():
    from evaluation.packing import build_rows

    a = [(0, [1, 2, 3, 4, 5, 6, 10], [20]), (1, [1, 2, 3, 4, 5, 6, 10], [21])]  # one chain, scored at node 6
    b = [(2, [1, 2, 3, 4, 5, 6, 11, 12, 20], [20, 22])]  # shares 6 tokens with a
    c = [(3, [1, 2, 3, 9], [20])]  # shares 3 (< MIN_PREFIX): no prefix
    d = [(4, [1, 2, 3, 4, 5, 30], [30]), (5, [1, 2, 3, 4, 31, 32], [31, 32])]  # branches after node 3
    return build_rows([a, b, c, d], share=True)


def test_rows_share_their_common_start_once_at_the_right_positions():
    from evaluation.packing import _prefix_lengths, _shareable, pack_rows, run_batches

    rows = _rows()
    assert [_shareable(r) for r in rows] == [6, 7, 3, 4]  # d: the branch hangs from node 3
    assert _prefix_lengths(rows) == [6, 6, 0, 4]
    batches, prefix = pack_rows(rows, 8, 0, torch.device("cpu"), share_prefix=True)
    assert prefix.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]] and prefix.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]]
    (b,) = batches  # rows by length without their prefix: c [1 2 3 9], d (trie), b [11 12 20], a [10]
    assert b.input_ids.tolist() == [[1, 2, 3, 9], [5, 30, 31, 32], [11, 12, 20, 0], [10, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [4, 5, 4, 5], [6, 7, 8, 6], [6, 6, 6, 6]]
    assert b.prefix_nodes.tolist() == [[0] * 6, [0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert b.mask.shape == (4, 1, 4, 10)
    assert b.mask[1, 0, 2].tolist() == [True] * 4 + [False] * 2 + [False, False, True, False]  # 31: prefix + itself
    assert b.mask[0, 0, 3].tolist() == [False] * 6 + [True] * 4  # c: no prefix, causal

    model = _random_model(1)
    for attn in ("sdpa", "eager"):
        model.config._attn_implementation = attn
        totals = [torch.zeros(6, dtype=torch.float64) for _ in range(2)]
        run_batches(model, batches, totals[0], prefix)
        for row in _rows_alone():  # every sequence on a row of its own, no mask
            run_batches(model, pack_rows([row], 1, 0, torch.device("cpu"))[0], totals[1])
        torch.testing.assert_close(totals[0], totals[1], rtol=0, atol=1e-5)


def _rows_alone():
    from evaluation.packing import build_rows

    flat = [(0, [1, 2, 3, 4, 5, 6, 10], [20]), (1, [1, 2, 3, 4, 5, 6, 10], [21]),
            (2, [1, 2, 3, 4, 5, 6, 11, 12, 20], [20, 22]), (3, [1, 2, 3, 9], [20]),
            (4, [1, 2, 3, 4, 5, 30], [30]), (5, [1, 2, 3, 4, 31, 32], [31, 32])]
    return build_rows([[o] for o in flat], share=False)


def test_shards_yield_per_example_scores_and_the_same_total(tmp_path):
    suite, tok, model = _write(tmp_path), tiny_tokenizer(), _random_model(3)
    whole = EvalSuite(suite, tok, "dev", batch_size=2).score(model)
    sharded = EvalSuite(suite, tok, "dev", batch_size=2, shards=3)
    shards = list(sharded.score_shards(model))
    assert [(s.index, s.n_shards) for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert [sorted(s.examples) for s in shards] == [
        ["letters/c1", "letters/c4", "pick/c1", "pick/c4", "say/g1"],
        ["letters/c2", "letters/c5", "pick/c2", "pick/c5", "say/g2"],
        ["letters/c3", "pick/c3", "say/g3"],
    ]
    merged = {k: v for s in shards for k, v in s.examples.items()}
    assert merged == whole.examples and sorted(merged) == sorted(sharded.example_keys)
    first = shards[0].result  # a running estimate over the examples seen so far
    assert first.tasks["pick"]["acc"] == (merged["pick/c1"] + merged["pick/c4"]) / 2
    assert shards[-1].result.tasks == whole.tasks and shards[-1].result.score == pytest.approx(whole.score)


def test_generate_greedy_with_max_length_and_stop_strings(tmp_path):
    tok = tiny_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode chars without spaces between them
    model = constant_model(tok)  # always predicts 大
    result = EvalSuite(_write(tmp_path), tok, "dev", batch_size=2).score(model)
    # "大大大" after 3 new tokens: g1 exact, g2 contains 大, g3 neither.
    assert result.tasks["say"] == {"exact_match": 1 / 3, "contains": 2 / 3, "zh_fidelity": 1.0}
    assert result.examples["say/g1"] == 1.0 and result.examples["say/g2"] == 0.0
    stopped = EvalSuite(_write(tmp_path, extra=", stop: 大大"), tok, "dev").score(model)
    assert stopped.tasks["say"] == {"exact_match": 0.0, "contains": 0.0, "zh_fidelity": 1.0}  # cut before "大大": empty
    mixed = (result.tasks["pick"]["acc"] + result.tasks["letters"]["acc"] + 1 / 3) / 3
    assert result.score == pytest.approx(mixed)


def test_reference_score_is_bounded_and_named(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"id": "r1", "prompt": "一", "reference": "大小"}\n', encoding="utf-8")
    tok = tiny_tokenizer()
    result = EvalSuite(load_suite(tmp_path / "r.jsonl"), tok, "dev").score(_random_model())
    lp = result.tasks["r"]["logprob"]
    assert lp < 0 and result.tasks["r"]["prob"] == pytest.approx(math.exp(lp)) and 0 < result.score <= 1


def test_cli_eval_prints_per_task_and_total_scores(tmp_path):
    from search.cli import main

    rows = [{"id": f"k{i}", "question": q, "choices": c, "answer": a}
            for i, (q, c, a) in enumerate([("天是什么颜色", ["蓝色", "绿色"], 0), ("草是什么颜色", ["蓝色", "绿色"], 1)])]
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tok = char_tokenizer(data.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = CliRunner().invoke(main, ["eval", str(tmp_path / "m"), "--suite", str(data), "--split", "dev", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    expected = EvalSuite(load_suite(data), tok, "dev").score(model)
    assert report["primary_metric"] == {"colours": "acc"}
    assert report["models"]["m"] == {"score": expected.score, "tasks": expected.tasks}
    for flag, chat in (("--chat", True), ("--no-chat", False)):  # the template for every task, or for none
        out = CliRunner().invoke(main, ["eval", str(tmp_path / "m"), "--suite", str(data), "--device", "cpu", flag])
        expected = EvalSuite(load_suite(data), tok, "dev", chat=chat).score(model)
        assert json.loads(out.stdout)["models"]["m"] == {"score": expected.score, "tasks": expected.tasks}
    bad = CliRunner().invoke(main, ["eval", str(tmp_path / "m"), "--suite", "no-such-suite"])
    assert bad.exit_code == 2 and "Unknown suite 'no-such-suite'" in bad.output


def test_custom_masks_refuse_rows_longer_than_a_sliding_window():
    from evaluation.errors import EvalError
    from evaluation.packing import pack_rows, run_batches

    batches, prefix = pack_rows(_rows(), 8, 0, torch.device("cpu"), share_prefix=True)
    model = _random_model(1)
    model.config.sliding_window = 8  # rows reach position 8: 9 positions
    with pytest.raises(EvalError, match="rows of 9 tokens exceed the model's sliding window of 8"):
        run_batches(model, batches, torch.zeros(6, dtype=torch.float64), prefix)
    model.config.sliding_window = 9
    run_batches(model, batches, torch.zeros(6, dtype=torch.float64), prefix)


def test_the_output_head_runs_only_at_scored_positions(tmp_path):
    suite, tok, model = _write(tmp_path), tiny_tokenizer(), _random_model()
    evals = EvalSuite(suite, tok, "dev", batch_size=4)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape))
    try:
        evals.sequence_logprobs(model)
    finally:
        hook.remove()
    batches = [b for sh in evals._shards for b in sh.batches]
    # one 2-D call per batch, on its distinct scored positions only: one per target token, less
    # those an item's options share (the last context token predicts every option's first token)
    assert rows == [(len(b.positions), model.config.hidden_size) for b in batches]
    targets = sum(len(b.targets) for b in batches)
    assert sum(r[0] for r in rows) < targets
    positions = sum(b.input_ids.numel() for b in batches)
    assert sum(r[0] for r in rows) < positions / 2


def test_the_prefix_row_keeps_what_most_rows_share_when_it_would_grow_too_long(monkeypatch):
    from evaluation import packing
    from evaluation.packing import _prefix_lengths, build_rows, pack_rows, run_batches

    header = [1, 2, 3, 4]  # every row: a template
    passages = [[10 + p] * 6 for p in range(3)]  # two questions each: a passage
    flat = [(2 * p + q, header + passages[p] + [40 + q, 50], [50]) for p in range(3) for q in range(2)]
    rows = build_rows([[o] for o in flat], share=True)
    assert _prefix_lengths(rows) == [10] * 6  # header + passage (the questions differ)
    assert pack_rows(rows, 8, 0, torch.device("cpu"), share_prefix=True)[1].input_ids.shape[1] == 4 + 3 * 6
    monkeypatch.setattr(packing, "MAX_PREFIX_ROW", 20)  # 22 nodes do not fit: passages go, the header stays
    assert _prefix_lengths(rows) == [4] * 6
    batches, prefix = pack_rows(rows, 8, 0, torch.device("cpu"), share_prefix=True)
    assert prefix.input_ids.tolist() == [header]
    model = _random_model(2)
    shared, alone = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    run_batches(model, batches, shared, prefix)
    run_batches(model, pack_rows(build_rows([[o] for o in flat], share=False), 8, 0, torch.device("cpu"))[0], alone)
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-5)
