"""Merge benchmarks, side by side in one run: `merge-search bench merge [--params 150M] [--json]`.

Builds (once, cached) three bf16 Llama-shaped sources of the asked size plus a base, then times:
- our linear merge (`InMemoryMerger.apply`) against the streaming bound of this machine: the
  bytes the merge must move ((N reads + 1 write) x P x bytes) at the bandwidth of an fp32
  `torch.addcmul(out=)` over buffers of the same size (3 reads, 1 write), measured here;
- the same merge through mergekit's in-memory path (what mergekit-evolve's
  InMemoryMergeEvaluator does per trial: plan_in_memory + Executor.run, copied into a live model;
  it re-reads every source tensor from safetensors each time), and a whole `mergekit-yaml` run;
- TIES per trial, ours (magnitude ranks cached at load) against mergekit's in-memory path;
- peak resident memory of a search-like process (load N sources + one linear merge) against
  (N+1) x P x bytes (the rows and the live model),
  measured in a child process, with the interpreter's own baseline reported beside it;
- with `--methods all` (or a comma list), every registered method's in-memory merge in the same
  merger: the first merge (which computes what the method caches, e.g. TIES' ranks) and the
  median of the next ones, each at the middle of its search ranges (density 0.5, t 0.5, equal
  weights) over as many of the sources as it takes; `per_method` {method: {first_s, s, models}}.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from search.errors import MergeSearchError

log = logging.getLogger(__name__)

N_SOURCES = 3
VOCAB, HIDDEN, INTERMEDIATE = 32000, 1024, 2816


def parse_count(text: str) -> int:
    """'150M' -> 150_000_000; '2B', '500k', or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise MergeSearchError(f"--params must look like 150M, 1.5B or 20000000 but got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m[2].lower()]
    return int(float(m[1]) * scale)


def _llama_config(params: int):
    from transformers import LlamaConfig

    # Llama-like proportions; below 100M a narrower model so that small runs (tests) stay small.
    vocab, hidden, inter = (VOCAB, HIDDEN, INTERMEDIATE) if params >= 100_000_000 else (4096, 256, 704)
    embed = 2 * vocab * hidden  # untied embeddings and head
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - embed) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def build_sources(params: int, root: Path) -> tuple[list[Path], Path]:
    """A base and N fine-tune-like variants (base + small noise) in bf16, cached under `root`."""
    from safetensors.torch import save_file

    folder = root / f"bench-{params}"
    names = ["base"] + [f"src{i}" for i in range(N_SOURCES)]
    if not all((folder / n / "model.safetensors").is_file() for n in names):
        config = _llama_config(params)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".bench-"))
        g = torch.Generator().manual_seed(0)
        shapes = _shapes(config)
        base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        for i, name in enumerate(names):
            (tmp / name).mkdir()
            config.save_pretrained(tmp / name)
            state = base if i == 0 else {
                k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()}
            save_file(state, str(tmp / name / "model.safetensors"), metadata={"format": "pt"})
            del state
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    return [folder / n for n in names[1:]], folder / "base"


