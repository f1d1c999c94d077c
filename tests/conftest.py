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
