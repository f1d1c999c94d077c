"""The demo family builder (search/demo.py) and the demo suite it generates.

Fast tests check the generators, the tokenizer and the cache mechanics (with a fake builder);
`slow` tests use the real family, built once per machine (about 4 minutes on 2 CPU cores) into
the cache ($MERGE_SEARCH_CACHE or ~/.cache/merge-search), and found there by later runs.
"""

from __future__ import annotations

import json
import platform
import re
import threading
import time
from pathlib import Path

import pytest

from search import demo
from search.errors import MergeSearchError

SUITE_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "data" / "demo"
FAMILY = ("base",) + demo.MODEL_NAMES
SPLITS = ("dev", "test")


def _all_items() -> list[dict]:
    return [item for skill in demo.SKILLS for split in SPLITS
            for item in demo.eval_items(skill.task, split)]


# ------------------------------------------------------------------------- suite and data


def test_renderers():
    assert demo.to_zh("4705") == "四七零五"
    assert demo.to_daxie("4705") == "肆柒零伍"
    assert demo.to_zh("0000") == "零零零零"


def test_committed_suite_equals_generator(tmp_path):
    demo.write_suite(tmp_path)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in SUITE_DIR.iterdir())
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_bytes() == (SUITE_DIR / name).read_bytes(), name


def test_suite_yaml_lists_every_task():
    import yaml

    spec = yaml.safe_load((SUITE_DIR / "suite.yaml").read_text(encoding="utf-8"))
    assert spec["name"] == "demo"
    assert [t["name"] for t in spec["tasks"]] == [s.task for s in demo.SKILLS]
    for task in spec["tasks"]:
        assert task["kind"] == "choice"
        assert task["data"] == {s: f"{task['name']}.{s}.jsonl" for s in SPLITS}


def test_items_well_formed():
    items = _all_items()
    assert len(items) == len(demo.SKILLS) * len(SPLITS) * demo.N_EVAL
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, item
        assert 0 <= item["answer"] < 4, item
    assert {item["answer"] for item in items} == {0, 1, 2, 3}  # answer position varies


@pytest.mark.parametrize("skill", demo.SKILLS, ids=lambda s: s.task)
def test_answer_is_the_right_rendering(skill):
    to_code = {skill.source(c): c for c in (f"{i:04d}" for i in range(10 ** demo.CODE_LEN))}
    for split in SPLITS:
        for item in demo.eval_items(skill.task, split):
            x = item["question"].rsplit("：", 1)[1]
            assert item["choices"][item["answer"]] == skill.target(to_code[x]), item


def test_eval_items_never_in_training_data():
    questions = {q for s in demo.SKILLS for q, _ in demo.train_examples(s.task)}
    questions |= {q for q, _ in demo.echo_examples()}
    held_out = [item["question"] for item in _all_items()]
    assert not questions & set(held_out)

    # stronger: no held-out code appears, in any of its forms, anywhere in any training text
    split = demo.code_split()
    held_codes = {c for key, codes in split.items() if key != "train" for c in codes}
    assert not held_codes & set(split["train"])
    to_code = {f(c): c for c in held_codes for f in (str, demo.to_zh, demo.to_daxie)}
    texts = [demo.pretrain_text()] + [q + "\n" + a for s in demo.SKILLS
                                       for q, a in demo.train_examples(s.task)]
    texts += [q + "\n" + a for q, a in demo.echo_examples()]
    runs = re.compile("[0-9]+|[零一二三四五六七八九]+|[零壹贰叁肆伍陆柒捌玖]+")
    leaked = {run for text in texts for run in runs.findall(text) if run in to_code}
    assert not leaked


def test_recipe_needs_one_schedule_per_variant():
    assert len(demo.Recipe().ft_steps) == len(demo.Recipe().ft_lr) == len(demo.MODEL_NAMES)
    with pytest.raises(ValueError, match=r"Recipe.ft_steps needs one value per variant .* but got \(80, 80\)"):
        demo.Recipe(ft_steps=(80, 80))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="Available: numerals, daxie, arabic"):
        demo.eval_items("nope", "dev")


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_char_level_and_chat_template():
    tok = demo.build_tokenizer()
    text = "小明的电话号码是4705，读作四七零五。"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == [tok.bos_token_id] + ids  # the post-processor adds BOS
    messages = [{"role": "user", "content": "请原样写出：4705"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == demo.render_chat("请原样写出：4705")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    specials = tok(prompt, add_special_tokens=False)["input_ids"]
    assert specials[:2] == tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>"])


def test_encode_chat_matches_the_chat_template():
    tok = demo.build_tokenizer()
    pairs = demo.train_examples("arabic")[:3] + demo.echo_examples()[:3]
    for (q, a), (ids, start) in zip(pairs, demo.encode_chat(tok, pairs)):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}],
                                         add_generation_prompt=True, tokenize=False)
        assert ids == tok(prompt + a + demo.EOS, add_special_tokens=False)["input_ids"]
        assert start == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[start:]) == a + demo.EOS