def _shapes(config) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _configs(sources: list[Path], base: Path) -> dict[str, dict]:
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(sources, (0.5, 0.3, 0.2))]
    ties_models = [{"model": str(p), "parameters": {"weight": w, "density": 0.5}}
                   for p, w in zip(sources, (0.5, 0.3, 0.2))]
    return {
        "linear": {"merge_method": "linear", "parameters": {"normalize": True}, "models": models, "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                 "models": ties_models, "dtype": "bfloat16"},
    }


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(ours, numel: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of `ours` and of the streaming-bound op, run alternately so both see the
    same machine state. The bound op is fp32 `torch.addcmul(out=)` over 4 buffers of `numel`
    (3 reads + 1 write); returns (ours_s, bandwidth in bytes/s)."""
    a, b, c, d = (torch.rand(numel, device=device) for _ in range(4))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.addcmul(a, b, c, out=d)
    mine, bound = [], []
    for _ in range(max(repeats, 5)):
        mine.append(_median(ours, 1))
        bound.append(_median(lambda: (torch.addcmul(a, b, c, out=d), sync()), 1))
    return statistics.median(mine), 4 * numel * 4 / statistics.median(bound)


def _mergekit_in_memory(config: dict, device: str) -> tuple[callable, str]:
    """A function that runs mergekit's in-memory path once, into a live bf16 model."""
    from typing import Any

    from accelerate import init_empty_weights
    from mergekit.architecture import arch_info_for_config
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import ReturnTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import AutoModelForCausalLM

    # mergekit 0.1.5 annotates ReturnTensor.tensor_task as the abstract Task[Tensor], which
    # current pydantic tries to instantiate (TypeError in plan_in_memory); relaxed here only.
    note = "ReturnTensor.tensor_task annotation relaxed to Any at run time (mergekit 0.1.5 vs current pydantic)"
    ReturnTensor.model_fields["tensor_task"].annotation = Any
    ReturnTensor.model_rebuild(force=True)
    cfg = MergeConfiguration.model_validate(config)
    arch = arch_info_for_config(cfg.referenced_models()[0].config())
    out_cfg = _model_out_config(cfg, arch)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(out_cfg, dtype=torch.bfloat16)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    options = MergeOptions(device=device)

    def run():
        tasks = MergePlanner(cfg, arch, options, out_cfg).plan_in_memory()
        for task, value in Executor(tasks, math_device=device, storage_device=device).run(quiet=True):
            name = task.weight_info.name
            if name in params:
                params[name].data.copy_(value)

    return run, note


def _peak_memory(sources: list[Path], base: Path, device: str) -> dict:
    """Peak RSS of a child that loads the sources into a merger and merges once."""
    code = f"""
import json, resource, sys, torch
from search.checkpoints import open_checkpoint
from search.merger import InMemoryMerger
import transformers, accelerate
def rss(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
srcs = [open_checkpoint(f"s{{i}}", p) for i, p in enumerate({[str(p) for p in sources]!r})]
InMemoryMerger._empty_model(srcs[0])  # code loaded, no tensor data: the interpreter's baseline
before = rss()
m = InMemoryMerger(srcs, device={device!r}, dtype=torch.bfloat16, compile=False)
m.apply({_configs(sources, base)['linear']!r})
print(json.dumps({{"baseline": before, "peak": rss(), "numel": m.numel}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    need = (N_SOURCES + 1) * fig["numel"] * 2  # N source rows + the live output
    return {"peak_rss_bytes": fig["peak"], "baseline_rss_bytes": fig["baseline"], "rows_bytes": need,
            "peak_memory_ratio": (fig["peak"] - fig["baseline"]) / need,
            "peak_memory_ratio_raw": fig["peak"] / need}


def method_config(method: str, sources: list[Path], base: Path, num_layers: int) -> dict | None:
    """A config of `method` over the sources (and base) at the middle of its search ranges; None
    for a method that cannot take two or more of them (passthrough)."""
    from search.methods import METHODS, parameter_free
    from search.space import MergeSpace

    spec = METHODS[method]
    n = len(sources) if spec.max_models is None else min(len(sources), spec.max_models - spec.base_row)
    if n < 2:
        return None
    models = {f"s{i}": str(p) for i, p in enumerate(sources[:n])}
    if parameter_free(spec):
        config = {"merge_method": method, "models": [{"model": p} for p in models.values()], "dtype": "bfloat16"}
        return config | ({"base_model": str(base)} if spec.needs_base else {})
    space = MergeSpace(method, models, base=str(base) if spec.base_row else None, num_layers=num_layers,
                       dtype="bfloat16")
    mid = {k: 0.5 if k in ("density", "t") else sum(space._range(k)) / 2
           for k in (*space.model_keys, *space.shared_keys) if k != "weight"}
    return space.to_config(space.uniform_values([1.0 / n] * n, **mid))


def per_method(merger, sources: list[Path], base: Path, methods: list[str], repeats: int, sync) -> dict:
    """{method: {"first_s", "s", "models"}} of in-memory merges in one merger (see the module doc)."""
    out = {}
    for method in methods:
        config = method_config(method, sources, base, merger.num_layers)
        if config is None:
            continue
        t0 = time.perf_counter()
        merger.apply(config)
        sync()
        first = time.perf_counter() - t0
        out[method] = {"first_s": first, "s": _median(lambda: (merger.apply(config), sync()), repeats),
                       "models": len(config["models"])}
        log.info("%s: %.1f ms/merge (first %.2fs)", method, out[method]["s"] * 1e3, first)
    return out


def bench_merge(*, params: str = "150M", device: str = "cpu", repeats: int = 3, cache: Path | None = None,
                mergekit: bool = True, methods: list[str] | None = None) -> dict:
    """All figures of `merge-search bench merge` as one dict (see the module docstring)."""
    from search.checkpoints import open_checkpoint
    from search.merger import InMemoryMerger

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    root = cache or Path(os.environ.get("MERGE_SEARCH_CACHE", Path.home() / ".cache" / "merge-search"))
    root.mkdir(parents=True, exist_ok=True)
    log.info("building or finding the %s-parameter sources in %s", params, root)
    sources, base = build_sources(parse_count(params), root)
    configs = _configs(sources, base)
    fig: dict = {"device": str(dev), "threads": torch.get_num_threads(), "sources": N_SOURCES, "dtype": "bfloat16"}

    t0 = time.perf_counter()
    merger = InMemoryMerger([open_checkpoint(f"s{i}", p) for i, p in enumerate(sources)],
                            base=open_checkpoint("base", base), device=dev, dtype=torch.bfloat16)
    fig["load_s"] = time.perf_counter() - t0
    fig["params"] = merger.numel
    t0 = time.perf_counter()
    merger.apply(configs["linear"])  # first call compiles the kernel (large models)
    sync()
    fig["linear_first_s"] = time.perf_counter() - t0
    fig["linear_s"], bandwidth = interleaved(lambda: (merger.apply(configs["linear"]), sync()), merger.numel,
                                             dev, repeats)
    moved = (N_SOURCES + 1) * merger.numel * 2
    fig["bandwidth_gbs"] = bandwidth / 1e9
    fig["bound_s"] = moved / bandwidth
    fig["bound_fraction"] = fig["bound_s"] / fig["linear_s"]
    t0 = time.perf_counter()
    merger.apply(configs["ties"])  # computes and caches the magnitude ranks
    sync()
    fig["ties_first_s"] = time.perf_counter() - t0
    fig["ties_s"] = _median(lambda: (merger.apply(configs["ties"]), sync()), repeats)
    if methods:
        fig["per_method"] = per_method(merger, sources, base, methods, repeats, sync)
    del merger

    log.info("ours done (linear %.1f ms, ties %.1f ms); now mergekit", fig["linear_s"] * 1e3, fig["ties_s"] * 1e3)
    if mergekit:
        run, note = _mergekit_in_memory(configs["linear"], device)
        run()  # warm the page cache as ours was
        fig["mergekit_linear_s"] = _median(run, repeats)
        fig["speedup_vs_mergekit"] = fig["mergekit_linear_s"] / fig["linear_s"]
        run_ties, _ = _mergekit_in_memory(configs["ties"], device)
        fig["mergekit_ties_s"] = _median(run_ties, 1)
        fig["ties_speedup_vs_mergekit"] = fig["mergekit_ties_s"] / fig["ties_s"]
        fig["mergekit_note"] = note
        fig["mergekit_yaml_s"] = _mergekit_yaml(configs["linear"], root, device)
        fig["speedup_vs_mergekit_yaml"] = fig["mergekit_yaml_s"] / fig["linear_s"]
    log.info("peak memory (child process)")
    fig.update(_peak_memory(sources, base, device))
    return fig


def _mergekit_yaml(config: dict, root: Path, device: str) -> float:
    """Seconds of a whole `mergekit-yaml` run (process start, merge, writing the model)."""
    import yaml

    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cfg = Path(tmp) / "linear.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = [exe, str(cfg), str(Path(tmp) / "out"), "--device", device, "--lazy-unpickle"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        took = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"mergekit-yaml failed: {out.stderr[-2000:]}")
    return took


def report(fig: dict) -> str:
    """Human-readable lines of `bench_merge`'s figures."""
    lines = [
        f"{fig['params'] / 1e6:.0f}M params x {fig['sources']} bf16 sources on {fig['device']} "
        f"({fig['threads']} threads); load {fig['load_s']:.1f}s",
        f"linear: {fig['linear_s'] * 1e3:.1f} ms/merge (first {fig['linear_first_s']:.1f}s); streaming bound "
        f"{fig['bound_s'] * 1e3:.1f} ms at {fig['bandwidth_gbs']:.1f} GB/s -> {fig['bound_fraction']:.0%} of bound",
        f"ties: {fig['ties_s'] * 1e3:.1f} ms/merge (first, ranks cached: {fig['ties_first_s']:.1f}s)",
    ]
    if "mergekit_linear_s" in fig:
        lines += [
            f"mergekit in-memory linear: {fig['mergekit_linear_s'] * 1e3:.0f} ms -> {fig['speedup_vs_mergekit']:.1f}x faster",
            f"mergekit-yaml linear (whole run): {fig['mergekit_yaml_s']:.1f}s -> {fig['speedup_vs_mergekit_yaml']:.0f}x",
            f"mergekit in-memory ties: {fig['mergekit_ties_s']:.1f}s -> {fig['ties_speedup_vs_mergekit']:.0f}x faster",
            f"note: {fig['mergekit_note']}",
        ]
    if fig.get("per_method"):
        lines.append("per method (in memory, first merge / median of the next):")
        lines += [f"  {m:<18} {v['s'] * 1e3:9.1f} ms   first {v['first_s']:7.2f} s   ({v['models']} sources)"
                  for m, v in fig["per_method"].items()]
    lines.append(
        f"peak RSS {fig['peak_rss_bytes'] / 2**30:.2f} GiB (interpreter baseline {fig['baseline_rss_bytes'] / 2**30:.2f} GiB) "
        f"vs (N+1)·P·2 = {fig['rows_bytes'] / 2**30:.2f} GiB -> {fig['peak_memory_ratio']:.2f}x "
        f"({fig['peak_memory_ratio_raw']:.2f}x with the baseline)")
    return "\n".join(lines)
