"""Eval suites as data: a `suite.yaml` listing tasks, or a single data file used as a suite.

    name: my-suite
    system: 你是一个乐于助人的助手。     # optional system prompt (chat template)
    tasks:
      - name: numerals
        kind: choice                 # choice | reference | generate | verifiable (inferred when left out)
        data: {dev: numerals.dev.jsonl, test: numerals.test.jsonl}
        weight: 1.0
      - name: accountant
        file: ceval/val/accountant_val.csv   # one file; `split: dev` ties it to one split,
                                             # without it the file serves every split
        style: letters               # choice prompts: cloze (answer text) | letters (A-D listed)
      - name: squad-zh
        file: my_dataset_folder      # a datasets.save_to_disk folder
        hf_split: validation
      - lmeval: ceval-valid_accountant       # an lm-eval task by name or YAML path (lmeval.py);
        split: dev                           # scored in these splits only (default: every split)

Paths are relative to the suite file. Task keys beyond these (system, chat, target_delimiter,
preamble, subject, max_new_tokens, stop, metric, num_fewshot) are described in evaluation/README.md.
`--suite` also takes one JSONL/CSV file or `datasets` folder (kind inferred from its columns), or
one lm-eval task YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evaluation.errors import EvalError
from evaluation.readers import KINDS, detect, is_dataset_dir, read_items

DATA_DIR = Path(__file__).resolve().parent / "data"
ANY_SPLIT = "*"  # a file that serves every split
METRICS = {
    # answer_logprob: log-probability of the gold option under a softmax over the item's options
    # (the negative option cross-entropy): smooth where acc is a step function of the weights
    "choice": ("acc", "acc_norm", "answer_logprob"),
    "reference": ("prob", "logprob"),  # prob = exp(mean token logprob) in (0, 1]; logprob unbounded
    # zh_fidelity: the share of answers written in simplified Chinese (verifiable.zh_fidelity)
    "generate": ("exact_match", "contains", "zh_fidelity"),
    # IFEval's names (verifiable.py); inst-level metrics pool the checks of all items
    "verifiable": ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                   "inst_level_loose_acc", "zh_fidelity"),
}
GENERATED_KINDS = ("generate", "verifiable")  # scored on greedy generations, not log-likelihoods
POOLED_METRICS = ("inst_level_strict_acc", "inst_level_loose_acc")  # task mean weighted by checks
# The metric of each kind that a search may optimise instead of the primary one (`smooth`): it
# moves with every small change of the weights, where acc and exact match stay on wide plateaus.
SMOOTH_METRIC = {"choice": "answer_logprob", "reference": "logprob"}
_TASK_KEYS = {
    "name", "kind", "data", "file", "split", "weight", "description", "style", "system", "chat",
    "target_delimiter", "preamble", "subject", "max_new_tokens", "stop", "metric", "hf_split",
    "lmeval", "num_fewshot",
}
_SUITE_KEYS = {"name", "description", "system", "chat", "tasks"}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # choice | reference | generate | verifiable | lmeval
    files: dict[str, Path] = field(default_factory=dict)  # split (or "*") -> data file/folder
    weight: float = 1.0
    description: str = ""
    layout: str = "native"  # "ceval": C-Eval columns, prompted as lm-eval's ceval-valid
    style: str | None = None  # choice prompts: "cloze" | "letters"; None: letters for C-Eval data
    system: str | None = None  # overrides the suite's system prompt
    chat: bool | None = None  # None: the suite's choice (C-Eval data: no chat template)
    target_delimiter: str | None = None  # between prompt and answer without a chat template
    preamble: str | None = None  # lm-eval's `description`: text before every prompt
    subject: str | None = None  # C-Eval subject for its description (default: from the file name)
    max_new_tokens: int = 32  # generate, verifiable
    stop: tuple[str, ...] = ()  # generate, verifiable: stop strings (EOS always stops)
    metric: str | None = None  # the metric entering the suite score (default: the kind's first)
    hf_split: str | None = None  # split of a DatasetDict folder
    lmeval: str | None = None  # lm-eval task name or YAML path
    num_fewshot: int | None = None  # lmeval
    lm_splits: tuple[str, ...] = ()  # lmeval: the splits it is scored in (`split:`); () every split

    def file(self, split: str) -> Path:
        if split in self.files:
            return self.files[split]
        if ANY_SPLIT in self.files:
            return self.files[ANY_SPLIT]
        raise EvalError(f"task {self.name!r} has no split {split!r}; it has {sorted(self.files)}")

    def items(self, split: str) -> list[dict]:
        """The validated items of one split; bad data raises EvalError naming file, line, field."""
        return read_items(self.file(split), self.kind, self.hf_split)

    @property
    def primary_metric(self) -> str:
        return self.metric or (METRICS[self.kind][0] if self.kind in METRICS else "acc")

    @property
    def smooth_metric(self) -> str:
        """The smooth metric of the kind (generate and lm-eval tasks have none: their primary)."""
        return SMOOTH_METRIC.get(self.kind, self.primary_metric)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    tasks: list[Task] = field(default_factory=list)
    system: str | None = None
    chat: bool | None = None

    def splits(self) -> set[str]:
        """Named splits every task has (tasks serving any split do not restrict)."""
        named = [set(t.files) for t in self.tasks if t.kind != "lmeval" and ANY_SPLIT not in t.files]
        return set.intersection(*named) if named else set()


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's tags (`!function utils.process_docs`) as plain values: a
    suite file needs none, and an lm-eval task YAML is only told apart here (lm-eval loads it)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")


def available_suites() -> list[str]:
    return sorted(p.parent.name for p in DATA_DIR.glob("*/suite.yaml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, a suite folder / suite.yaml, one data file, or an lm-eval YAML."""
    path = Path(name_or_path)
    if path.is_dir() and not is_dataset_dir(path):
        if not (path / "suite.yaml").is_file():
            raise EvalError(f"{path}: a folder with no suite.yaml (and not a datasets folder)")
        path = path / "suite.yaml"
    if not path.exists():
        builtin = DATA_DIR / str(name_or_path) / "suite.yaml"
        suffix = path.suffix.lower()
        if not builtin.is_file() and (suffix in (".jsonl", ".json", ".csv", ".yaml", ".yml") or len(path.parts) > 1):
            # a path, not a name: say which file is missing rather than list the built-in suites
            what = "suite file" if suffix in (".yaml", ".yml") else "data file" if suffix else "suite folder"
            raise EvalError(f"{name_or_path}: {what} not found")
        if not builtin.is_file():
            raise EvalError(
                f"Unknown suite {str(name_or_path)!r}: not a built-in suite, a suite file or a data file. "
                f"Available: {', '.join(available_suites()) or '(none)'}"
            )
        path = builtin
    if is_dataset_dir(path) or path.suffix.lower() in (".jsonl", ".csv", ".json"):
        task = _task({"name": path.stem, "file": path.name}, path.parent, f"{path}")
        return Suite(name=path.stem, path=path, tasks=[task])
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise EvalError(f"{path}{at}: not valid YAML: {what}") from None
    if isinstance(spec, dict) and "task" in spec and "tasks" not in spec:  # one lm-eval task YAML
        name = str(spec["task"])
        return Suite(name=name, path=path, tasks=[_task({"lmeval": str(path.resolve())}, path.parent, str(path))])
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise EvalError(f"{path}: tasks: expected a non-empty list of tasks")
    unknown = set(spec) - _SUITE_KEYS
    if unknown:
        raise EvalError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: {sorted(_SUITE_KEYS)}")
    system, chat = spec.get("system"), spec.get("chat")
    if system is not None and not isinstance(system, str):
        raise EvalError(f"{path}: system: must be a string but got {system!r}")
    if chat is not None and not isinstance(chat, bool):
        raise EvalError(f"{path}: chat: must be true or false but got {chat!r}")
    tasks = [_task(t, path.parent, f"{path}: tasks[{i}]") for i, t in enumerate(spec["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"{path}: tasks: task names must be unique but got {names}")
    if not any(t.weight > 0 for t in tasks):
        raise EvalError(f"{path}: tasks: every task has weight 0, so the suite has no score; give one a weight > 0")
    return Suite(name=str(spec.get("name", path.parent.name)), path=path, tasks=tasks, system=system, chat=chat)


def _task(t: object, base: Path, where: str) -> Task:
    if not isinstance(t, dict):
        raise EvalError(f"{where}: expected a mapping but got {t!r}")
    unknown = set(t) - _TASK_KEYS
    if unknown:
        raise EvalError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if "kind" in t and t["kind"] not in KINDS:
        raise EvalError(f"{where}.kind: must be one of {list(KINDS)} but got {t['kind']!r}")
    sources = [k for k in ("data", "file", "lmeval") if k in t]
    if len(sources) != 1:
        raise EvalError(f"{where}: give exactly one of 'data' (split -> file), 'file' or 'lmeval' but got {sources}")
    kw: dict = {}
    if "lmeval" in t:
        spec = t["lmeval"]
        if not isinstance(spec, str) or not spec:
            raise EvalError(f"{where}.lmeval: must be an lm-eval task name or YAML path but got {spec!r}")
        local = base / spec
        if spec.endswith((".yaml", ".yml")):
            if not local.is_file():
                raise EvalError(f"{where}.lmeval: file not found: {local}")
            spec = str(local.resolve())
        kw.update(kind="lmeval", lmeval=spec, files={}, lm_splits=tuple(_splits(t, where)) if "split" in t else ())
        default_name = Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec
    else:
        if "data" in t:
            data = t["data"]
            if not isinstance(data, dict) or not data:
                raise EvalError(f"{where}.data: expected a mapping split -> file but got {data!r}")
            files = {str(split): base / str(f) for split, f in data.items()}
        else:
            files = {s: base / str(t["file"]) for s in _splits(t, where)}
        for split, f in files.items():
            if not f.exists():
                raise EvalError(f"{where}.{'data.' + split if 'data' in t else 'file'}: file not found: {f}")
        first = next(iter(files.values()))
        kind, layout = detect(first, t.get("hf_split"))
        if "kind" in t:
            kind = t["kind"]
            layout = layout if kind == "choice" else "native"
        kw.update(kind=kind, layout=layout, files=files)
        default_name = first.stem.split(".")[0]
    name = t.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise EvalError(f"{where}.name: required, a non-empty string")
    weight = t.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0 or weight == float("inf"):
        raise EvalError(f"{where}.weight: must be a number >= 0 (0: reported, not in the suite score) but got {weight!r}")
    kw.update(name=name, weight=float(weight), description=str(t.get("description", "")))
    _options(t, kw, where)
    return Task(**kw)


def _splits(t: dict, where: str) -> list[str]:
    split = t.get("split", ANY_SPLIT)
    splits = split if isinstance(split, list) else [split]
    if not splits or not all(isinstance(s, str) and s for s in splits):
        raise EvalError(f"{where}.split: must be a split name or a list of them but got {split!r}")
    return splits


def _options(t: dict, kw: dict, where: str) -> None:
    """The optional prompt/decoding keys, each checked with its type."""
    types = {"system": str, "chat": bool, "target_delimiter": str, "preamble": str, "subject": str,
             "metric": str, "hf_split": str, "max_new_tokens": int, "num_fewshot": int, "style": str}
    for key, typ in types.items():
        if key in t:
            value = t[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise EvalError(f"{where}.{key}: must be {typ.__name__} but got {value!r}")
            kw[key] = value
    if "style" in kw and kw["style"] not in ("cloze", "letters"):
        raise EvalError(f"{where}.style: must be one of ['cloze', 'letters'] but got {kw['style']!r}")
    if kw.get("max_new_tokens", 1) < 1:
        raise EvalError(f"{where}.max_new_tokens: must be at least 1 but got {kw['max_new_tokens']}")
    if "stop" in t:
        stop = t["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise EvalError(f"{where}.stop: must be a string or a list of non-empty strings but got {t['stop']!r}")
        kw["stop"] = tuple(stop)
    kind = kw["kind"]
    if "metric" in kw and kind in METRICS and kw["metric"] not in METRICS[kind]:
        raise EvalError(f"{where}.metric: must be one of {list(METRICS[kind])} for a {kind} task but got {kw['metric']!r}")
