"""`merge-search bench learn`: learned weights against the black-box search, at equal wall time.

    merge-search bench learn --json      # 3 seeds, 3 spaces, about 15 minutes on 2 CPU cores
    merge-search bench learn --quick     # 1 seed, the global space, 3 steps (the test)

On the demo family, for each space (`global`: one weight set; `layer`: one per layer;
`layer_filter`: one per layer and per {self_attn, mlp, rest}) and seed:
- the learner (`study.learner` with the demo's settings or --steps/--lr/--early-stop) after the
  baselines (each source, uniform), as `merge-search learn` runs it; its wall time is the
  baselines' plus the learning's plus the learned trial's;
- the black-box search of the demo config (sampler `auto`, its pruner, the baselines first) for
  the same wall time (Optuna's timeout: it may finish one trial past it), and the candidate its
  `study.select` exports.
Both are then scored on the held-out test split. Figures (acc, the demo suite's primary score):
`learned`, `blackbox` {space: test median over seeds}; `learned_minus_blackbox` {space: [diff,
low, high]}: the mean over seeds of the paired difference on test with its paired-bootstrap 95%
interval (every seed's test examples pooled, stratified by task); `per_seed` the same per seed
with both candidates' dev scores, the black-box trial count and both wall times.

On the 150M bench checkpoints (`bench merge`'s bf16 sources, 3 of them, built once): one learner
step over the demo's dev split (random weights, the demo tokenizer's ids), in a child process
per setting: `step_s` and the peak resident memory during the step (the high-water mark reset
after loading) over (N+1)·P·bytes, the rows and the live model, for the eval batch (64 rows,
shared prefix) and for smaller batches with activation checkpointing. Each setting runs twice:
with glibc's allocator as it comes (`peak_memory_ratio`), which keeps freed blocks in the heap
once its dynamic mmap threshold has grown past a transient's size, so the peak counts freed
memory too (by how much varies from run to run); and with MALLOC_MMAP_THRESHOLD_=1 MiB
(`unmapped`), which maps every such block and unmaps it when freed, so that the resident memory
is the memory held: `step_peak_memory_ratio` is that one, `step_peak_memory_ratio_glibc` the
other. `goals`: the learned test median >= the black-box one's on the finest space, within 1
point on the others; the step's peak memory <= 1.3x (N+1)·P·bytes with `learner_memory_setting`.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time

import optuna

log = logging.getLogger(__name__)

SPACES = {"global": {}, "layer": {"merge.granularity": 1},
          "layer_filter": {"merge.granularity": 1, "merge.filters": ["self_attn", "mlp"]}}
STEP_SETTINGS = ((64, False), (16, True), (8, True))  # (rows per backward, activation checkpointing)
MEMORY_SETTING = "batch 8 + checkpoint"  # the setting the memory goal is read at
UNMAPPED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # glibc: blocks from 1 MiB on mapped, unmapped when freed


def _study(s, seed: int) -> optuna.Study:
    """An in-memory study as `run` makes one for the demo config (sampler, pruner), baselines enqueued."""
    from search.pruning import PairedWilcoxonPruner
    from search.samplers import make_sampler

    pruner = PairedWilcoxonPruner(s.cfg.study.prune_threshold) if s.pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=make_sampler(s.cfg.study.sampler, seed, n_params=s.space.n_params))
    s.enqueue_baselines(study)
    return study


def _test(s, trial) -> tuple[float, list[float]]:
    """Test acc of a trial's merge and its per-example values (in the test suite's order)."""
    s.merger.apply(trial.user_attrs["merge_config"])
    test = s.objectives[0].test
    r = test.score(s.merger.model)
    return r.score, [r.examples[k] for k in test.example_keys]


def _interval(s, a: list[float], b: list[float], keys: list[str]) -> list[float]:
    from search.uncertainty import paired_bootstrap

    tasks = list(dict.fromkeys(k.split("/", 1)[0] for k in keys))
    weights = {t.name: t.weight for t in s.objectives[0].test.suite.tasks}
    iv = paired_bootstrap(a, b, [tasks.index(k.split("/", 1)[0]) for k in keys], [weights[t] for t in tasks])
    return [iv.diff, iv.low, iv.high]


def _compare(s, seed: int) -> dict:
    """One seed on one space: the learner, then the black-box search for its wall time."""
    from search.selection import complete_trials, select
    from search.study import LEARNED

    s.cfg = s.cfg.model_copy(update={"study": s.cfg.study.model_copy(update={"seed": seed})})
    t0 = time.perf_counter()
    learned_study = _study(s, seed)
    learned_study.optimize(s.objective, n_trials=len(learned_study.get_trials()))  # the baselines
    s.learn_candidate(learned_study)
    learner_s = time.perf_counter() - t0
    learned = next(t for t in learned_study.trials if t.user_attrs.get("label") == LEARNED)

    t0 = time.perf_counter()
    box = _study(s, seed)
    box.optimize(s.objective, timeout=learner_s)
    blackbox_s = time.perf_counter() - t0
    chosen = select(complete_trials(box), s.cfg.study.select)

    (lt, le), (bt, be) = _test(s, learned), _test(s, chosen)
    keys = s.objectives[0].test.example_keys
    return {"seed": seed, "learned_test": lt, "blackbox_test": bt, "learned_dev": learned.user_attrs["dev_score"],
            "blackbox_dev": chosen.user_attrs["dev_score"], "blackbox_trials": len(box.trials),
            "learner_steps": learned.user_attrs["learner"]["steps_run"], "learner_s": round(learner_s, 1),
            "blackbox_s": round(blackbox_s, 1), "learned_minus_blackbox": _interval(s, le, be, keys),
            "_examples": (le, be)}


_STEP_CHILD = """
import json, sys, time, torch
from transformers import AutoTokenizer
from evaluation.suite import EvalSuite
from evaluation.tasks import load_suite
from search.checkpoints import open_checkpoint
from search.learn import WeightGradient
from search.merger import InMemoryMerger
from search.space import MergeSpace
def hwm(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
paths, tokenizer, suite_dir, batch, ckpt, device = json.loads(sys.argv[1])
srcs = [open_checkpoint(f"s{i}", p) for i, p in enumerate(paths)]
suite = EvalSuite(load_suite(suite_dir), AutoTokenizer.from_pretrained(tokenizer), "dev", batch_size=batch,
                  metric="smooth", share_prefix=not ckpt, device=device)
InMemoryMerger._empty_model(srcs[0])  # code loaded, no tensor data: the interpreter's baseline
before = hwm()
m = InMemoryMerger(srcs, device=device, dtype=torch.bfloat16, compile=False)
space = MergeSpace("linear", {f"s{i}": p for i, p in enumerate(paths)}, normalize=True, num_layers=m.num_layers)
learner = WeightGradient(m, space, checkpoint=ckpt)
theta = torch.zeros(learner.shape, dtype=torch.float64)
learner.apply(theta)
for s in srcs:
    s.close()  # the rows are loaded: the files' mapped pages are not the step's
open('/proc/self/clear_refs', 'w').write('5')  # the high-water mark from here on
resident = hwm()
t0 = time.perf_counter()
loss, grad = learner.backward(theta, lambda model: suite.loss_parts(model))
step = time.perf_counter() - t0
print(json.dumps({"baseline": before, "resident": resident, "peak": hwm(), "numel": m.numel, "s": step,
                  "batches": len(suite._loss_groups())}))
"""


def _step(paths, tokenizer: str, suite_dir: str, batch: int, checkpoint: bool, device: str) -> dict:
    """One step's figures with glibc as it comes, and under `unmapped` with UNMAPPED."""
    fig = _step_child(paths, tokenizer, suite_dir, batch, checkpoint, device, {})
    return fig | {"unmapped": _step_child(paths, tokenizer, suite_dir, batch, checkpoint, device, UNMAPPED)}


def _step_child(paths, tokenizer: str, suite_dir: str, batch: int, checkpoint: bool, device: str, env: dict) -> dict:
    import os

    args = json.dumps([[str(p) for p in paths], tokenizer, suite_dir, batch, checkpoint, device])
    out = subprocess.run([sys.executable, "-c", _STEP_CHILD, args], capture_output=True, text=True, check=False,
                         env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"learner step child failed: {out.stderr[-2000:]}")
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    need = (len(paths) + 1) * fig["numel"] * 2  # N bf16 rows + the live model
    return {"s": round(fig["s"], 2), "batches": fig["batches"],
            "peak_memory_ratio": round((fig["peak"] - fig["baseline"]) / need, 3),
            "resident_ratio": round((fig["resident"] - fig["baseline"]) / need, 3)}


def bench_learn(*, seeds: int = 3, device: str = "cpu", quick: bool = False, steps: int | None = None,
                lr: float | None = None, early_stop: float | None = None, params: str = "150M") -> dict:
    """Run the measurements of the module docstring; returns the figures."""
    from pathlib import Path

    from search.bench.merge import build_sources, parse_count
    from search.config import load_config
    from search.demo import cache_root, demo_family_dir, ensure_demo_family
    from search.errors import MergeSearchError
    from search.study import Searcher

    if seeds < 1:
        raise MergeSearchError(f"seeds must be at least 1 but got {seeds}")
    ensure_demo_family()
    learner = {k: v for k, v in {"steps": 3 if quick and steps is None else steps, "lr": lr,
                                 "early_stop": early_stop}.items() if v is not None}
    spaces = {"global": SPACES["global"]} if quick else SPACES
    fig: dict = {"seeds": seeds, "device": device, "spaces": list(spaces), "per_seed": {}, "learned": {},
                 "blackbox": {}, "learned_minus_blackbox": {}}
    t_all = time.perf_counter()
    for name, over in spaces.items():
        # past the demo's n_trials: the black-box studies run for a time, not a count
        cfg = load_config(None, **{"device": device, "study.n_trials": 10_000, "study.learner": learner, **over})
        s = Searcher.build(cfg)
        try:
            rows = [_compare(s, seed) for seed in range(seeds)]
        finally:
            s.close()
        la = [x for r in rows for x in r["_examples"][0]]
        bb = [x for r in rows for x in r["_examples"][1]]
        keys = s.objectives[0].test.example_keys * seeds
        for r in rows:
            del r["_examples"]
        fig["per_seed"][name] = rows
        fig["learned"][name] = statistics.median(r["learned_test"] for r in rows)
        fig["blackbox"][name] = statistics.median(r["blackbox_test"] for r in rows)
        fig["learned_minus_blackbox"][name] = _interval(s, la, bb, keys)
        fig["n_params"] = {**fig.get("n_params", {}), name: s.space.n_params}
        fig["learner"] = s.cfg.study.learner.model_dump()
        log.info("bench learn: %s: learned %.4f, black-box %.4f", name, fig["learned"][name], fig["blackbox"][name])
    fig["demo_seconds"] = round(time.perf_counter() - t_all, 1)

    sources, _ = build_sources(parse_count(params), cache_root())
    tokenizer = str(demo_family_dir() / "base")
    suite_dir = str(Path(__file__).resolve().parents[2] / "evaluation" / "data" / "demo")
    settings = STEP_SETTINGS[-1:] if quick else STEP_SETTINGS
    fig["step"] = {f"batch {b}" + (" + checkpoint" if c else ""): _step(sources, tokenizer, suite_dir, b, c, device)
                   for b, c in settings}
    fig["step_params"] = params
    first = next(iter(fig["step"].values()))
    fig["step_s"] = first["s"]
    fig["learner_memory_setting"] = MEMORY_SETTING
    fig["step_peak_memory_ratio"] = fig["step"][MEMORY_SETTING]["unmapped"]["peak_memory_ratio"]
    fig["step_peak_memory_ratio_glibc"] = fig["step"][MEMORY_SETTING]["peak_memory_ratio"]
    names = list(spaces)
    fig["goals"] = {
        "finest_space_not_below_blackbox": fig["learned"][names[-1]] >= fig["blackbox"][names[-1]],
        "coarser_within_1_point": all(fig["learned"][n] >= fig["blackbox"][n] - 0.01 for n in names[:-1]),
        "step_peak_memory_le_1.3": fig["step_peak_memory_ratio"] <= 1.3,
    }
    return fig


def report(fig: dict) -> str:
    """Human-readable lines of `bench_learn`'s figures."""
    lines = [f"demo family, {fig['seeds']} seeds, {fig['device']}; learner {fig['learner']}; "
             f"{fig['demo_seconds']:.0f}s"]
    for name in fig["spaces"]:
        d, lo, hi = fig["learned_minus_blackbox"][name]
        rows = fig["per_seed"][name]
        lines.append(
            f"  {name:<13} ({fig['n_params'][name]} parameters) test: learned {fig['learned'][name]:.4f}, black-box "
            f"{fig['blackbox'][name]:.4f}; learned - black-box {d:+.4f} [{lo:+.4f}, {hi:+.4f}]; wall "
            f"{statistics.median(r['learner_s'] for r in rows):.0f}s vs "
            f"{statistics.median(r['blackbox_s'] for r in rows):.0f}s "
            f"({statistics.median(r['blackbox_trials'] for r in rows):.0f} black-box trials)")
    lines.append(f"one learner step on the {fig['step_params']} bench checkpoints (bf16, 3 sources), peak memory "
                 "over (N+1)·P·bytes, glibc as it comes | freed blocks unmapped (MALLOC_MMAP_THRESHOLD_=1 MiB):")
    for k, v in fig["step"].items():
        u = v["unmapped"]
        lines.append(f"  {k:<22} {v['s']:.1f}s | {u['s']:.1f}s ({v['batches']} backward passes), peak "
                     f"{v['peak_memory_ratio']:.2f}x | {u['peak_memory_ratio']:.2f}x (rows and live model resident: "
                     f"{v['resident_ratio']:.2f}x | {u['resident_ratio']:.2f}x)")
    lines.append("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in fig["goals"].items()))
    return "\n".join(lines)
