"""`merge-search bench eval`: the native `EvalSuite` vs lm-eval's `evaluator.evaluate`, side by side.

    merge-search bench eval --json

One run, one live model (the uniform merge of the demo family, in the in-memory merger), one
task set (the choice tasks of the demo suite, one split), the same fixed batch size. lm-eval gets
its best case: HFLM built once, tasks prebuilt once (the same data as lm-eval task YAMLs),
`bootstrap_iters=0`, `log_samples=False`; both sides are warmed up once, then timed `repeats`
times, interleaved (median). The acc and acc_norm of every task must be identical.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timed_side_by_side(fns: list, repeats: int) -> tuple[list[float], list[object]]:
    """Median seconds of each function, runs interleaved so that both see the same machine load."""
    outs = [fn() for fn in fns]  # warm-up: first-call allocations and lazy imports are not what a trial pays
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], outs


def bench_eval(*, suite: str = "demo", split: str = "dev", batch_size: int = 32, repeats: int = 5,
               device: str = "cpu") -> dict:
    """Time both scorers on the same tasks and weights; returns the figures as one flat dict."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from evaluation.lmeval import load_lmeval_tasks, native_task_yaml
    from evaluation.suite import EvalSuite
    from evaluation.tasks import Suite, load_suite
    from search.checkpoints import open_checkpoint
    from search.demo import MODEL_NAMES, ensure_demo_family
    from search.merger import InMemoryMerger

    family = ensure_demo_family()
    sources = [open_checkpoint(name, family[name]) for name in MODEL_NAMES]
    merger = InMemoryMerger(sources, device=device, dtype=torch.float32)
    merger.apply({"merge_method": "linear", "parameters": {"normalize": True},  # the uniform average
                  "models": [{"model": str(family[n]), "parameters": {"weight": 1.0}} for n in MODEL_NAMES]})
    model = merger.model
    tokenizer = AutoTokenizer.from_pretrained(family[MODEL_NAMES[0]])

    full = load_suite(suite)
    tasks = [t for t in full.tasks if t.kind == "choice"]
    choice = Suite(name=full.name, path=full.path, tasks=tasks, system=full.system, chat=full.chat)
    t0 = time.perf_counter()
    native = EvalSuite(choice, tokenizer, split, batch_size=batch_size, device=device)
    setup_s = time.perf_counter() - t0
    settings = {native.settings(t) for t in tasks}
    if len(settings) != 1:
        raise ValueError(f"the benched tasks need one chat/system setting but have {settings}")
    chat, system = settings.pop()

    with tempfile.TemporaryDirectory() as tmp:
        yamls = [str(native_task_yaml(t, split, Path(tmp))) for t in tasks]
        loaded = load_lmeval_tasks(yamls)
        task_dict = {"tasks": {k: v for d in loaded for k, v in d["tasks"].items()}, "groups": {}, "group_map": {}}
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, softmax_dtype="float32")
        (native_s, lmeval_s), (native_res, lm_res) = _timed_side_by_side([
            lambda: native.score(model),
            lambda: evaluator.evaluate(lm, task_dict, bootstrap_iters=0, log_samples=False,
                                       apply_chat_template=chat, system_instruction=system),
        ], repeats)

    per_task, n_total, nat_correct, lm_correct, identical = {}, 0, 0.0, 0.0, True
    for task, loaded_one in zip(tasks, loaded):
        name = next(iter(loaded_one["tasks"]))
        n = len(task.items(split))
        nat = native_res.tasks[task.name]
        ref = {m: lm_res["results"][name][f"{m},none"] for m in ("acc", "acc_norm")}
        same = nat["acc"] == ref["acc"] and nat["acc_norm"] == ref["acc_norm"]
        identical &= same
        per_task[task.name] = {"n": n, "native": nat, "lmeval": ref, "identical": same}
        n_total += n
        nat_correct += nat["acc"] * n
        lm_correct += ref["acc"] * n
    return {
        "bench": "eval",
        "suite": full.name,
        "split": split,
        "items": n_total,
        "sequences": native.n_sequences,
        "batch_size": batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "native_setup_s": round(setup_s, 4),
        "native_s": round(native_s, 4),
        "lmeval_s": round(lmeval_s, 4),
        "speedup_vs_lmeval": round(lmeval_s / native_s, 2),
        "acc_native": nat_correct / n_total,
        "acc_lmeval": lm_correct / n_total,
        "acc_identical": identical,
        "tasks": per_task,
    }


