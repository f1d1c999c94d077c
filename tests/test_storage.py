"""Storage URLs: SQLite and journal files open, read-only verbs never create a file, and every
problem (unknown scheme, missing file, not a study store, missing driver, server down) is one
line naming the URL with its password masked, exit 2."""

import sys
import time

import optuna
import pytest
from click.testing import CliRunner

from search.cli import main
from search.errors import MergeSearchError
from search.storage import mask_url, open_storage, storage_kind


def test_mask_url_hides_the_password_only():
    assert mask_url("postgresql+psycopg://ann:s3cr3t@db.example:5432/ms") == "postgresql+psycopg://ann:***@db.example:5432/ms"
    assert mask_url("postgresql://ann@db/ms") == "postgresql://ann@db/ms"
    assert mask_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_sqlite_and_journal_files_hold_a_study(tmp_path):
    for url in (f"sqlite:///{tmp_path}/s.db", f"journal://{tmp_path}/s.log"):
        study = optuna.create_study(storage=open_storage(url, create=True), study_name="x", direction="maximize")
        study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=3)
        again = optuna.load_study(study_name="x", storage=open_storage(url, create=False))
        assert len(again.trials) == 3 and again.best_value == study.best_value
    assert storage_kind(f"journal://{tmp_path}/s.log") == "journal"


@pytest.mark.parametrize("url,message", [
    ("redis://localhost/0", r"not a storage URL; use sqlite:///PATH\.db, journal:///PATH\.log or postgresql"),
    ("study.db", r"'study\.db': not a storage URL"),
    ("sqlite:///", r"a sqlite URL needs a file path"),
    ("journal://", r"a journal URL needs a file path"),
])
def test_malformed_urls_are_one_line(url, message):
    with pytest.raises(MergeSearchError, match=message):
        open_storage(url, create=True)


def test_read_only_verbs_create_nothing_and_name_the_url(tmp_path):
    for verb in (["leaderboard"], ["report", "-o", str(tmp_path / "r.html")], ["export", "-o", str(tmp_path / "x.yaml")]):
        for url in (f"sqlite:///{tmp_path}/none.db", f"journal://{tmp_path}/none.log"):
            out = CliRunner().invoke(main, [*verb, "--storage", url])
            assert out.exit_code == 2, out.output
            assert f"storage '{url}': no such file" in out.output and "Traceback" not in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_study_store(tmp_path):
    (tmp_path / "notes.db").write_text("hello\n")
    (tmp_path / "notes.log").write_text("hello\n")
    with pytest.raises(MergeSearchError, match=r"notes\.db is not a SQLite study file"):
        open_storage(f"sqlite:///{tmp_path}/notes.db", create=False)
    with pytest.raises(MergeSearchError, match=r"notes\.log is not an Optuna journal file"):
        open_storage(f"journal://{tmp_path}/notes.log", create=False)
    assert (tmp_path / "notes.db").read_text() == "hello\n"  # never touched


def test_a_missing_postgres_driver_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(MergeSearchError, match=r"storage 'postgresql\+psycopg://u:\*\*\*@h/db': the PostgreSQL driver "
                                               r"'psycopg' is not installed: pip install 'merge-search\[postgres\]'"):
        open_storage("postgresql+psycopg://u:pw@h/db", create=True)


def test_an_unreachable_server_fails_in_seconds_with_the_password_masked():
    pytest.importorskip("psycopg")  # the postgres extra (in dev)
    t0 = time.perf_counter()
    out = CliRunner().invoke(main, ["leaderboard", "--storage", "postgresql+psycopg://ms:hunter2@127.0.0.1:1/ms"])
    assert time.perf_counter() - t0 < 15
    assert out.exit_code == 2 and "hunter2" not in out.output
    assert "storage 'postgresql+psycopg://ms:***@127.0.0.1:1/ms': cannot open it" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_workers_opening_a_new_postgresql_database_at_once_all_get_it(postgres):
    """Several processes that open one new database race to create Optuna's schema; the losers
    see "already exists" and retry (seen: 1 of 3 workers failing on `CREATE TYPE studydirection`)."""
    import subprocess
    import sys

    url = postgres()
    code = "from search.storage import open_storage; open_storage(%r, create=True); print('ok')" % url
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-500:] for _, e in outs]
    assert all(o.strip() == "ok" for o, _ in outs)
