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

from search.attrs import BASELINE_METHOD, BOOTSTRAP_ATTR, EVAL_ATTR, EXAMPLES_ATTR, MERGE_ATTR, SCORE, SELECT_ATTR, TEST_ATTR
from search.errors import MergeSearchError
from search.export import to_yaml
from search.selection import complete_trials, is_pruned, pareto_front, select, selection_radius
from search.uncertainty import paired_bootstrap

FORMATS = ("md", "csv", "json")


def _terms_of(scoring: dict) -> dict[str, dict]:
    """objective -> its score terms (task -> kind, metric, weight)."""
    return {name: o["terms"] for name, o in scoring.get("objectives", {}).items()} or {SCORE: scoring.get("terms", {})}


def _interval_layout(study: optuna.Study, split: str) -> tuple[list[int], list[float]] | None:
    """Stratum (objective, task) of every example of `split`, concatenated over the objectives,
    and each stratum's weight in the headline score (task weight within its objective / K)."""
    keys = study.user_attrs.get(EXAMPLES_ATTR, {}).get(split)
    scoring = study.user_attrs.get(EVAL_ATTR, {})
    if not keys:
        return None
    terms_of = _terms_of(scoring)
    strata, weights = [], []
    for name, names in keys.items():
        tasks = list(dict.fromkeys(k.split("/", 1)[0] for k in names))
        total = sum(terms_of.get(name, {}).get(t, {}).get("weight", 1.0) for t in tasks)
        first = len(weights)
        weights += [terms_of.get(name, {}).get(t, {}).get("weight", 1.0) / total / len(keys) for t in tasks]
        strata += [first + tasks.index(k.split("/", 1)[0]) for k in names]
    return strata, weights


def _examples(study: optuna.Study, trial: optuna.trial.FrozenTrial, split: str) -> list[float] | None:
    if split == "search":
        per = trial.user_attrs.get("examples")
    else:
        test = study.user_attrs.get(f"{TEST_ATTR}{trial.number}")
        per = {n: o["examples"] for n, o in test["objectives"].items()} if test and "objectives" in test else None
    keys = study.user_attrs.get(EXAMPLES_ATTR, {}).get(split, {})
    if not per or any(n not in per for n in keys):
        return None
    return [x for n in keys for x in per[n]]


