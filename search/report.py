"""Leaderboards and run outputs, read back from the Optuna study alone.

Columns: rank, trial, label, dev_score, test_score, then one weight column per model, then, per
task, the metric that enters the score on the search split (`dev:<task>:<metric>`). `label` is a
source's name for single-source baselines, `uniform` for the uniform average, else `trial N`.
The markdown leaderboard ends with a note saying what the score is a mean of, and what each
metric means (`prob` for reference tasks: exp of the mean per-token log-probability).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import optuna

from search.export import to_yaml
from search.study import EVAL_ATTR, TEST_ATTR

FORMATS = ("md", "csv", "json")


def leaderboard_rows(study: optuna.Study) -> list[dict]:
    """Every completed trial, best search score first (ties: earlier trial first)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = sorted(done, key=lambda t: (-t.value, t.number))
    tests = study.user_attrs
    terms = study.user_attrs.get(EVAL_ATTR, {}).get("terms", {})
    rows = []
    for rank, t in enumerate(done, start=1):
        test = tests.get(f"{TEST_ATTR}{t.number}")
        row = {
            "rank": rank,
            "trial": t.number,
            "label": t.user_attrs.get("label") or f"trial {t.number}",
            "dev_score": t.value,
            "test_score": test["score"] if test else None,
        }
        row.update({f"w:{k}": v for k, v in t.user_attrs.get("weights", {}).items()})
        for task, metrics in t.user_attrs.get("scores", {}).items():
            key = terms[task]["metric"] if task in terms else "acc" if "acc" in metrics else next(iter(metrics))
            row[f"dev:{task}:{key}"] = metrics[key]
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# What each metric that can enter a score means, for the leaderboard's note.
METRIC_MEANING = {
    "acc": "the share of items whose answer option has the highest log-likelihood (lm-eval's acc)",
    "acc_norm": "as acc, each option's log-likelihood divided by its length in characters (lm-eval's acc_norm)",
    "prob": "exp of the mean per-token log-probability of the reference answer, in (0, 1] (the bounded "
            "form of `logprob`)",
    "logprob": "the mean per-token log-probability of the reference answer (unbounded, <= 0)",
    "exact_match": "greedy answer equal to a reference after normalisation",
    "contains": "greedy answer containing a reference after normalisation",
}


def score_note(study: optuna.Study) -> str:
    """One paragraph: the score is the weighted mean of which metric of which task, on which split."""
    scoring = study.user_attrs.get(EVAL_ATTR)
    if not scoring:
        return ""
    terms = scoring["terms"]
    parts = [f"{task} `{t['metric']}` (×{t['weight']:g})" for task, t in terms.items()]
    used = dict.fromkeys(t["metric"] for t in terms.values())
    lines = [f"dev_score: the weighted mean, on split `{scoring['split']}` of suite `{scoring['suite']}`, "
             f"of {', '.join(parts)}. test_score: the same on the held-out split."]
    lines += [f"- `{m}`: {METRIC_MEANING[m]}" for m in used if m in METRIC_MEANING]
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict], note: str = "") -> str:
    if not rows:
        return "(no completed trials)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n" + (f"\n{note}" if note else "")


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def render(rows: list[dict], fmt: str, note: str = "") -> str:
    if fmt == "md":
        return to_markdown(rows, note)
    if fmt == "csv":
        return to_csv(rows)
    return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return leaderboard_trial(study, "best")


def leaderboard_trial(study: optuna.Study, which: str | int) -> optuna.trial.FrozenTrial:
    """`best` or a trial number, among completed trials."""
    from search.errors import MergeSearchError

    done = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    if not done:
        raise MergeSearchError(f"study {study.study_name!r} has no completed trials")
    if which == "best":
        return min(done.values(), key=lambda t: (-t.value, t.number))
    if int(which) not in done:
        raise MergeSearchError(f"trial {which} is not a completed trial of study {study.study_name!r}")
    return done[int(which)]


def trial_config(trial: optuna.trial.FrozenTrial) -> dict:
    """The mergekit config of `trial`'s candidate: exactly what was merged and scored."""
    return trial.user_attrs["merge_config"]


def _write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so no reader sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(study: optuna.Study, out_dir: Path) -> dict:
    """best.yaml, best.json, leaderboard.md, leaderboard.csv in `out_dir`; returns best.json's content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(study)
    best = best_trial(study)
    test = study.user_attrs.get(f"{TEST_ATTR}{best.number}")
    summary = {
        "study": study.study_name,
        "trial": best.number,
        "label": best.user_attrs.get("label") or f"trial {best.number}",
        "weights": best.user_attrs["weights"],
        "dev_score": best.value,
        "test_score": test["score"] if test else None,
        "dev_tasks": best.user_attrs.get("scores"),
        "test_tasks": test["tasks"] if test else None,
        "score_terms": study.user_attrs.get(EVAL_ATTR, {}).get("terms"),  # the metric of each task in the score
    }
    _write(out_dir / "best.yaml", to_yaml(trial_config(best)))
    _write(out_dir / "best.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    _write(out_dir / "leaderboard.md", to_markdown(rows, score_note(study)))
    _write(out_dir / "leaderboard.csv", to_csv(rows))
    return summary
