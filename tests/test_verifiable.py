"""The verifiable checks: each type on hand-written answers that pass and fail, loose variants,
IFEval's metrics (inst-level pooled over checks), language fidelity, and the data loader's errors."""

import json

import pytest

from evaluation.errors import EvalError
from evaluation.readers import read_items
from evaluation.verifiable import (CHECKS, check_item, check_item_loose, loose_variants, metrics, n_chars,
                                   traditional_chars, zh_fidelity)

REQUIRED = {"max_chars", "min_chars", "contains", "excludes", "starts_with", "ends_with", "line_count",
            "json_keys", "simplified_only", "fullwidth_punct"}

# (type, kwargs, answers that pass, answers that fail)
CASES = [
    ("max_chars", {"n": 5}, ["长城很长。", " 长 城\n很长。 \n", "12345"], ["长城非常长。", "１２３４５６"]),
    ("min_chars", {"n": 4}, ["长城很长", "ab c d"], ["长 城 长", "   \n"]),
    ("exact_chars", {"n": 7}, ["白日依山尽。。", "白日 依山尽，好"], ["白日依山尽", "白日依山尽啊啊啊"]),
    ("contains", {"words": ["长城", "北京"]}, ["北京有长城", "长城在北京。"], ["长城很长", "北 京的长城"]),
    ("excludes", {"words": ["因为", "所以"]}, ["天下雨了，地湿了。"], ["因为下雨，地湿了。", "所以呢"]),
    ("starts_with", {"phrase": "答："}, ["答：是的", "  答：是的"], ["回答：是的", "答:是的"]),
    ("ends_with", {"phrase": "谢谢！"}, ["好的，谢谢！", "好的，谢谢！  \n"], ["谢谢！好的", "好的，谢谢!"]),
    ("line_count", {"n": 3}, ["一\n二\n三", "一\n\n二\n  \n三\n"], ["一\n二", "一二三"]),
    ("list_items", {"n": 3},
     ["1. 苹果\n2. 香蕉\n3. 梨", "一、春\n二、夏\n三、秋", "- 甲\n* 乙\n• 丙", "（1）甲\n(2) 乙\n3）丙", "１．甲\n２．乙\n３．丙"],
     ["1. 苹果\n2. 香蕉", "苹果\n香蕉\n梨", "1.5 千克\n2.5 千克\n3.5 千克"]),
    ("sentence_count", {"n": 2}, ["今天晴。明天雨！", "你好吗？我很好", "真的吗?!是的。"], ["今天晴。", "一。二。三。", "等等……然后呢"]),
    ("paragraphs", {"n": 2}, ["第一段。\n\n第二段。", "第一段\n还是第一段\n\u3000\n第二段\n"], ["第一段。\n第二段。", "一\n\n二\n\n三"]),
    ("json_keys", {"keys": ["姓名", "城市"]},
     ['{"姓名": "张三", "城市": "杭州"}', ' {"姓名": "李四", "城市": "成都", "年龄": 30}\n'],
     ['{"姓名": "张三"}', '```json\n{"姓名": "张三", "城市": "杭州"}\n```', '["姓名", "城市"]', "姓名：张三"]),
    ("simplified_only", {}, ["我们说话。", "发展后来的事情", "１２３，数字也行"], ["我們說話。", "我们用Python", "全角ｐｙ"]),
    ("fullwidth_punct", {}, ["你好，世界！", "气温是3.5度，时间10:30。", "１２．５"], ["你好,世界", "真的!", "他说\"好\"", "结束.", "(注)"]),
    ("wrapped", {"left": "《", "right": "》"}, ["《静夜思》", " 《春晓》\n"], ["《静夜思", "静夜思》", "《》", "《"]),
    ("one_of", {"options": ["是", "否"]}, ["是", "否。", " 是 "], ["是的", "否，因为", "不是"]),
    ("placeholders", {"n": 2}, ["[姓名]您好，请于[日期]到场。", "[a][b][c]"], ["[姓名]您好", "[]和[ ]", "【姓名】【日期】"]),
    ("word_count", {"word": "春天", "n": 2}, ["春天来了，春天真好。"], ["春天来了。", "春 天和春天"]),
    ("repeat_first", {"text": "什么是光合作用？"}, ["什么是光合作用？光合作用是植物……"], ["什么是光合作用？", "光合作用是……", "什么是光合作用?植物"]),
    ("no_digits", {}, ["三月十二日", "第一名"], ["3月12日", "第１名"]),
]


