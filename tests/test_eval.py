"""EvalSuite: closed-form scores on a constant model, parity with an unbatched reference, no stale state."""

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from evaluation.errors import EvalError
from evaluation.suite import EvalSuite, encode_pair, render_prompt
from evaluation.tasks import load_suite, read_items
from tiny import tiny_config, tiny_tokenizer

# Hand-checked: the constant model gives every token a fixed log-prob, so each option's
# log-likelihood is a sum of known terms: lp(大) = 3 - Z, lp(小) = 1 - Z, lp(other) = -Z.
MINI = [
    {"id": "q1", "question": "一", "choices": ["大", "小"], "answer": 0},  # 大 wins: right
    {"id": "q2", "question": "二", "choices": ["小", "大"], "answer": 0},  # 大 wins: wrong
    {"id": "q3", "question": "三", "choices": ["大大", "小"], "answer": 1},  # 2lp(大) > lp(小): wrong, norm wrong
    {"id": "q4", "question": "四", "choices": ["小", "大大大"], "answer": 1},  # 3lp(大) < lp(小) but norm right
    {"id": "q5", "question": "五", "choices": ["一", "二"], "answer": 0},  # a tie goes to the first: right
]
REF = [{"id": "r1", "prompt": "一", "reference": "大小"}]


def _suite(tmp_path, choice=MINI, ref=REF):
    (tmp_path / "c.dev.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in choice))
    (tmp_path / "r.dev.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in ref))
    (tmp_path / "suite.yaml").write_text(
        "name: mini\ntasks:\n"
        "  - {name: pick, kind: choice, data: {dev: c.dev.jsonl}, weight: 3}\n"
        "  - {name: say, kind: reference, data: {dev: r.dev.jsonl}}\n"
    )
    return load_suite(tmp_path)


def constant_model(tok):
    """Every position predicts the same distribution: logits = (3 for 大, 1 for 小, else 0)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # residual branches off: hidden = embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token embeds to e0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        big, small = tok.convert_tokens_to_ids(["大", "小"])
        norm = math.sqrt(model.config.hidden_size)  # RMSNorm(e0) = sqrt(H) * e0
        model.lm_head.weight[big, 0] = 3.0 / norm
        model.lm_head.weight[small, 0] = 1.0 / norm
    return model


def test_choice_acc_and_acc_norm_hand_checked(tmp_path):
    tok = tiny_tokenizer()
    result = EvalSuite(_suite(tmp_path), tok, "dev", batch_size=3).score(constant_model(tok))
    vocab = len(tok)
    z = math.log(math.exp(3) + math.exp(1) + (vocab - 2))
    big, small, other = 3 - z, 1 - z, -z  # log-probabilities of one token
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))
    # the gold option's log-probability under a softmax over the item's options, item by item
    gold = [big - lse(big, small), small - lse(small, big), small - lse(2 * big, small),
            3 * big - lse(small, 3 * big), other - lse(other, other)]
    pick = result.tasks["pick"]
    assert (pick["acc"], pick["acc_norm"]) == (2 / 5, 3 / 5)
    assert pick["answer_logprob"] == pytest.approx(sum(gold) / 5, abs=1e-5)
    mean_lp = ((3 - z) + (1 - z) + (-z)) / 3  # 大, 小, then the chat template's <|eot_id|> (scored too)
    assert result.tasks["say"]["logprob"] == pytest.approx(mean_lp, abs=1e-5)
    assert result.tasks["say"]["prob"] == pytest.approx(math.exp(mean_lp), abs=1e-6)
    assert result.score == pytest.approx((3 * 0.4 + math.exp(mean_lp)) / 4, abs=1e-6)


def test_batched_logprobs_equal_an_unbatched_full_forward(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    suite = EvalSuite(_suite(tmp_path), tok, "dev", batch_size=4)
    got = suite.sequence_logprobs(model)
    expected = []
    for item in MINI:
        ctx = render_prompt(tok, item["question"])
        for choice in item["choices"]:
            c, r = encode_pair(tok, ctx, choice, special=False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([c + r])).logits[0].float(), -1)
            expected.append(sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(r)))
    c, r = encode_pair(tok, render_prompt(tok, "一"), "大小<|eot_id|>", special=False, move_whitespace=False)  # the end of turn is scored
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([c + r])).logits[0].float(), -1)
    expected.append(sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(r)))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def test_prompts_go_through_the_chat_template(tmp_path):
    tok = tiny_tokenizer()
    prompt = render_prompt(tok, "一二三")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n一二三<|eot_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_prompt(tiny_tokenizer(chat=False), "一二三") == "一二三"


def test_deterministic_and_never_stale(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_config()).eval()
    suite = EvalSuite(_suite(tmp_path), tok, "dev", batch_size=2)
    first, again = suite.sequence_logprobs(model), suite.sequence_logprobs(model)
    assert torch.equal(first, again)
    assert suite.score(model).as_dict() == suite.score(model).as_dict()
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place, as the merger does
    changed = suite.sequence_logprobs(model)
    assert not torch.allclose(first, changed)


def test_bad_data_names_file_line_and_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(EvalError, match=r"x\.jsonl:2: field 'choices' is missing"):
        read_items(p, "choice")
    p.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(EvalError, match=r"x\.jsonl:1: field 'answer' must index 'choices' \(0\.\.1\) but got 2"):
        read_items(p, "choice")
    p.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n{not json\n')
    with pytest.raises(EvalError, match=r"x\.jsonl:2: not valid JSON"):
        read_items(p, "choice")
    p.write_text('{"id": "a", "prompt": "q", "reference": "r"}\n{"id": "a", "prompt": "q", "reference": "r"}\n')
    with pytest.raises(EvalError, match=r"x\.jsonl:2: field 'id' 'a' appears twice"):
        read_items(p, "reference")


def test_unknown_suite_lists_the_available_ones(tmp_path):
    with pytest.raises(EvalError, match=r"Unknown suite 'nope'.*Available: .*demo"):
        load_suite("nope")
    (tmp_path / "suite.yaml").write_text("name: s\ntasks:\n  - {name: t, kind: guess, data: {dev: a.jsonl}}\n")
    with pytest.raises(EvalError, match=r"suite\.yaml: tasks\[0\]\.kind: must be one of \['choice', 'reference', 'generate', 'verifiable'\] but got 'guess'"):
        load_suite(tmp_path)
    with pytest.raises(EvalError, match="has no split 'test'"):
        _suite(tmp_path).tasks[0].items("test")


def test_on_batch_ticks_once_per_batch_and_changes_nothing(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    suite = EvalSuite(_suite(tmp_path), tok, "dev", batch_size=2, shards=2)
    ticks = []
    with_bar = suite.score(model, on_batch=lambda: ticks.append(1))
    assert len(ticks) == suite.n_batches >= 3  # 6 packed rows (5 choice items + 1 reference) in batches of 2
    assert with_bar.tasks == suite.score(model).tasks
