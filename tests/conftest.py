import sys
from pathlib import Path

# tests/tiny.py builds the tiny models and tokenizers the tests share.
sys.path.insert(0, str(Path(__file__).parent))
