"""zh-instruct-lite v2 data quality: size and power, near-duplicates across splits, answer-position
and option-length balance, cloze-safe questions, and satisfiable verifiable items."""

import re
from collections import Counter
from itertools import product

import pytest

from evaluation.tasks import load_suite
from evaluation.verifiable import CHECKS, check_item

RUN = 16  # characters (digits dropped): a shared run this long between a dev and a test item is a near-duplicate
COMMON = 3  # a run found in this many items or more is boilerplate, not content


@pytest.fixture(scope="module")
def suite():
    return load_suite("zh-instruct-lite")


@pytest.fixture(scope="module")
def items(suite):
    return {(t.name, split): t.items(split) for t in suite.tasks for split in ("dev", "test")}


def _content(item: dict) -> str:
    return item.get("passage", "") + item["text"]


def _runs(text: str, n: int = RUN) -> set[str]:
    """Every run of n characters, whitespace and digits dropped (numbers are compared as sets, so
    "长8厘米，它的面积是多少平方厘米" and "长6厘米，它的面积是多少平方厘米" are one template)."""
    text = re.sub(r"[\s\d]+", "", text)
    return {text[i:i + n] for i in range(len(text) - n + 1)}



def near_duplicates(dev: list[dict], test: list[dict], numbers: bool = True, run: int = RUN) -> list[tuple[str, str, str]]:
    """(dev id, test id, why) for every pair that shares content: a run of `run` characters that
    is not boilerplate (passages shared within a split are fine), a correct answer of 4+
    characters (of an item without a passage: a reading answer is in its passage) quoted in an
    item of the other split, or (`numbers`) the same 2+ numbers in the same phrasing (a shared
    run of 6)."""
    everything = dev + test
    counts = Counter(r for it in everything for r in _runs(_content(it), run))
    runs = {it["id"]: {r for r in _runs(_content(it), run) if counts[r] < COMMON} for it in everything}
    found = []
    for a, b in product(dev, test):
        shared = runs[a["id"]] & runs[b["id"]]
        if shared:
            found.append((a["id"], b["id"], f"shares {min(shared)!r}"))
        for x, y in ((a, b), (b, a)):
            if "choices" in x and "passage" not in x:
                gold = x["choices"][x["answer"]]
                if len(gold) >= 4 and gold in _content(y):
                    found.append((a["id"], b["id"], f"{y['id']} quotes the answer {gold!r} of {x['id']}"))
        na, nb = (sorted(re.findall(r"\d+(?:\.\d+)?", _content(x))) for x in (a, b))
        if numbers and len(na) >= 2 and na == nb and _runs(_content(a), 6) & _runs(_content(b), 6):
            found.append((a["id"], b["id"], f"the same numbers {na}"))
    return found


def test_near_duplicate_finder_catches_the_kinds_of_twins_it_is_for():
    dev = [{"id": "d1", "text": "一个长方形长8厘米，宽5厘米，它的面积是多少平方厘米？"},
           {"id": "d4", "text": "已知：如果明天下雨，学校运动会就推迟到下周一举行。已知运动会没有推迟，可以推出什么？"},
           {"id": "d2", "text": "“纸上谈兵”这个成语说的是哪个历史人物？", "choices": ["赵括", "廉颇", "白起", "蒙恬"], "answer": 0},
           {"id": "d3", "text": "甲、乙、丙三人中，甲比乙高，乙比丙高，谁最高？"}]
    test = [{"id": "t1", "text": "一个长方形长8厘米，宽5厘米，它的周长是多少厘米？"},
            {"id": "t2", "text": "比喻空谈理论、不能解决实际问题的成语是什么？", "choices": ["纸上谈兵", "画蛇添足", "守株待兔", "刻舟求剑"], "answer": 0},
            {"id": "t3", "text": "小明今年比去年多读了三本书，去年读了几本？"},
            {"id": "t4", "text": "已知：如果明天下雨，学校运动会就推迟到下周一举行。已知明天下雨，可以推出什么？"},
            {"id": "t5", "text": "一个正方形边长8厘米，它的面积是多少平方厘米？"},  # one template, other numbers
            {"id": "t7", "text": "一个三角形底6厘米、高4厘米，它的面积是多少平方厘米？"},
            {"id": "t6", "text": "北宋的都城东京位于今天的哪座城市？"}]  # the same phrasing of another fact
    dev.append({"id": "d6", "text": "南宋的都城临安位于今天的哪座城市？"})
    why = {(a, b) for a, b, _ in near_duplicates(dev, test)}
    assert ("d1", "t1") in why and ("d2", "t2") in why and ("d4", "t4") in why
    assert len(why) == 3