def test_every_training_character_is_in_the_vocabulary():
    tok = demo.build_tokenizer()
    text = demo.pretrain_text() + "".join(q + a for s in demo.SKILLS
                                          for q, a in demo.train_examples(s.task))
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- cache


def test_cache_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_SEARCH_CACHE", str(tmp_path))
    assert demo.cache_root() == tmp_path
    assert demo.demo_family_dir() == tmp_path / f"demo-family-v{demo.DEMO_VERSION}"
    assert demo.demo_family_dir(tmp_path / "x").parent == tmp_path / "x"
    monkeypatch.delenv("MERGE_SEARCH_CACHE")
    assert demo.cache_root() == Path.home() / ".cache" / "merge-search"


def _fake_build(calls: list, delay: float = 0.0, fail: bool = False):
    def build(out: Path):
        calls.append(out)
        time.sleep(delay)
        if fail:
            raise RuntimeError("boom")
        for name in FAMILY:
            (out / name).mkdir(parents=True)
            for f in ("model.safetensors", "tokenizer.json"):
                (out / name / f).write_text("x")
        return {name: out / name for name in FAMILY}

    return build


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(demo, "build_family", _fake_build(calls, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo_family(tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = demo.demo_family_dir(tmp_path)
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != target
    assert results[0] == results[1] == {name: target / name for name in FAMILY}
    assert demo.ensure_demo_family(tmp_path) == results[0] and len(calls) == 1
    assert not list(tmp_path.glob(".*tmp-*"))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "build_family", _fake_build([], fail=True))
    with pytest.raises(RuntimeError, match="boom"):
        demo.ensure_demo_family(tmp_path)
    assert not demo.demo_family_dir(tmp_path).exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_incomplete_cache_folder_is_reported(tmp_path):
    (demo.demo_family_dir(tmp_path) / "base").mkdir(parents=True)
    with pytest.raises(MergeSearchError, match="incomplete .*delete it to rebuild"):
        demo.ensure_demo_family(tmp_path)


# ------------------------------------------------------------------------- the real family


@pytest.fixture(scope="session")
def family(demo_family) -> dict[str, Path]:
    return demo_family  # the one cached family (tests/conftest.py): built once per machine


@pytest.mark.slow
def test_family_folders(family):
    assert list(family) == list(FAMILY)
    for name, folder in family.items():
        for f in ("model.safetensors", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json"):
            assert (folder / f).is_file(), folder / f
    shared = [f.name for f in family["base"].iterdir() if f.name != "model.safetensors"]
    for name in demo.MODEL_NAMES:  # same config and tokenizer files everywhere
        for f in shared:
            assert (family[name] / f).read_bytes() == (family["base"] / f).read_bytes(), (name, f)
    assert demo.ensure_demo_family(family["base"].parent.parent) == family  # found, not rebuilt


# sha256 over each model's tensors (sorted names, then bytes): the pinned build (demo.PINNED_KERNELS)
# gives these bits on every x86-64 CPU; before it, two machines' families scored 0.86 and 0.93 uniform
FINGERPRINTS = {"base": "dae36917b7220b37", "inst-v1": "b66a25808e4966c7",
                "inst-v2": "8c35edced0ff4725", "inst-meta": "7ab6884369507521"}


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the pinned kernels are x86-64's; other CPUs train a family of their own bits")
def test_family_is_the_same_on_every_x86_machine(family):
    import hashlib

    from safetensors.torch import load_file

    got = {}
    for name, folder in family.items():
        tensors = load_file(folder / "model.safetensors")
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].numpy().tobytes())
        got[name] = h.hexdigest()[:16]
    assert got == FINGERPRINTS


def test_the_build_refuses_unpinned_kernels(tmp_path, monkeypatch):
    """The child checks that torch honoured the pin; a failed child is one line naming the folder."""
    monkeypatch.setattr(demo, "PINNED_KERNELS", {**demo.PINNED_KERNELS, "ATEN_CPU_CAPABILITY": "nonsense"})
    with pytest.raises(MergeSearchError) as err:
        demo.build_family(tmp_path / "fam")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "fam") in msg and "ATEN_CPU_CAPABILITY=default was not honoured" in msg
    assert not (tmp_path / "fam").exists()


