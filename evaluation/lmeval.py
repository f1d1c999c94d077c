"""Bridge to lm-evaluation-harness: any lm-eval task (registered name or local YAML) on a live model.

A suite entry `lmeval: ceval-valid_accountant` (or `lmeval: my_task.yaml`) is run by
`LMEvalRunner`: one `TaskManager` for the suite (with lm-eval's ~15 s scan of its built-in tasks
only when a registered name is used), tasks loaded once, an `HFLM` wrapped around the live model
once per model object, then `evaluator.evaluate` per call. Never `use_cache`: lm-eval's response
cache keys on the request text, not the weights, so it returns stale scores after a merge.

`native_task_yaml` writes a native choice task as the equivalent lm-eval task (local JSON/CSV
data, absolute `data_files`), which the parity tests and `merge-search bench eval` run.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
from pathlib import Path

from evaluation.ceval import LETTERS, description, subject_from_path
from evaluation.errors import EvalError
from evaluation.readers import is_dataset_dir, iter_rows, row_layout
from evaluation.tasks import Task

log = logging.getLogger(__name__)
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


@functools.lru_cache(maxsize=1)
def _registered_tasks():
    """lm-eval's TaskManager over its built-in tasks: a ~15 s scan, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_lmeval_tasks(specs: list[str]) -> list[dict]:
    """lm-eval task dicts ({"tasks", "groups", "group_map"}), one per spec (name or YAML path).

    YAML paths load through one TaskManager over their folders (no scan of lm-eval's built-in
    tasks); only registered names need that scan.
    """
    from lm_eval.tasks import TaskManager

    paths = sorted({str(Path(s).parent) for s in specs if _is_yaml(s)})
    local = TaskManager(include_path=paths, include_defaults=False) if paths else None
    out = []
    for spec in specs:
        manager = local if _is_yaml(spec) else _registered_tasks()
        if not _is_yaml(spec) and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            raise EvalError(f"Unknown lm-eval task {spec!r}." + (f" Did you mean: {', '.join(close)}?" if close else ""))
        try:
            out.append(manager.load(spec))
        except Exception as e:  # lm-eval raises many kinds; the user needs the task and the cause
            hint = (" (no network: point the task's dataset_path/data_files at a local copy, "
                    "see evaluation/README.md)") if isinstance(e, (ConnectionError, OSError)) else ""
            raise EvalError(f"lm-eval task {spec!r} could not be loaded: {type(e).__name__}: {e}{hint}") from None
    return out


def task_metrics(results: dict, spec_name: str, task_dict: dict) -> dict[str, float]:
    """metric -> value for one spec: the group's aggregate, the single task's, or the size-weighted mean."""
    res = results["results"]

    def numbers(entry: dict) -> dict[str, float]:
        return {k.split(",")[0]: float(v) for k, v in entry.items()
                if "," in k and "stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}

    if spec_name in res and numbers(res[spec_name]):
        return numbers(res[spec_name])
    leaves = list(task_dict["tasks"])
    if len(leaves) == 1:
        return numbers(res[leaves[0]])
    sizes = {t: results["n-samples"][t]["effective"] for t in leaves}
    total = sum(sizes.values())
    keys = set.intersection(*(set(numbers(res[t])) for t in leaves))
    return {k: sum(numbers(res[t])[k] * sizes[t] for t in leaves) / total for k in sorted(keys)}


class LMEvalRunner:
    """The `lmeval` entries of a suite, on any live model sharing the tokenizer."""

    def __init__(self, tasks: list[Task], tokenizer, *, batch_size: int, settings: dict[str, tuple[bool, str | None]],
                 max_length: int | None = None):
        self.tasks, self.tokenizer, self.batch_size, self.max_length = tasks, tokenizer, batch_size, max_length
        self.settings = settings  # task name -> (apply_chat_template, system_instruction)
        self.task_dicts = load_lmeval_tasks([t.lmeval for t in tasks])
        for task, loaded in zip(self.tasks, self.task_dicts):
            for obj in loaded["tasks"].values():
                # As simple_evaluate: the entry's num_fewshot unless the task pins 0, else 0 by default.
                if task.num_fewshot is not None and obj.get_config("num_fewshot") != 0:
                    obj.set_config(key="num_fewshot", value=task.num_fewshot)
                elif obj.get_config("num_fewshot") is None:
                    obj.set_config(key="num_fewshot", value=0)
                obj.set_fewshot_seed(seed=FEWSHOT_SEED)
        self._lm = self._model = None

    def lm(self, model):
        """The HFLM around `model`, built once per model object (the merger keeps one live model)."""
        if model is not self._model:
            from lm_eval.models.huggingface import HFLM

            log.info("wrapping the live model in lm-eval's HFLM (batch size %d)", self.batch_size)
            # A copy: HFLM may set a pad token on the tokenizer it is given.
            self._lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(self.tokenizer), batch_size=self.batch_size,
                            softmax_dtype="float32", max_length=self.max_length)
            self._model = model
        return self._lm

    def run(self, model) -> dict[str, dict[str, float]]:
        """task name -> metric -> value, one `evaluator.evaluate` per entry."""
        from lm_eval import evaluator

        lm, out = self.lm(model), {}
        for task, loaded in zip(self.tasks, self.task_dicts):
            chat, system = self.settings[task.name]
            results = evaluator.evaluate(lm, loaded, bootstrap_iters=0, log_samples=False,
                                         apply_chat_template=chat, system_instruction=system)
            spec_name = Path(task.lmeval).stem if _is_yaml(task.lmeval) else task.lmeval
            metrics = task_metrics(results, spec_name, loaded)
            if task.primary_metric not in metrics:
                raise EvalError(f"lm-eval task {task.lmeval!r} reports {sorted(metrics)}, not {task.primary_metric!r}: "
                                "set `metric:` on the suite entry")
            out[task.name] = metrics
        return out