def test_the_suite_is_large_enough_to_tell_merges_apart(suite, items):
    for split in ("dev", "test"):
        assert sum(len(v) for (_, s), v in items.items() if s == split) >= 400, split
    assert sum(len(v) for v in items.values()) >= 900
    verifiable = [t for t in suite.tasks if t.kind == "verifiable"]
    assert len(verifiable) == 1
    assert sum(len(items[verifiable[0].name, s]) for s in ("dev", "test")) >= 150


def test_no_near_duplicates_across_splits(suite, items):
    found = []
    for task in suite.tasks:
        # a verifiable prompt's numbers are its constraints' (列出3点, 不超过50个字), and its
        # constraint wording repeats: only a long shared run there is a twin
        v = task.kind == "verifiable"
        found += near_duplicates(items[task.name, "dev"], items[task.name, "test"], numbers=not v,
                                 run=24 if v else RUN)
    assert not found, "\n".join(f"{a} ~ {b}: {why}" for a, b, why in found)


def test_no_near_duplicates_across_tasks_and_splits(suite, items):
    dev = [i for (t, s), v in items.items() if s == "dev" for i in v]
    test = [i for (t, s), v in items.items() if s == "test" for i in v]
    found = [f for f in near_duplicates(dev, test, numbers=False) if f[0].split("-")[0] != f[1].split("-")[0]]
    assert not found, "\n".join(f"{a} ~ {b}: {why}" for a, b, why in found)


def _choice_files(suite, items):
    return [(t.name, s, items[t.name, s]) for t in suite.tasks if t.kind == "choice" for s in ("dev", "test")]


def test_answer_positions_are_balanced(suite, items):
    for task, split, rows in _choice_files(suite, items):
        counts = Counter(i["answer"] for i in rows)
        slack = 3 + 0.05 * len(rows)
        assert all(abs(counts[k] - len(rows) / 4) <= slack for k in range(4)), (task, split, dict(counts))


def test_the_correct_option_is_not_given_away_by_its_length(suite, items):
    for task, split, rows in _choice_files(suite, items):
        longest = shortest = 0
        for i in rows:
            lengths = [len(c) for c in i["choices"]]
            gold, others = lengths[i["answer"]], lengths[:i["answer"]] + lengths[i["answer"] + 1:]
            longest += gold > max(others)
            shortest += gold < min(others)
        assert longest <= 0.3 * len(rows), (task, split, f"correct option strictly longest in {longest}/{len(rows)}")
        assert shortest <= 0.3 * len(rows), (task, split, f"correct option strictly shortest in {shortest}/{len(rows)}")


def test_cloze_questions_never_refer_to_options_they_do_not_show(suite, items):
    bad = [i["id"] for _, _, rows in _choice_files(suite, items) for i in rows
           if re.search(r"下列|以下哪|哪个选项|哪一个选项|选项中", i["text"])]
    assert not bad, bad


def test_every_verifiable_item_is_satisfiable_and_the_split_covers_every_check(suite, items):
    task = next(t for t in suite.tasks if t.kind == "verifiable")
    for split in ("dev", "test"):
        rows = items[task.name, split]
        assert all("witness" in i and all(check_item(i, i["witness"])) for i in rows)
        kinds = Counter(c["type"] for i in rows for c in i["checks"])
        assert len(kinds) >= 15 and set(kinds) <= set(CHECKS), (split, kinds)
        assert all(1 <= len(i["checks"]) <= 3 for i in rows)


def test_readme_examples_come_from_dev_and_match_the_data(suite, items):
    readme = (suite.path.parent / "README.md").read_text(encoding="utf-8")
    dev = {i["id"]: i for (t, s), v in items.items() if s == "dev" for i in v}
    test = {i["id"] for (t, s), v in items.items() if s == "test" for i in v}
    shown = re.findall(r'^\{"id": "([^"]+)"', readme, flags=re.M)
    assert len(shown) >= 6
    for line in (x for x in readme.splitlines() if x.startswith('{"id": ')):
        row = __import__("json").loads(line)
        assert row["id"] in dev and row["id"] not in test, row["id"]
        text = row.get("question", row.get("prompt"))
        assert text == dev[row["id"]]["text"], row["id"]  # the example is the item (passages may be cut)