def comparisons(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> dict[int, dict]:
    """Per trial: paired-bootstrap intervals vs `uniform` and vs the best single source (the
    source with the best dev score), on the search split and on test where re-scored."""
    labelled = {t.user_attrs["label"]: t for t in trials if t.user_attrs.get("label")}
    models = study.user_attrs.get(MERGE_ATTR, {}).get("models")  # a method's own baselines (t=0...) are not sources
    sources = [t for label, t in labelled.items() if label != "uniform" and not t.user_attrs.get(BASELINE_METHOD)
               and (models is None or label in models)]
    best_source = max(sources, key=lambda t: (t.user_attrs.get("dev_score", 0.0), -t.number), default=None)
    refs = {"uniform": labelled.get("uniform"), "best_source": best_source}
    n = study.user_attrs.get(BOOTSTRAP_ATTR, 1000)
    out: dict[int, dict] = {t.number: {} for t in trials}
    for split in ("search", "test"):
        layout = _interval_layout(study, split)
        if layout is None:
            continue
        for ref_name, ref in refs.items():
            b = _examples(study, ref, split) if ref else None
            if b is None:
                continue
            for t in trials:
                a = _examples(study, t, split)
                if a is not None:
                    iv = paired_bootstrap(a, b, *layout, n=n, seed=0)
                    out[t.number][f"{'dev' if split == 'search' else 'test'}_vs_{ref_name}"] = iv
    if best_source is not None:
        for v in out.values():
            v["best_source"] = best_source.user_attrs["label"]
    return out


def leaderboard_rows(study: optuna.Study, cmp: dict[int, dict] | None = None) -> list[dict]:
    """Every finished trial: fully scored ones by dev score (then search objective, then trial),
    then pruned ones, with intervals vs uniform, the objectives, weights and per-task metrics.
    cmp: `comparisons` of the complete trials, when the caller has them already."""
    done = complete_trials(study)
    done = sorted(done, key=lambda t: (-t.user_attrs.get("dev_score", t.values[0]), -sum(t.values), t.number))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    pruned = [t for t in study.get_trials(deepcopy=False, states=states) if is_pruned(t)]
    pruned = sorted(pruned, key=lambda t: (-t.user_attrs.get("dev_score", 0.0), t.number))
    scoring = study.user_attrs.get(EVAL_ATTR, {})
    objectives = list(scoring.get("objectives", {}))
    terms_of = _terms_of(scoring)
    chosen = selected_trial(study).number if done else None
    front = {t.number for t in pareto_front(done)} if objectives and done else set()
    cmp = comparisons(study, done) if cmp is None else cmp
    rows = []
    for rank, t in enumerate(done + pruned, start=1):
        test = study.user_attrs.get(f"{TEST_ATTR}{t.number}")
        complete = not is_pruned(t)
        row = {
            "rank": rank, "trial": t.number, "label": t.user_attrs.get("label") or f"trial {t.number}",
            "state": "complete" if complete else f"pruned ({100 * t.user_attrs.get('seen', 0):.0f}% seen)",
            "selected": t.number == chosen,
            "dev_score": t.user_attrs.get("dev_score"),
        }
        for split in ("dev", "test"):
            iv = cmp.get(t.number, {}).get(f"{split}_vs_uniform")
            if split == "test":
                row["test_score"] = test["score"] if test else None
            row[f"{split}_vs_uniform"] = iv.diff if iv else None
            row[f"{split}_vs_uniform_low"] = iv.low if iv else None
            row[f"{split}_vs_uniform_high"] = iv.high if iv else None
        if scoring.get("metric") == "smooth":
            row["dev_objective"] = t.values[0] if complete and not objectives else None
        dev = t.user_attrs.get("dev", {})
        for i, name in enumerate(objectives):
            row[f"dev:{name}"] = dev.get(name, {}).get("score")
            row[f"test:{name}"] = test["objectives"][name]["score"] if test and name in test.get("objectives", {}) else None
            if scoring.get("metric") == "smooth":
                row[f"objective:{name}"] = t.values[i] if complete else None
        if objectives:
            row["pareto"] = t.number in front
        row.update({f"w:{k}": v for k, v in t.user_attrs.get("weights", {}).items()})
        for name, d in dev.items():
            prefix = f"{name}/" if objectives else ""
            for task, metrics in d.get("tasks", {}).items():
                terms = terms_of.get(name, {})
                key = terms[task]["metric"] if task in terms else "acc" if "acc" in metrics else next(iter(metrics))
                row[f"dev:{prefix}{task}:{key}"] = metrics[key]
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
    "answer_logprob": "the log-probability of the answer under a softmax over the item's options (the "
                      "negative option cross-entropy, <= 0; smooth in the weights)",
    "exact_match": "greedy answer equal to a reference after normalisation",
    "contains": "greedy answer containing a reference after normalisation",
    "prompt_level_strict_acc": "the share of requests whose greedy answer passes every one of its checks (IFEval)",
    "inst_level_strict_acc": "the share of all checks that pass, pooled over the requests (IFEval)",
    "prompt_level_loose_acc": "as prompt_level_strict_acc, a check passing on any of IFEval's loose variants of the answer",
    "inst_level_loose_acc": "as inst_level_strict_acc, on IFEval's loose variants of the answer",
    "zh_fidelity": "the share of generated answers written in simplified Chinese",
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
    for name, o in scoring.get("objectives", {}).items():
        parts = [f"{task} `{t['metric']}` (×{t['weight']:g})" for task, t in o["terms"].items()]
        lines.append(f"dev:{name} / test:{name}: objective `{name}`, the weighted mean on split `{o['split']}` of "
                     f"suite `{o['suite']}` of {', '.join(parts)}; dev_score is the mean of the objectives; "
                     f"pareto: not dominated on every objective.")
    if scoring.get("metric") == "smooth":
        used["answer_logprob"] = None
        lines.append("The study optimised each task's smooth metric (`answer_logprob` for choice tasks, `logprob` "
                     "for reference tasks; dev_objective / objective:<name>); the scores shown are the primary ones.")
    lines.append("dev_vs_uniform, test_vs_uniform: score minus uniform's on the same examples, with a 95% "
                 "paired-bootstrap interval (_low, _high; examples resampled within each task). selected: the "
                 f"candidate in best.yaml, chosen by `{study.user_attrs.get(SELECT_ATTR, 'best_dev')}` from dev "
                 "values only.")
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


def selected_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The candidate `best.yaml` holds: chosen by the study's selection policy from search-split
    values only (selection.py); a pruned trial never is."""
    done = complete_trials(study)
    if not done:
        raise MergeSearchError(f"study {study.study_name!r} has no completed trials")
    return select(done, study.user_attrs.get(SELECT_ATTR, "best_dev"))


def leaderboard_trial(study: optuna.Study, which: str | int) -> optuna.trial.FrozenTrial:
    """`best` (the selected candidate) or a trial number, among completed trials."""
    if which == "best":
        return selected_trial(study)
    done = {t.number: t for t in complete_trials(study)}
    if int(which) not in done:
        state = next(("pruned" if is_pruned(t) else t.state.name.lower()
                      for t in study.get_trials(deepcopy=False) if t.number == int(which)), None)
        why = f"it was {state}" if state else "no such trial"
        raise MergeSearchError(f"trial {which} is not a completed trial of study {study.study_name!r} ({why})")
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


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def best_sentence(summary: dict) -> str:
    """One plain sentence: the exported trial, its gain over uniform and how sure it is."""
    vs = summary.get("vs_uniform") or {}
    dev, test = vs.get("dev"), vs.get("test")
    parts = []
    if dev:
        parts.append(f"dev {_signed(dev['diff'])} vs uniform [{_signed(dev['low'])}, {_signed(dev['high'])}]")
    else:
        parts.append(f"dev {summary['dev_score']:.3f}")
    if test:
        verdict = "significant on test" if test["significant"] else "not significant on test"
        parts.append(f"test {_signed(test['diff'])} [{_signed(test['low'])}, {_signed(test['high'])}]: {verdict}")
    elif summary.get("test_score") is not None:
        parts.append(f"test {summary['test_score']:.3f}")
    else:
        parts.append("no test split")
    who = summary["label"] if summary["label"].startswith("trial") else f"trial {summary['trial']} ({summary['label']})"
    return f"best: {who} ({'; '.join(parts)})"


def write_outputs(study: optuna.Study, out_dir: Path) -> tuple[dict, list[dict]]:
    """best.yaml, best.json, leaderboard.md, leaderboard.csv in `out_dir`; returns best.json's
    content and the leaderboard rows (the intervals are bootstrapped once for both)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    every = comparisons(study, complete_trials(study))
    rows = leaderboard_rows(study, every)
    best = selected_trial(study)
    test = study.user_attrs.get(f"{TEST_ATTR}{best.number}")
    cmp = every.get(best.number, {})
    ivs = {ref: {split: cmp[f"{split}_vs_{ref}"].as_dict() if f"{split}_vs_{ref}" in cmp else None
                 for split in ("dev", "test")} for ref in ("uniform", "best_source")}
    significant = {ref: (ivs[ref]["test"]["significant"] if ivs[ref]["test"] else None) for ref in ivs}
    scoring = study.user_attrs.get(EVAL_ATTR, {})
    dev = best.user_attrs.get("dev", {})
    summary = {
        "study": study.study_name,
        "trial": best.number,
        "label": best.user_attrs.get("label") or f"trial {best.number}",
        "select": study.user_attrs.get(SELECT_ATTR, "best_dev"),  # how it was chosen (search split only)
        "select_radius": selection_radius(complete_trials(study), study.user_attrs.get(SELECT_ATTR, "best_dev")),
        "weights": best.user_attrs["weights"],
        "dev_score": best.user_attrs.get("dev_score"),
        "test_score": test["score"] if test else None,
        "search_objective": best.values if scoring.get("objectives") else best.value,
        "dev_tasks": dev[SCORE]["tasks"] if SCORE in dev else {n: d["tasks"] for n, d in dev.items()},
        "test_tasks": ({n: o["tasks"] for n, o in test["objectives"].items()} if scoring.get("objectives")
                       else test["objectives"][SCORE]["tasks"]) if test else None,
        "score_terms": scoring.get("terms"),  # the metric of each task in the score
        "search_metric": scoring.get("metric", "primary"),
        "vs_uniform": ivs["uniform"],  # paired bootstrap, 95%: {"dev"|"test": {diff, low, high, significant}}
        "vs_best_source": ivs["best_source"] | {"source": cmp.get("best_source")},
        "significant_vs_uniform": significant["uniform"],  # the test interval excludes 0
        "significant_vs_best_source": significant["best_source"],
    }
    if scoring.get("objectives"):
        summary["objectives"] = {n: {"dev": d["score"], "test": test["objectives"][n]["score"] if test else None}
                                 for n, d in dev.items()}
    _write(out_dir / "best.yaml", to_yaml(trial_config(best)))
    _write(out_dir / "best.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    _write(out_dir / "leaderboard.md", to_markdown(rows, score_note(study)))
    _write(out_dir / "leaderboard.csv", to_csv(rows))
    return summary, rows
