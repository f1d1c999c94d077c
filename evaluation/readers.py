"""Eval data from files: JSONL (or a JSON list), C-Eval-layout CSV, or a `datasets` folder.

Every reader yields (where, row) pairs, `where` naming the file and line (or row) for errors,
and every item is validated into one canonical form per kind:

    choice     {"id", "text", "choices": [str, ...], "answer": int}
    generate   {"id", "text", "answers": [answer, *aliases]}
    reference  {"id", "text", "reference"}
    verifiable {"id", "text", "checks": [{"type", ...args}, ...]}   (+ "witness" when given)

plus "passage" when the row has one. Accepted rows:

    choice     {"id", "question", "choices", "answer": index}   or C-Eval: id,question,A,B,C,D,answer
    generate   {"id", "question", "answer", "aliases": [...]}   (aliases optional)
    reference  {"id", "prompt", "reference"}
    verifiable {"id", "prompt", "checks": [...], "witness": "..."}  (checks: evaluation.verifiable)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from evaluation.ceval import LETTERS
from evaluation.errors import EvalError

KINDS = ("choice", "reference", "generate", "verifiable")
# C-Eval has lower-case `question`/`answer`, CMMLU capitalised ones; both are read.
_TEXT_FIELDS = ("question", "prompt")


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _text(path: Path) -> str:
    """A data file's text; not UTF-8 (a GBK export, say) is an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise EvalError(f"{path}:{line}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None


