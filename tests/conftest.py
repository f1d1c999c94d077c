import sys
from pathlib import Path

import pytest

# tests/tiny.py builds the tiny models and tokenizers the tests share.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_family() -> dict[str, Path]:
    """The demo model family (base, inst-v1, inst-v2, inst-meta), built once into the cache.

    The cache is $MERGE_SEARCH_CACHE or ~/.cache/merge-search, as for users: a machine builds
    it once (a couple of minutes on 2 cores) and later runs find it.
    """
    from search.demo import ensure_demo_family

    return ensure_demo_family()


@pytest.fixture
def postgres():
    """Makes fresh, empty PostgreSQL databases on the server that $MERGE_SEARCH_TEST_POSTGRES
    names (a `postgresql+psycopg://` URL of a database whose user may create databases), and
    drops them after the test: `postgres()` -> the new database's URL. `.ci/run` starts a
    throwaway server and sets the variable; elsewhere the tests that need it skip, and under CI
    they fail instead."""
    import os
    import uuid

    server = os.environ.get("MERGE_SEARCH_TEST_POSTGRES")
    if not server:
        if os.environ.get("CI"):
            pytest.fail("CI needs a PostgreSQL server: .ci/run starts one and sets MERGE_SEARCH_TEST_POSTGRES")
        pytest.skip("no PostgreSQL server: set MERGE_SEARCH_TEST_POSTGRES (as .ci/run does)")
    psycopg = pytest.importorskip("psycopg")
    base = server.rpartition("/")[0]
    conninfo = server.replace("postgresql+psycopg://", "postgresql://", 1)
    made = []

    def make() -> str:
        name = f"ms_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    yield make
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as db:
        for name in made:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
