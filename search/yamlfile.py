"""Strict YAML reading for config files: a duplicate key is an error, and every error is one line.

    data = read_yaml(path, ConfigError)   # ConfigError("run.yaml: line 4 not valid YAML: duplicate key 'name' ...")

PyYAML keeps the last of two equal keys without a word, so a config edited by appending a
section can silently lose the first; here that is refused with both line numbers.
"""

from __future__ import annotations

from pathlib import Path

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (`<<` merges may still override)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> its line
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue  # complex keys: the base class reports what is wrong with them
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, error: type[Exception]) -> object:
    """The parsed YAML document of `path` (None when empty); `error("<path>: ...")` when the file
    cannot be read or parsed: the line (1-based) and the problem, on one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(e, yaml.reader.ReaderError):
            line = text[: e.position].count("\n") + 1
        else:
            line = None
        if isinstance(e, yaml.reader.ReaderError):
            problem = f"unacceptable character #x{e.character:04x}: {e.reason}" if isinstance(e.character, int) else e.reason
        else:
            problem = getattr(e, "problem", None) or str(e)
            context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
            if context and start is not None and start.line + 1 != line:  # where the open construct began
                problem = f"{problem} ({context}, line {start.line + 1})"
        where = f" line {line}" if line else ""
        raise error(f"{path}:{where} not valid YAML: {' '.join(str(problem).split())}") from None
    except ValueError as e:  # a scalar YAML resolves but Python refuses, e.g. the date 2024-13-01
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
