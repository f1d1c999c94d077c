"""Eval suites and tasks as data: a `suite.yaml` listing tasks, each a JSONL file per split.

A suite folder holds `suite.yaml`:

    name: demo
    tasks:
      - name: numerals
        kind: choice             # choice | reference
        data: {dev: numerals.dev.jsonl, test: numerals.test.jsonl}
        weight: 1.0

`choice` lines: {"id", "question", "choices": [...], "answer": <index>}
`reference` lines: {"id", "prompt", "reference"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evaluation.errors import EvalError

DATA_DIR = Path(__file__).resolve().parent / "data"
KINDS = ("choice", "reference")
# Fields each kind's JSONL lines must carry, with their types.
_REQUIRED = {
    "choice": {"id": str, "question": str, "choices": list, "answer": int},
    "reference": {"id": str, "prompt": str, "reference": str},
}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    files: dict[str, Path]  # split -> JSONL file
    weight: float = 1.0
    description: str = ""

    def items(self, split: str) -> list[dict]:
        """The validated items of one split; bad data raises EvalError naming file, line, field."""
        if split not in self.files:
            raise EvalError(f"task {self.name!r} has no split {split!r}; it has {sorted(self.files)}")
        return read_items(self.files[split], self.kind)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    tasks: list[Task] = field(default_factory=list)

    def splits(self) -> set[str]:
        return set.intersection(*(set(t.files) for t in self.tasks)) if self.tasks else set()


def available_suites() -> list[str]:
    return sorted(p.parent.name for p in DATA_DIR.glob("*/suite.yaml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, or a suite folder / suite.yaml path."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "suite.yaml"
    if not path.is_file():
        builtin = DATA_DIR / str(name_or_path) / "suite.yaml"
        if not builtin.is_file():
            raise EvalError(
                f"Unknown suite {str(name_or_path)!r}: not a built-in suite or a suite file. "
                f"Available: {', '.join(available_suites()) or '(none)'}"
            )
        path = builtin
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvalError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise EvalError(f"{path}: tasks: expected a non-empty list of tasks")
    tasks = [_parse_task(t, path, i) for i, t in enumerate(spec["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"{path}: tasks: task names must be unique but got {names}")
    return Suite(name=str(spec.get("name", path.parent.name)), path=path, tasks=tasks)


def _parse_task(t: object, path: Path, i: int) -> Task:
    where = f"{path}: tasks[{i}]"
    if not isinstance(t, dict):
        raise EvalError(f"{where}: expected a mapping but got {t!r}")
    unknown = set(t) - {"name", "kind", "data", "weight", "description"}
    if unknown:
        raise EvalError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if not isinstance(t.get("name"), str) or not t["name"]:
        raise EvalError(f"{where}.name: required, a non-empty string")
    if t.get("kind") not in KINDS:
        raise EvalError(f"{where}.kind: must be one of {list(KINDS)} but got {t.get('kind')!r}")
    data = t.get("data")
    if not isinstance(data, dict) or not data:
        raise EvalError(f"{where}.data: expected a mapping split -> file but got {data!r}")
    files = {str(split): (path.parent / f) for split, f in data.items()}
    for split, f in files.items():
        if not f.is_file():
            raise EvalError(f"{where}.data.{split}: file not found: {f}")
    weight = t.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise EvalError(f"{where}.weight: must be a positive number but got {weight!r}")
    return Task(t["name"], t["kind"], files, float(weight), str(t.get("description", "")))


def read_items(path: Path, kind: str) -> list[dict]:
    """Read and validate one JSONL file of `kind` items."""
    items, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not valid JSON: {e.msg}") from None
            if not isinstance(item, dict):
                raise EvalError(f"{where}: expected a JSON object")
            for key, typ in _REQUIRED[kind].items():
                if key not in item:
                    raise EvalError(f"{where}: field {key!r} is missing")
                if not isinstance(item[key], typ) or isinstance(item[key], bool):
                    raise EvalError(f"{where}: field {key!r} must be {typ.__name__} but got {item[key]!r}")
            if item["id"] in ids:
                raise EvalError(f"{where}: field 'id' {item['id']!r} appears twice")
            ids.add(item["id"])
            if kind == "choice":
                choices = item["choices"]
                if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                    raise EvalError(f"{where}: field 'choices' must list at least 2 non-empty strings")
                if not 0 <= item["answer"] < len(choices):
                    raise EvalError(
                        f"{where}: field 'answer' must index 'choices' (0..{len(choices) - 1}) "
                        f"but got {item['answer']}"
                    )
            items.append(item)
    if not items:
        raise EvalError(f"{path}: no items")
    return items