def iter_rows(path: Path, hf_split: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a JSONL or CSV file or a `datasets` folder."""
    path = Path(path)
    if is_dataset_dir(path):
        yield from _dataset_rows(path, hf_split)
        return
    text = _text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path}:{reader.line_num}", {k.strip(): v for k, v in row.items() if k}
    elif path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise EvalError(f"{path}[{i}]: expected a JSON object")
            yield f"{path}[{i}]", row
    else:
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{n}: expected a JSON object")
            yield f"{path}:{n}", row


def _dataset_rows(path: Path, hf_split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if hf_split is None and len(splits) == 1:
            hf_split = splits[0]
        if hf_split not in ds:
            raise EvalError(f"{path}: a dataset with splits {splits}: name one with `hf_split` (got {hf_split!r})")
        ds, where = ds[hf_split], f"{path}[{hf_split}]"
    else:
        where = str(path)
    for i, row in enumerate(ds):
        yield f"{where} row {i}", row


def _lower(row: dict) -> dict:
    return {str(k).lower(): v for k, v in row.items()}


def _letters(row: dict) -> list[str]:
    out = []
    for letter in LETTERS:
        if letter not in row:
            break
        out.append(letter)
    return out


def row_layout(row: dict) -> tuple[str, str] | None:
    """(kind, layout) from a row's columns; layout "ceval" (A, B, ... columns) or "native"."""
    if len(_letters(row)) >= 2:  # (a missing `answer` is then reported by name)
        return "choice", "ceval"
    if "choices" in row:
        return "choice", "native"
    if "checks" in row:
        return "verifiable", "native"
    if "reference" in row:
        return "reference", "native"
    if "answer" in row:
        return "generate", "native"
    return None


def detect(path: Path, hf_split: str | None = None) -> tuple[str, str]:
    """The kind and layout of a data file, from its first row."""
    for where, row in iter_rows(path, hf_split):
        found = row_layout(row)
        if found is None:
            raise EvalError(
                f"{where}: cannot tell the task kind from the columns {sorted(row)}: expected "
                "'choices' (choice), A/B/.../answer (C-Eval choice), 'reference' (reference), "
                "'checks' (verifiable) or 'answer' (generate)"
            )
        return found
    raise EvalError(f"{path}: no items")


def read_items(path: Path, kind: str, hf_split: str | None = None) -> list[dict]:
    """Read and validate every item of one file of `kind`; errors name the file, line and field."""
    if kind not in KINDS:
        raise EvalError(f"kind must be one of {list(KINDS)} but got {kind!r}")
    items, ids = [], set()
    for where, row in iter_rows(path, hf_split):
        item = _validate(row, kind, where, default_id=str(len(items) + 1))
        if item["id"] in ids:
            raise EvalError(f"{where}: field 'id' {item['id']!r} appears twice")
        ids.add(item["id"])
        items.append(item)
    if not items:
        raise EvalError(f"{path}: no items")
    return items


def _field(row: dict, names: tuple[str, ...], types: tuple[type, ...], where: str, label: str | None = None):
    low = _lower(row)
    for name in names:
        if name in row or name in low:
            value = row[name] if name in row else low[name]
            if not isinstance(value, types) or isinstance(value, bool):
                kinds = " or ".join(t.__name__ for t in types)
                raise EvalError(f"{where}: field {name!r} must be {kinds} but got {value!r}")
            return value
    raise EvalError(f"{where}: field {label or names[0]!r} is missing")


def _validate(row: dict, kind: str, where: str, default_id: str) -> dict:
    ceval = kind == "choice" and row_layout(row) == ("choice", "ceval")
    if ceval and "id" not in _lower(row):
        rid = default_id  # C-Eval's own files carry ids; others get their row number
    else:
        rid = str(_field(row, ("id",), (str, int), where))
    text = _field(row, _TEXT_FIELDS, (str,), where, "question" if kind not in ("reference", "verifiable") else "prompt")
    if not text.strip():
        raise EvalError(f"{where}: field 'question' is empty")
    item: dict = {"id": rid, "text": text}
    if "passage" in row:
        item["passage"] = _field(row, ("passage",), (str,), where)
    if kind == "choice" and ceval:
        letters = _letters(row)
        item["choices"] = [str(_field(row, (x,), (str, int, float), where)) for x in letters]
        for letter, choice in zip(letters, item["choices"]):
            if not choice.strip():
                raise EvalError(f"{where}: field {letter!r} is empty")
        answer = str(_field(row, ("answer",), (str,), where)).strip()
        if answer not in letters:
            raise EvalError(f"{where}: field 'answer' must be one of {letters} but got {answer!r}")
        item["answer"] = letters.index(answer)
    elif kind == "choice":
        choices = _field(row, ("choices",), (list,), where)
        answer = _field(row, ("answer",), (int,), where)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"{where}: field 'choices' must list at least 2 non-empty strings")
        if not 0 <= answer < len(choices):
            raise EvalError(f"{where}: field 'answer' must index 'choices' (0..{len(choices) - 1}) but got {answer}")
        item.update(choices=choices, answer=answer)
    elif kind == "generate":
        answer = _field(row, ("answer",), (str, int, float), where)
        aliases = row.get("aliases", []) or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise EvalError(f"{where}: field 'aliases' must be a list of strings but got {aliases!r}")
        if not str(answer).strip():
            raise EvalError(f"{where}: field 'answer' is empty")
        item["answers"] = [str(answer), *aliases]
    elif kind == "verifiable":
        from evaluation.verifiable import check_item, check_spec

        checks = _field(row, ("checks",), (list,), where)
        if not checks:
            raise EvalError(f"{where}: field 'checks' must list at least one check")
        for i, check in enumerate(checks):
            problem = check_spec(check)
            if problem:
                raise EvalError(f"{where}: field 'checks'[{i}]: {problem}")
        item["checks"] = checks
        if "witness" in row:
            witness = _field(row, ("witness",), (str,), where)
            failed = [c["type"] for c, ok in zip(checks, check_item(item, witness)) if not ok]
            if failed:
                raise EvalError(f"{where}: field 'witness' fails its own check(s) {', '.join(failed)}")
            item["witness"] = witness
    else:
        reference = _field(row, ("reference",), (str,), where)
        if not reference:
            raise EvalError(f"{where}: field 'reference' is empty")
        item["reference"] = reference
    return item
