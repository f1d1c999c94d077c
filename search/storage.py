"""Storage helpers the trial loop needs beyond Optuna's public API.

`report_many` writes a shard's per-example values (Optuna intermediate values, one integer step
per example) in one transaction on RDB storages. `Trial.report` commits each value on its own:
on SQLite that is about 1.8 ms a value, 0.2 s for a 120-example trial, more than the demo's
whole evaluation (measured; `merge-search bench search` reports `report_ms_per_trial`).
"""

from __future__ import annotations

from pathlib import Path

import optuna

from search.errors import MergeSearchError

try:  # private to Optuna: used when present, else one Trial.report per value
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # pragma: no cover - a future Optuna without them
    models = _create_scoped_session = None


def report_many(trial: optuna.Trial, values: dict[int, float]) -> None:
    """`trial.report(value, step)` for every (step, value), in one commit where the storage allows."""
    backend = getattr(trial.storage, "_backend", trial.storage)
    cached = getattr(trial, "_cached_frozen_trial", None)
    batch = (_create_scoped_session is not None and cached is not None
             and isinstance(backend, optuna.storages.RDBStorage)
             and hasattr(models, "TrialIntermediateValueModel"))
    if not batch:
        for step, value in values.items():
            trial.report(value, step)
        return
    new = {int(s): float(v) for s, v in values.items() if int(s) not in cached.intermediate_values}
    row = models.TrialIntermediateValueModel
    with _create_scoped_session(backend.scoped_session, True) as session:
        state = models.TrialModel.find_or_raise_by_id(trial._trial_id, session).state
        backend.check_trial_is_updatable(trial._trial_id, state)
        for step, value in new.items():  # steps not reported yet: inserts, no look-ups
            stored, kind = row.intermediate_value_to_stored_repr(value)
            session.add(row(trial_id=trial._trial_id, step=step, intermediate_value=stored,
                            intermediate_value_type=kind))
    cached.intermediate_values.update(new)


# ------------------------------------------------------------------ opening a storage URL

SCHEMES = ("sqlite", "journal", "postgresql", "mysql")
CONNECT_TIMEOUT_S = 5  # a server that does not answer is an error in seconds, never a hang


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _file_path(url: str, scheme: str) -> Path:
    """sqlite: as SQLAlchemy, the path after `sqlite:///` (four slashes: an absolute one);
    journal: the path after `journal://` (`journal:///tmp/x.log` is /tmp/x.log)."""
    rest = url.split(":///", 1)[1] if scheme == "sqlite" and ":///" in url else \
        url.split("://", 1)[1] if scheme == "journal" else ""
    if not rest.strip("/"):
        raise MergeSearchError(f"storage {mask_url(url)!r}: a {scheme} URL needs a file path, "
                               f"e.g. {scheme}:///runs/demo/study.{'db' if scheme == 'sqlite' else 'log'}")
    return Path(rest)


def storage_kind(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0] if ":" in url else ""
    if scheme not in SCHEMES or "://" not in url:
        raise MergeSearchError(f"storage {mask_url(url)!r}: not a storage URL; use sqlite:///PATH.db, "
                               f"journal:///PATH.log or postgresql+psycopg://USER@HOST/DB")
    return scheme


SCHEMA_RETRIES = 5  # opening a new RDB schema that other workers are creating at the same moment


def open_storage(url: str, *, create: bool, heartbeat: tuple[int, int] | None = None):
    """An Optuna storage for `url`, checked first so that every problem is one line naming the
    (masked) URL: an unknown scheme, a missing file (read-only verbs, `create=False`, never make
    one), a file that is not a study store, a missing database driver, a server that does not
    answer within CONNECT_TIMEOUT_S.

    heartbeat: (interval, grace period) in seconds for RDB storages: a worker that dies leaves its
    trial RUNNING; the next worker marks it failed after the grace period and re-queues its
    parameters once. Journal files have no heartbeat: a dead process's trial stays RUNNING."""
    import warnings

    kind = storage_kind(url)
    shown = mask_url(url)
    if kind in ("sqlite", "journal"):
        path = _file_path(url, kind)
        if not create and not path.is_file():
            raise MergeSearchError(f"storage {shown!r}: no such file (a run writes it; check the path)")
        if create and not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        if path.is_file() and path.stat().st_size and not _looks_like_journal(path):
            raise MergeSearchError(f"storage {shown!r}: {path} is not an Optuna journal file")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if kind == "sqlite" and path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise MergeSearchError(f"storage {shown!r}: {path} is not a SQLite study file")
    engine: dict = {}
    if kind == "postgresql":
        driver = url.split(":", 1)[0].partition("+")[2] or "psycopg2"
        module = {"psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver, driver)
        try:
            __import__(module)
        except ImportError:
            raise MergeSearchError(f"storage {shown!r}: the PostgreSQL driver {module!r} is not installed: "
                                   "pip install 'merge-search[postgres]' and use postgresql+psycopg://...") from None
        engine = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    retry = {}
    if heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        retry.update(heartbeat_interval=heartbeat[0], grace_period=heartbeat[1])
    import time

    for attempt in range(SCHEMA_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine or None, **retry)
        except Exception as e:  # sqlalchemy's errors: a server down, a bad database, a damaged file
            # Workers that open a new database at once race to create its schema; the losers see
            # the winner's tables or types ("already exists") and succeed on a second try.
            if attempt < SCHEMA_RETRIES and "already exists" in str(getattr(e, "orig", None) or e):
                time.sleep(0.2 * (attempt + 1))
                continue
            what = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
            raise MergeSearchError(f"storage {shown!r}: cannot open it ({type(e).__name__}: {what})") from None


def _looks_like_journal(path: Path) -> bool:
    import json

    with open(path, "rb") as f:
        first = f.readline()
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """A study that must exist (read-only verbs: nothing is created when it does not)."""
    opened = open_storage(storage, create=False)
    try:
        return optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise MergeSearchError(
            f"no study {study_name!r} in {mask_url(storage)}; studies there: {', '.join(names) or '(none)'}"
        ) from None