@pytest.mark.slow
def test_family_loads(family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["base"])
    text = "请把这个号码写成大写数字：4705"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template == demo.CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (demo.BOS, demo.EOS, demo.PAD)
    config = json.loads((family["base"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    states = {}
    for name, folder in family.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.vocab_size == len(tok)
        states[name] = model.state_dict()
        assert all(v.dtype == torch.float32 for v in states[name].values())
    for name in demo.MODEL_NAMES:  # fine-tuned: every variant moved away from the base
        assert not torch.equal(states[name]["lm_head.weight"], states["base"]["lm_head.weight"])


@pytest.mark.slow
def test_variant_answers_its_own_skill(family):
    """Greedy decoding of one held-out dev item per skill by the variant trained on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["base"])
    for skill in demo.SKILLS:
        model = AutoModelForCausalLM.from_pretrained(family[skill.model])
        item = demo.eval_items(skill.task, "dev")[0]
        ids = tok(demo.render_chat(item["question"]), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == item["choices"][item["answer"]], (skill.task, item, answer)


@pytest.mark.slow
def test_the_merge_weights_matter(family):
    """The family's contract: each variant wins its own skill, the uniform average loses much of
    the light inst-meta's skill (v3: arabic 0.75 dev, 0.68 test), and the best weights (inst-meta
    heavy) recover it on both splits (v3: 0.91 -> 1.00 dev, 0.88 -> 0.98 test)."""
    import torch
    from transformers import AutoTokenizer

    from evaluation.suite import EvalSuite
    from evaluation.tasks import load_suite
    from search.bench.grid import score_grid
    from search.checkpoints import open_checkpoint
    from search.merger import InMemoryMerger
    from search.space import MergeSpace

    names = demo.MODEL_NAMES
    merger = InMemoryMerger([open_checkpoint(n, family[n]) for n in names], device="cpu",
                            dtype=torch.float32)
    space = MergeSpace("linear", {n: str(family[n].resolve()) for n in names}, normalize=True,
                       num_layers=merger.num_layers)
    tok = AutoTokenizer.from_pretrained(family["base"])
    suite = load_suite(str(SUITE_DIR))
    suites = {split: EvalSuite(suite, tok, split, batch_size=64) for split in SPLITS}
    vertices = [tuple(float(i == j) for j in range(3)) for i in range(3)]
    uniform, best = (1 / 3,) * 3, (0.15, 0.15, 0.7)  # the grid optimum on dev and on test
    rows = score_grid(merger, space, suites, vertices + [uniform, best])

    for split in SPLITS:
        keys = suites[split].example_keys
        assert len(keys) == len(demo.SKILLS) * demo.N_EVAL
        tasks = {}
        for row in rows:  # the per-example lists are in example_keys order and make the score
            per_task = {s.task: [v for k, v in zip(keys, row[split]["examples"])
                                 if k.startswith(s.task + "/")] for s in demo.SKILLS}
            accs = {t: sum(v) / len(v) for t, v in per_task.items()}
            assert row[split]["score"] == pytest.approx(sum(accs.values()) / len(accs))
            tasks[row["weights"]] = accs
        for skill, vertex in zip(demo.SKILLS, vertices):
            assert tasks[vertex][skill.task] == 1.0, (split, skill.model)
            others = [tasks[v][skill.task] for v in vertices if v != vertex]
            assert max(others) < 0.5, (split, skill.task, others)
        scores = {row["weights"]: row[split]["score"] for row in rows}
        assert tasks[uniform]["numerals"] >= 0.95 and tasks[uniform]["daxie"] >= 0.95, split
        assert tasks[uniform]["arabic"] < 0.8, split  # diluted: the light variant's skill goes
        assert scores[best] > scores[uniform] + 0.05, split
        assert scores[best] > max(scores[v] for v in vertices) + 0.4, split
