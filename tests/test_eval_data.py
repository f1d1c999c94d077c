"""Eval data: the built-in zh-instruct-lite suite, user data (JSONL, C-Eval CSV, datasets folders),
suite YAML keys, single files as suites, and errors that name the file, line and field."""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from evaluation.errors import EvalError
from evaluation.readers import detect, read_items
from evaluation.tasks import ANY_SPLIT, DATA_DIR, load_suite

LITE = DATA_DIR / "zh-instruct-lite"
CATEGORIES = {"knowledge", "reasoning", "reading", "math", "verifiable", "instruct", "idiom_poetry"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_zh_instruct_lite_is_valid_and_its_splits_are_disjoint():
    suite = load_suite("zh-instruct-lite")
    assert {t.name for t in suite.tasks} == CATEGORIES
    assert suite.splits() == {"dev", "test"}
    assert {t.name: t.kind for t in suite.tasks if t.kind != "choice"} == {
        "math": "generate", "verifiable": "verifiable", "instruct": "reference"}
    assert {t.name: t.weight for t in suite.tasks}["instruct"] == 0.0  # reported, not in the suite score
    assert (LITE / "README.md").is_file()
    ids, total = set(), 0
    for task in suite.tasks:
        texts = {}
        for split in ("dev", "test"):
            items = task.items(split)  # schema, unique ids within a file, answer among the options
            total += len(items)
            keys = {i["id"] for i in items}
            assert not keys & ids, f"{task.name}/{split}: ids used twice in the suite"
            ids |= keys
            texts[split] = {(i.get("passage"), i["text"]) for i in items}
            if task.kind == "choice":
                assert all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
            if task.name == "reading":
                assert all(i.get("passage") for i in items)
        assert not texts["dev"] & texts["test"], f"{task.name}: an item is in both splits"
        if task.name == "reading":  # split per passage
            assert not {p for p, _ in texts["dev"]} & {p for p, _ in texts["test"]}
    assert total >= 300


def test_kind_is_inferred_from_the_columns(tmp_path):
    choice = _jsonl(tmp_path / "c.jsonl", [{"id": "1", "question": "q", "choices": ["a", "b"], "answer": 1}])
    ref = _jsonl(tmp_path / "r.jsonl", [{"id": "1", "prompt": "q", "reference": "r"}])
    gen = _jsonl(tmp_path / "g.jsonl", [{"id": "1", "question": "q", "answer": 42, "aliases": ["四十二"]}])
    csv = tmp_path / "law_val.csv"
    csv.write_text("id,question,A,B,C,D,answer\n0,问题一,甲,乙,丙,丁,C\n1,\"两行\n问题\",甲,乙,丙,丁,A\n", encoding="utf-8")
    assert [detect(p) for p in (choice, ref, gen, csv)] == [
        ("choice", "native"), ("reference", "native"), ("generate", "native"), ("choice", "ceval")]
    assert read_items(gen, "generate") == [{"id": "1", "text": "q", "answers": ["42", "四十二"]}]
    listed = tmp_path / "g.json"
    listed.write_text(json.dumps([{"id": "1", "question": "q", "answer": 42, "aliases": ["四十二"]}]), encoding="utf-8")
    assert load_suite(listed).tasks[0].items("test") == read_items(gen, "generate")
    assert read_items(csv, "choice") == [
        {"id": "0", "text": "问题一", "choices": ["甲", "乙", "丙", "丁"], "answer": 2},
        {"id": "1", "text": "两行\n问题", "choices": ["甲", "乙", "丙", "丁"], "answer": 0},
    ]
    suite = load_suite(csv)  # a single file is a suite: one task, serving every split
    (task,) = suite.tasks
    assert (suite.name, task.name, task.kind, task.layout, set(task.files)) == (
        "law_val", "law_val", "choice", "ceval", {ANY_SPLIT})
    assert task.items("dev") == task.items("test")


def test_a_datasets_folder(tmp_path):
    import datasets

    rows = [{"id": f"x{i}", "question": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dict"))
    assert [i["answer"] for i in load_suite(tmp_path / "plain").tasks[0].items("dev")] == [0, 1, 2, 0, 1]
    (tmp_path / "suite.yaml").write_text(
        "name: hf\ntasks:\n"
        "  - {name: val, file: dict, hf_split: validation, split: dev}\n"
        "  - {name: tst, file: dict, hf_split: test, split: [dev, test], weight: 2}\n", encoding="utf-8")
    suite = load_suite(tmp_path)
    assert [len(t.items("dev")) for t in suite.tasks] == [2, 3]
    assert suite.splits() == {"dev"}
    with pytest.raises(EvalError, match=r"dict: a dataset with splits \['validation', 'test'\]: name one with `hf_split`"):
        load_suite(tmp_path / "dict")
    bad = [{"id": "a", "question": "q", "choices": ["a", "b"], "answer": 5}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(EvalError, match=r"bad row 0: field 'answer' must index 'choices' \(0\.\.1\) but got 5"):
        load_suite(tmp_path / "bad").tasks[0].items("dev")


def test_bad_user_data_names_file_line_and_field(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"x\.csv:3: field 'answer' must be one of \['A', 'B', 'C', 'D'\] but got 'E'"):
        read_items(csv, "choice")
    gen = _jsonl(tmp_path / "g.jsonl", [{"id": "1", "question": "q", "answer": "1"}, {"id": "2", "question": "q", "answer": "2", "aliases": "x"}])
    with pytest.raises(EvalError, match=r"g\.jsonl:2: field 'aliases' must be a list of strings but got 'x'"):
        read_items(gen, "generate")
    ref = _jsonl(tmp_path / "r.jsonl", [{"id": "1", "reference": "r"}])
    with pytest.raises(EvalError, match=r"r\.jsonl:1: field 'prompt' is missing"):
        read_items(ref, "reference")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"id": "1", "text": "q"}])
    with pytest.raises(EvalError, match=r"odd\.jsonl:1: cannot tell the task kind from the columns \['id', 'text'\]"):
        load_suite(odd)


def test_unreadable_files_and_missing_ceval_fields_give_one_line(tmp_path):
    gbk = tmp_path / "gbk.csv"  # an Excel export in GBK
    gbk.write_bytes("id,question,A,B,C,D,answer\n0,一二,三,四,五,六,A\n".encode("gbk"))
    with pytest.raises(EvalError, match=r"gbk\.csv:2: not UTF-8 text \(byte 31\): save the file as UTF-8$"):
        load_suite(gbk)
    noanswer = tmp_path / "noanswer.csv"
    noanswer.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"noanswer\.csv:2: field 'answer' is missing$"):
        load_suite(noanswer).tasks[0].items("dev")
    hole = tmp_path / "hole.csv"
    hole.write_text("id,question,A,B,C,D,answer\n0,q,a,b, ,d,A\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"hole\.csv:2: field 'C' is empty$"):
        load_suite(hole).tasks[0].items("dev")
    (tmp_path / "broken.yaml").write_text("name: s\ntasks: [\n", encoding="utf-8")
    with pytest.raises(EvalError) as e:
        load_suite(tmp_path / "broken.yaml")
    assert str(e.value) == f"{tmp_path / 'broken.yaml'}:3: not valid YAML: expected the node content, but found '<stream end>'"
    # JSON strings may hold U+2028 (a line break to str.splitlines, not to JSONL)
    sep = _jsonl(tmp_path / "sep.jsonl", [{"id": "1", "question": "a\u2028b", "choices": ["x", "y"], "answer": 0}])
    assert read_items(sep, "choice")[0]["text"] == "a\u2028b"


def test_suite_yaml_keys_are_checked(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"id": "1", "question": "q", "choices": ["a", "b"], "answer": 1}])
    cases = {
        "  - {name: t, file: c.jsonl, style: fancy}": r"tasks\[0\]\.style: must be one of \['cloze', 'letters'\] but got 'fancy'",
        "  - {name: t, file: c.jsonl, metric: exact_match}": r"tasks\[0\]\.metric: must be one of \['acc', 'acc_norm', 'answer_logprob'\] for a choice task",
        "  - {name: t, file: c.jsonl, data: {dev: c.jsonl}}": r"tasks\[0\]: give exactly one of 'data' \(split -> file\), 'file' or 'lmeval'",
        "  - {name: t, file: missing.jsonl}": r"tasks\[0\]\.file: file not found: .*missing\.jsonl",
        "  - {name: t, file: c.jsonl, weight: -1}": r"tasks\[0\]\.weight: must be a number >= 0 .* but got -1",
        "  - {name: t, file: c.jsonl, weight: 0}": r"suite\.yaml: tasks: every task has weight 0",
        "  - {name: t, file: c.jsonl, max_new_tokens: 0}": r"tasks\[0\]\.max_new_tokens: must be at least 1 but got 0",
        "  - {name: t, file: c.jsonl, chat: maybe}": r"tasks\[0\]\.chat: must be bool but got 'maybe'",
        "  - {name: t, lmeval: nope.yaml}": r"tasks\[0\]\.lmeval: file not found: .*nope\.yaml",
        "  - {name: t, file: c.jsonl, colour: red}": r"tasks\[0\]: unknown key 'colour'",
    }
    for line, message in cases.items():
        (tmp_path / "suite.yaml").write_text(f"name: s\ntasks:\n{line}\n", encoding="utf-8")
        with pytest.raises(EvalError, match=message):
            load_suite(tmp_path)
    (tmp_path / "suite.yaml").write_text("name: s\nsystem: 你好\nchat: false\ntasks:\n  - {file: c.jsonl, metric: acc_norm, stop: '。'}\n")
    suite = load_suite(tmp_path)
    (task,) = suite.tasks
    assert (suite.system, suite.chat, task.name, task.primary_metric, task.stop) == ("你好", False, "c", "acc_norm", ("。",))


def test_evaluation_never_imports_search_and_loads_lmeval_lazily():
    import subprocess
    import sys

    code = ("import sys, evaluation.suite, evaluation.lmeval, evaluation.tasks, evaluation.readers; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'search', 'lm_eval'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
