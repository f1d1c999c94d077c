"""Several workers on one study, and workers that die: exactly the trials asked for, the
baselines once, a SIGKILLed worker's trial failed and retried, every finished trial kept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search.storage import open_storage
from tiny import make_family

TS = optuna.trial.TrialState
ITEMS = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate([
    ("一是？", ["大", "小"], 0), ("二是？", ["小", "大"], 1), ("三是？", ["大大", "小"], 0), ("四是？", ["一", "二", "三"], 2)])]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    paths = make_family(root / "models", n=3)
    suite = root / "suite"
    suite.mkdir()
    for split in ("dev", "test"):
        (suite / f"c.{split}.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in ITEMS))
    (suite / "suite.yaml").write_text("name: s\ntasks:\n  - {name: c, kind: choice, data: {dev: c.dev.jsonl, test: c.test.jsonl}}\n")
    return paths, suite


def _config(tmp_path, family, **study) -> Path:
    paths, suite = family
    cfg = {"name": "w", "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
           "eval": {"suite": str(suite), "rescore_top": 2, "batch_size": 4},
           "study": {"n_trials": 10, "seed": 0, "sampler": "random", **study}, "device": "cpu", "out": str(tmp_path / "run")}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="w", storage=open_storage(url, create=False))


def test_three_workers_on_a_journal_file_finish_exactly_the_trials_asked(tmp_path, family):
    url = f"journal://{tmp_path}/study.log"
    done = _cli("run", str(_config(tmp_path, family)), "--storage", url, "--workers", "3", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    study = _study(url)
    finished = [t for t in study.trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 10
    labels = [t.user_attrs.get("label") for t in finished if t.user_attrs.get("label")]
    assert sorted(labels) == ["karcher", "m0", "m1", "m2", "uniform"]  # the baselines once
    assert "3 workers on journal://" in "".join(done.stderr.split("\n"))  # (tiny trials: the first worker up may run most of them)
    others = [t for t in study.trials if t.state not in (TS.COMPLETE, TS.PRUNED)]
    assert all(t.state == TS.FAIL and t.user_attrs.get("surplus") for t in others)  # extra copies, never scored
    assert all(f"test/{t.number}" in study.user_attrs for t in finished if t.user_attrs.get("label"))
    assert (tmp_path / "run" / "best.yaml").is_file() and done.stdout.strip().splitlines()[-1].startswith("best: ")


def test_workers_refuse_a_sqlite_storage(tmp_path, family):
    out = _cli("run", str(_config(tmp_path, family)), "--workers", "2")
    assert out.returncode == 2 and "--workers 2 needs a storage several processes can share" in out.stderr
    assert not (tmp_path / "run").exists()


def _states(url: str) -> list[str]:
    """Trial states by number, read without opening an Optuna storage (which on a SQLite file a
    worker is still creating would race its schema set-up)."""
    if url.startswith("sqlite:///"):
        import sqlite3

        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return [s for _, s in db.execute("SELECT number, state FROM trials ORDER BY number")]
    return [t.state.name for t in _study(url).trials]


def _kill_mid_trial(config: Path, urls) -> tuple[str, set[int]]:
    """Start `run` on a fresh storage, SIGKILL it while a trial is running once 5 trials are
    finished; the storage and the numbers of the trials finished at that moment. A kill that
    lands between two trials is tried again on another storage."""
    for url in urls:
        proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", str(config), "--storage", url, "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.05)
                if proc.poll() is not None:  # finished (or failed) before the kill
                    assert proc.returncode == 0, proc.stderr.read()[-3000:]
                    break
                try:
                    states = _states(url)
                except Exception:  # the storage is not written yet
                    continue
                if states.count("COMPLETE") >= 5 and states[-1] == "RUNNING":
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    states = _states(url)
                    if states[-1] == "RUNNING":  # killed mid-trial
                        return url, {i for i, s in enumerate(states) if s == "COMPLETE"}
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pytest.fail("could not kill the worker while a trial was running")


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_sigkilled_worker_loses_only_its_trial_which_is_retried(tmp_path, family, kind):
    urls = (f"journal://{tmp_path}/study{i}.log" if kind == "journal" else f"sqlite:///{tmp_path}/study{i}.db"
            for i in range(10))
    config = _config(tmp_path, family, n_trials=12, heartbeat_interval=1, grace_period=2)
    url, kept = _kill_mid_trial(config, urls)
    killed = _study(url).trials[-1].number
    time.sleep(3)  # past the grace period (a trial killed before its objective started is dead after it)
    again = _cli("run", str(config), "--storage", url, "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(url)
    finished = [t for t in study.trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 12 and kept <= {t.number for t in finished}  # every trial finished before the kill
    assert study.trials[killed].state == TS.FAIL
    # its candidate, once (re-queued with the parameters it had drawn: it may die mid-suggest)
    dead = study.trials[killed].params
    retried = [t for t in finished if t.user_attrs.get("retried_from") == killed
               or t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and all(retried[0].params[k] == v for k, v in dead.items())
    assert (tmp_path / "run" / "leaderboard.md").is_file()


def test_three_workers_on_postgresql_finish_exactly_the_trials_asked(tmp_path, family, postgres):
    postgres_url = postgres()
    done = _cli("run", str(_config(tmp_path, family, heartbeat_interval=1, grace_period=5)),
                "--storage", postgres_url, "--workers", "3", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    study = _study(postgres_url)
    finished = [t for t in study.trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 10
    assert sorted(t.user_attrs["label"] for t in finished if t.user_attrs.get("label")) == [
        "karcher", "m0", "m1", "m2", "uniform"]
    assert len({(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in study.trials}) >= 1
    others = [t for t in study.trials if t.state not in (TS.COMPLETE, TS.PRUNED)]
    assert all(t.state == TS.FAIL and t.user_attrs.get("surplus") for t in others)
    assert all(f"test/{t.number}" in study.user_attrs for t in finished if t.user_attrs.get("label"))
    assert "postgresql+psycopg://ms@" in done.stderr and (tmp_path / "run" / "best.yaml").is_file()


def test_a_sigkilled_worker_on_postgresql_loses_only_its_trial(tmp_path, family, postgres):
    config = _config(tmp_path, family, n_trials=12, heartbeat_interval=1, grace_period=2)
    url, kept = _kill_mid_trial(config, (postgres() for _ in range(10)))
    killed = _study(url).trials[-1].number
    time.sleep(3)
    again = _cli("run", str(config), "--storage", url, "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(url)
    finished = [t for t in study.trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 12 and kept <= {t.number for t in finished}
    assert study.trials[killed].state == TS.FAIL
    retried = [t for t in finished if t.user_attrs.get("retried_from") == killed
               or t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1