def test_the_registry_holds_the_required_types_and_fifteen_or_more():
    assert REQUIRED <= set(CHECKS) and len(CHECKS) >= 15
    assert {c[0] for c in CASES} == set(CHECKS)  # every type is tested below


@pytest.mark.parametrize("kind,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_each_check_passes_and_fails_hand_written_answers(kind, kwargs, good, bad):
    for answer in good:
        assert CHECKS[kind](answer, **kwargs), (kind, answer)
    for answer in bad:
        assert not CHECKS[kind](answer, **kwargs), (kind, answer)


def test_characters_are_counted_without_whitespace_full_width_spaces_included():
    assert n_chars("长 城\u3000很\t长。\n") == 5
    assert n_chars("") == 0


def test_traditional_characters_come_from_opencc():
    assert traditional_chars("我們說的話") == ["們", "說", "話"]
    assert traditional_chars("我们说的话") == []


def test_loose_variants_drop_a_first_or_last_line_and_markdown_emphasis():
    answer = "好的，以下是答案：\n**春眠不觉晓**\n希望对你有帮助"
    variants = loose_variants(answer)
    assert "春眠不觉晓" in variants  # both lines dropped and * removed
    assert len(variants) == 8
    item = {"checks": [{"type": "wrapped", "left": "春", "right": "晓"}, {"type": "max_chars", "n": 30}]}
    assert check_item(item, answer) == [False, True]
    assert check_item_loose(item, answer) == [True, True]


def test_ifeval_metrics_of_one_answer():
    item = {"checks": [{"type": "starts_with", "phrase": "答"}, {"type": "max_chars", "n": 4},
                       {"type": "excludes", "words": ["不"]}]}
    assert metrics(item, "答：好的呀") == {"prompt_level_strict_acc": 0.0, "inst_level_strict_acc": 2 / 3,
                                       "prompt_level_loose_acc": 0.0, "inst_level_loose_acc": 2 / 3}
    assert metrics(item, "答：好")["prompt_level_strict_acc"] == 1.0


def test_an_empty_answer_follows_no_instruction():
    item = {"checks": [{"type": "excludes", "words": ["不"]}, {"type": "no_digits"}, {"type": "max_chars", "n": 9}]}
    assert check_item(item, "  \n") == [False, False, False] and check_item_loose(item, "") == [False] * 3
    assert check_item(item, "好") == [True, True, True]


def test_zh_fidelity_flags_english_and_traditional_answers():
    assert zh_fidelity("长城在北京。") == 1.0
    assert zh_fidelity("42") == 1.0  # a bare number: nothing slipped
    assert zh_fidelity("这台电脑的CPU很快") == 1.0  # a Latin name among Chinese
    assert zh_fidelity("The Great Wall is long.") == 0.0
    assert zh_fidelity("長城很長。") == 0.0


def _write(tmp_path, rows):
    path = tmp_path / "v.dev.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_loader_names_the_line_and_check_of_bad_items(tmp_path):
    good = {"id": "v1", "prompt": "只回答是或否。", "checks": [{"type": "one_of", "options": ["是", "否"]}], "witness": "是"}
    assert read_items(_write(tmp_path, [good]), "verifiable")[0]["checks"] == good["checks"]
    bad = [
        ({"checks": [{"type": "shout"}]}, r"v\.dev\.jsonl:1: field 'checks'\[0\]: unknown check type 'shout'"),
        ({"checks": [{"type": "max_chars"}]}, r"check 'max_chars' takes \['n'\] but got none"),
        ({"checks": [{"type": "max_chars", "n": "10"}]}, r"n must be a non-negative integer"),
        ({"checks": [{"type": "contains", "words": []}]}, r"words must be a non-empty list"),
        ({"checks": []}, r"field 'checks' must list at least one check"),
        ({"witness": "也许"}, r"field 'witness' fails its own check\(s\) one_of"),
    ]
    for change, message in bad:
        with pytest.raises(EvalError, match=message):
            read_items(_write(tmp_path, [good | change]), "verifiable")
