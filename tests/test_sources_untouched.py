"""Sources are read-only: the sha256 of every file of every source (and of the base) is the same
after `run`, `merge` and `eval` as before, whatever those verbs wrote elsewhere."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tiny import make_family, save_tiny_model

ITEMS = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate([
    ("一是？", ["大", "小"], 0), ("二是？", ["小", "大"], 1), ("三是？", ["大大", "小"], 0)])]


def _digests(folders) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_run_merge_and_eval_leave_every_source_file_as_it_was(tmp_path):
    paths = make_family(tmp_path / "models", n=3)
    base = save_tiny_model(tmp_path / "models" / "base", seed=99)
    suite = tmp_path / "suite"
    suite.mkdir()
    for split in ("dev", "test"):
        (suite / f"c.{split}.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in ITEMS))
    (suite / "suite.yaml").write_text("name: s\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n")
    before = _digests([*paths, base])
    assert len(before) >= 4 * 3  # weights, config and tokenizer files of each
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ro", "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
        "merge": {"method": "task_arithmetic", "base_model": str(base)},
        "eval": {"suite": str(suite), "rescore_top": 2, "batch_size": 4},
        "study": {"n_trials": 6, "seed": 0, "sampler": "random"}, "device": "cpu", "out": str(tmp_path / "run")}))
    _cli("run", config, "-q")
    _cli("merge", tmp_path / "run" / "best.yaml", "-o", tmp_path / "merged")
    _cli("eval", paths[0], "--suite", suite, "--device", "cpu")
    _cli("eval", config, "--device", "cpu")
    assert _digests([*paths, base]) == before