def bench_suite(*, suite: str = "zh-instruct-lite", split: str = "dev", models: tuple[str, ...] = ("demo", "150M"),
                batch_size: int = 32, repeats: int = 1, device: str = "cpu") -> dict:
    """Seconds to score one candidate on a whole suite (what a trial pays), and each task kind's
    share, for the demo family's uniform merge and for a randomly initialised Llama of a given
    size (`150M`) that shares the demo tokenizer.

    Every kind is timed on its own suite of that kind's tasks, then the whole suite once more.
    The random model never says end-of-turn, so its generations run to `max_new_tokens`: the
    worst case of a generated task. A trained model that stops early pays less."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evaluation.suite import EvalSuite
    from evaluation.tasks import Suite, load_suite
    from search.bench.merge import _llama_config, parse_count
    from search.checkpoints import open_checkpoint
    from search.demo import MODEL_NAMES, ensure_demo_family
    from search.merger import InMemoryMerger

    family = ensure_demo_family()
    tokenizer = AutoTokenizer.from_pretrained(family[MODEL_NAMES[0]])
    full = load_suite(suite)
    kinds = list(dict.fromkeys(t.kind for t in full.tasks))
    part = lambda tasks: Suite(name=full.name, path=full.path, tasks=tasks, system=full.system, chat=full.chat)  # noqa: E731
    suites = {kind: EvalSuite(part([t for t in full.tasks if t.kind == kind]), tokenizer, split,
                              batch_size=batch_size, device=device) for kind in kinds}
    whole = EvalSuite(full, tokenizer, split, batch_size=batch_size, device=device)
    items = {kind: sum(len(t.items(split)) for t in full.tasks if t.kind == kind) for kind in kinds}

    out = {"bench": "eval-suite", "suite": full.name, "split": split, "items": sum(items.values()),
           "batch_size": batch_size, "device": str(device), "torch_threads": torch.get_num_threads(),
           "repeats": repeats, "models": {}}
    for name in models:
        if name == "demo":
            sources = [open_checkpoint(n, family[n]) for n in MODEL_NAMES]
            merger = InMemoryMerger(sources, device=device, dtype=torch.float32)
            merger.apply({"merge_method": "linear", "parameters": {"normalize": True},
                          "models": [{"model": str(family[n]), "parameters": {"weight": 1.0}} for n in MODEL_NAMES]})
            model = merger.model
        else:
            torch.manual_seed(0)
            config = _llama_config(parse_count(name))
            config.vocab_size = max(config.vocab_size, len(tokenizer))
            config.max_position_embeddings = 4096
            model = LlamaForCausalLM(config).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        times, _ = _timed_side_by_side([lambda s=s, m=model: s.score(m) for s in (*suites.values(), whole)], repeats)
        per_kind = dict(zip(kinds, times[:-1]))
        total = sum(per_kind.values())
        out["models"][name] = {
            "params": params,
            "suite_s": round(times[-1], 3),
            "kinds": {k: {"items": items[k], "s": round(s, 3), "share": round(s / total, 3),
                          "ms_per_item": round(1e3 * s / items[k], 2)} for k, s in per_kind.items()},
        }
        del model
    return out


def report_suite(fig: dict) -> str:
    lines = [f"{fig['suite']} ({fig['split']}, {fig['items']} items), batch {fig['batch_size']}, {fig['device']} "
             f"({fig['torch_threads']} threads): one candidate"]
    for name, m in fig["models"].items():
        kinds = "; ".join(f"{k} {v['s']:.2f}s ({v['share']:.0%}, {v['items']} items)" for k, v in m["kinds"].items())
        lines.append(f"  {name} ({m['params'] / 1e6:.1f}M params): {m['suite_s']:.2f}s; {kinds}")
    return "\n".join(lines)