# ------------------------------------------------------------- native task -> lm-eval YAML


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def native_task_yaml(task: Task, split: str, out_dir: Path, *, style: str | None = None,
                     delimiter: str = " ") -> Path:
    """Write `task` (choice kind, one split) as an lm-eval task YAML reading the same file.

    Same text, choices, description and target delimiter as the native prompt; run it with
    `apply_chat_template`/`system_instruction` as the native task uses them.
    """
    if task.kind != "choice":
        raise EvalError(f"task {task.name!r}: only choice tasks have an lm-eval twin, not {task.kind!r}")
    path = task.file(split).resolve()
    if is_dataset_dir(path):
        raise EvalError(f"task {task.name!r}: write the lm-eval twin from a JSONL or CSV file, not {path}")
    first = next(iter_rows(path))[1]
    ceval = row_layout(first) == ("choice", "ceval")
    style = style or task.style or ("letters" if ceval else "cloze")
    col = {k.lower(): k for k in first}
    question, passage = col.get("question", "prompt"), "{{passage}}\n\n" if "passage" in first else ""
    if ceval:
        letters = [x for x in LETTERS if x in first]
        target = "{{" + repr(letters) + ".index(" + col["answer"] + ".strip())}}"
        if style == "letters":
            text = "{{" + question + ".strip()}}" + "".join(f"\n{x}. {{{{{x}}}}}" for x in letters) + "\n答案："
            choices = json.dumps(letters)
        else:
            text, choices = "{{" + question + "}}", _q("{{[" + ", ".join(letters) + "]}}")
    else:
        target = "answer"
        if style == "letters":
            text = ("{{" + question + ".strip()}}{% for c in choices %}\n{{'" + LETTERS
                    + "'[loop.index0]}}. {{c}}{% endfor %}\n答案：")
            choices = _q("{{" + repr(list(LETTERS)) + "[:choices|length]}}")
        else:
            text, choices = "{{" + question + "}}", "choices"
    preamble = task.preamble
    if preamble is None and ceval and style == "letters":
        preamble = description(task.subject or subject_from_path(path))
    name = f"{task.name}_{split}_native".replace("-", "_")
    lines = [
        f"task: {name}",
        f"dataset_path: {'csv' if path.suffix.lower() == '.csv' else 'json'}",
        "dataset_kwargs:",
        f"  data_files: {{test: {_q(str(path))}}}",
        "test_split: test",
        "output_type: multiple_choice",
        *([f"description: {_q(preamble)}"] if preamble else []),
        f"doc_to_text: {_q(passage + text)}",
        f"doc_to_choice: {choices}",
        f"doc_to_target: {_q(target)}",
        f"target_delimiter: {_q(delimiter)}",
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}",
    ]
    out = Path(out_dir) / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
