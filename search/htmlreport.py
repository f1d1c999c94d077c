"""`report.html`: one self-contained page a user decides from, read back from the study alone.

    merge-search report RUN_DIR [-o FILE]          # `run` writes <run>/report.html itself

Plots are plotly figures (the `report` extra); plotly.js is inlined once, so the page opens from
a `file://` URL with no network. Sections, each with a title, axis labels with units and a
one-line caption saying how to read it:

- leaderboard: sources, uniform, the top candidates and the pruned ones, dev and test with
  their paired-bootstrap intervals vs uniform, the exported candidate highlighted;
- optimisation history: every trial's dev score, the best so far, the baselines as lines;
- weight importances: fANOVA (Optuna's evaluator) on the derived weights of each model and
  cell, not on the raw stick-breaking parameters;
- the simplex (3 models: a ternary map of every trial; 2 models: score against the weight);
- layer-wise searches: the exported candidate's weight of each model across layers, per filter;
- per-task scores of the top candidates against the sources and uniform, with 95% intervals;
- multi-objective studies: the Pareto front;
- time per trial split into merge / eval / other, and the examples pruning saved.

`build_report` returns the numbers and figures (what the tests check against the study);
`write_report` writes the page atomically.
"""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna

from search.attrs import EVAL_ATTR, EXAMPLES_ATTR, MERGE_ATTR, TEST_ATTR
from search.errors import MergeSearchError
from search.report import _write, comparisons, leaderboard_rows, score_note, selected_trial
from search.selection import complete_trials, is_pruned, pareto_front

TOP = 10  # candidates (besides the baselines) in the report's leaderboard
TOP_TASKS = 3  # candidates in the per-task plot (the exported one is always in)
SEED = 0


@dataclass
class Section:
    key: str
    title: str
    caption: str
    figure: object | None = None  # a plotly Figure
    html: str = ""  # or a block of HTML (the leaderboard table)


@dataclass
class Report:
    study: str
    best: int
    rows: list[dict]  # the report's leaderboard rows (a subset of leaderboard_rows, same values)
    importances: dict[str, float]  # "<cell>/<model>" -> share (sums to 1); {} when too few trials
    pruning_saved: float | None  # share of the search examples the pruner did not score
    sections: list[Section] = field(default_factory=list)


def _plotly():
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
    except ImportError:  # pragma: no cover - the report extra is not installed
        raise MergeSearchError("report.html needs plotly: pip install 'merge-search[report]'") from None
    return go, pio


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that were scored (a surplus or failed trial has no dev score)."""
    from search.study import finished

    return [t for t in finished(study) if "dev_score" in t.user_attrs]


def _name(t: optuna.trial.FrozenTrial) -> str:
    return t.user_attrs.get("label") or f"trial {t.number}"


def derived_weights(trial: optuna.trial.FrozenTrial, models: list[str]) -> dict[str, float]:
    """'<cell>/<model>' (and '<cell>/<model>:density', slerp's '<cell>/t') -> value."""
    out = {}
    for cell, values in (trial.user_attrs.get("cells") or {}).items():
        for key, vals in values.items():
            if key == "t":
                out[f"{cell}/t"] = float(vals[0])
                continue
            for model, v in zip(models, vals):
                out[f"{cell}/{model}" + ("" if key == "weight" else f":{key}")] = float(v)
    return out


def importances(study: optuna.Study, models: list[str]) -> dict[str, float]:
    """fANOVA importances of the derived weights for the dev score (shares summing to 1): a
    study of the same trials whose parameters are the weights, given to Optuna's evaluator."""
    # a parameter-free method's row has no cells: no weights to attribute its score to
    done = [t for t in complete_trials(study) if "dev_score" in t.user_attrs and t.user_attrs.get("cells")]
    if len(done) < 3:
        return {}
    proxy = optuna.create_study(direction="maximize")
    for t in done:
        params = derived_weights(t, models)
        proxy.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: optuna.distributions.FloatDistribution(0.0, 1.0) for k in params},
            value=t.user_attrs["dev_score"]))
    if len({tuple(sorted(derived_weights(t, models).items())) for t in done}) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=SEED)
        imp = optuna.importance.get_param_importances(proxy, evaluator=evaluator, normalize=True)
    total = sum(imp.values())
    return {k: v / total for k, v in imp.items()} if total > 0 else {}


def _task_examples(study: optuna.Study, t: optuna.trial.FrozenTrial, split: str) -> dict[str, list[float]] | None:
    """task -> the trial's per-example primary scores on `split` ("search" or "test")."""
    keys = study.user_attrs.get(EXAMPLES_ATTR, {}).get(split, {})
    if split == "search":
        per = t.user_attrs.get("examples")
    else:
        test = study.user_attrs.get(f"{TEST_ATTR}{t.number}")
        per = {n: o["examples"] for n, o in test["objectives"].items()} if test else None
    if not per or not keys:
        return None
    out: dict[str, list[float]] = {}
    for name, names in keys.items():
        prefix = f"{name}/" if len(keys) > 1 else ""
        for k, v in zip(names, per.get(name, [])):
            out.setdefault(prefix + k.split("/", 1)[0], []).append(v)
    return out


def _mean_interval(values: list[float], n: int = 1000) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval of one task's per-example scores."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(SEED)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    return float(v.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _fmt(x, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(row: dict, split: str) -> str:
    d = row.get(f"{split}_vs_uniform")
    if d is None:
        return ""
    return f"{d:+.3f} [{row[f'{split}_vs_uniform_low']:+.3f}, {row[f'{split}_vs_uniform_high']:+.3f}]"


def _table(rows: list[dict], models: list[str], note: str) -> str:
    head = ["#", "candidate", "state", "dev", "dev vs uniform (95%)", "test", "test vs uniform (95%)", *models]
    body = []
    for r in rows:
        cls = ' class="best"' if r["selected"] else ' class="pruned"' if r["state"] != "complete" else ""
        cells = [str(r["rank"]), html.escape(str(r["label"])) + (" ★ exported" if r["selected"] else ""),
                 html.escape(r["state"]), _fmt(r["dev_score"]), _interval(r, "dev"), _fmt(r["test_score"]),
                 _interval(r, "test"), *(_fmt(r.get(f"w:{m}")) for m in models)]
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    notes = "".join(f"<p class='note'>{html.escape(line)}</p>" for line in note.splitlines() if line.strip())
    return (f"<table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{notes}")


def build_report(study: optuna.Study) -> Report:
    """Every number and figure of the report, from the study's storage alone."""
    go, _ = _plotly()
    done = complete_trials(study)
    if not done:
        raise MergeSearchError(f"study {study.study_name!r} has no fully scored trial to report")
    models = list(study.user_attrs.get(MERGE_ATTR, {}).get("models") or done[0].user_attrs["weights"])
    scoring = study.user_attrs.get(EVAL_ATTR, {})
    objectives = list(scoring.get("objectives", {}))
    best = selected_trial(study)
    cmp = comparisons(study, done)
    every = leaderboard_rows(study, cmp)
    baseline_rows = [r for r in every if r["label"] in (*models, "uniform")]
    top = [r for r in every if r["state"] == "complete" and r not in baseline_rows][:TOP]
    pruned = [r for r in every if r["state"] != "complete"]
    rows = sorted(baseline_rows + top + [r for r in every if r["selected"] and r not in top + baseline_rows],
                  key=lambda r: r["rank"]) + pruned[:TOP]
    trials = _finished(study)
    n_search = sum(len(v) for v in study.user_attrs.get(EXAMPLES_ATTR, {}).get("search", {}).values())
    seen = [t.user_attrs.get("seen", 1.0) for t in trials]
    saved = (sum(1 - s for s in seen) / len(seen)) if seen and n_search else None
    imp = importances(study, models)
    report = Report(study.study_name, best.number, rows, imp, saved)
    S = report.sections.append
    S(Section("leaderboard", "Leaderboard",
              "Best dev first; sources and uniform always shown; ★ is the candidate in best.yaml, pruned "
              "candidates are greyed. Intervals: score minus uniform's on the same examples, 95% paired bootstrap.",
              html=_table(rows, models, score_note(study))))

    # optimisation history
    fig = go.Figure()
    full = [t for t in trials if not is_pruned(t)]
    fig.add_trace(go.Scatter(x=[t.number for t in full], y=[t.user_attrs["dev_score"] for t in full], mode="markers",
                             name="fully scored", text=[_name(t) for t in full]))
    stopped = [t for t in trials if is_pruned(t)]
    if stopped:
        fig.add_trace(go.Scatter(x=[t.number for t in stopped], y=[t.user_attrs["dev_score"] for t in stopped],
                                 mode="markers", marker={"symbol": "x", "color": "grey"},
                                 name="pruned (estimate on the examples seen)"))
    xs, ys, run = [], [], -math.inf
    for t in sorted(full, key=lambda t: t.number):
        run = max(run, t.user_attrs["dev_score"])
        xs.append(t.number)
        ys.append(run)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "hv"}, name="best so far"))
    for t in full:
        if t.user_attrs.get("label"):
            fig.add_hline(y=t.user_attrs["dev_score"], line_dash="dot", opacity=0.5,
                          annotation_text=t.user_attrs["label"], annotation_position="right")
    fig.update_layout(title="Optimisation history", xaxis_title="trial number", yaxis_title="dev score (0-1)")
    S(Section("history", "Optimisation history",
              "Each dot is a candidate's dev score; the line is the best so far; dotted lines are the sources and "
              "uniform. Grey crosses were stopped by the pruner (their estimate is on the examples they saw).", fig))

    # importances
    if imp:
        keys = sorted(imp, key=imp.get)
        one_cell = len({k.split("/", 1)[0] for k in keys}) == 1  # a global search: just the model names
        fig = go.Figure(go.Bar(x=[imp[k] for k in keys], y=[k.split("/", 1)[1] if one_cell else k for k in keys],
                               orientation="h"))
        fig.update_layout(title="Weight importances (fANOVA on the derived weights)",
                          xaxis_title="share of the dev-score variance explained (sums to 1)",
                          yaxis_title="cell / model weight")
        S(Section("importances", "Weight importances",
                  "How much of the dev score's variation each model's weight explains, per cell, on the weights "
                  "that were merged (not the raw sampler parameters); longer bars matter more.", fig))

    # the simplex; the per-layer plot shows the exported candidate, or the best searched one when a
    # parameter-free method's row (no cells) is exported
    searched = [t for t in full if t.user_attrs.get("cells")]
    layered = best if best.user_attrs.get("cells") else max(
        searched, key=lambda t: (t.user_attrs["dev_score"], -t.number), default=best)
    cells = layered.user_attrs.get("cells") or {}
    weights = [[t.user_attrs["weights"][m] for m in models] for t in full]
    score = [t.user_attrs["dev_score"] for t in full]
    marks = [(t, "star" if t.number == best.number else "diamond") for t in full
             if t.user_attrs.get("label") or t.number == best.number]
    if len(models) == 3 and "weight" in next(iter(cells.values()), {}):
        fig = go.Figure(go.Scatterternary(
            a=[w[0] for w in weights], b=[w[1] for w in weights], c=[w[2] for w in weights], mode="markers",
            marker={"color": score, "colorscale": "Viridis", "showscale": True, "colorbar": {"title": "dev"}},
            text=[_name(t) for t in full], name="candidates"))
        for t, symbol in marks:
            w = [t.user_attrs["weights"][m] for m in models]
            fig.add_trace(go.Scatterternary(a=[w[0]], b=[w[1]], c=[w[2]], mode="markers+text", text=[_name(t)],
                                            textposition="top center", name=_name(t),
                                            marker={"symbol": symbol, "size": 14, "color": "red"}))
        fig.update_layout(title="Every candidate on the weight simplex",
                          legend={"orientation": "h", "y": -0.15},
                          ternary={"aaxis": {"title": f"{models[0]} weight"}, "baxis": {"title": f"{models[1]} weight"},
                                   "caxis": {"title": f"{models[2]} weight"}})
        S(Section("simplex", "The weight simplex",
                  "Each point is a candidate's (mean) weights, coloured by dev score; each source is a corner, the "
                  "diamond marks uniform and the star the exported candidate.", fig))
    elif len(models) == 2:
        fig = go.Figure(go.Scatter(x=[w[1] for w in weights], y=score, mode="markers", text=[_name(t) for t in full],
                                   name="candidates"))
        for t, symbol in marks:
            fig.add_trace(go.Scatter(x=[t.user_attrs["weights"][models[1]]], y=[t.user_attrs["dev_score"]],
                                     mode="markers+text", text=[_name(t)], textposition="top center", name=_name(t),
                                     marker={"symbol": symbol, "size": 14}))
        fig.update_layout(title=f"Dev score against the weight of {models[1]}",
                          xaxis_title=f"{models[1]} weight (0-1; {models[0]} has the rest)", yaxis_title="dev score (0-1)")
        S(Section("simplex", "Score against the weight",
                  f"Each point is a candidate; left is {models[0]} alone, right is {models[1]} alone.", fig))

    # layer-wise weights of the exported candidate
    groups = sorted({c.split(".", 1)[0] for c in cells}, key=lambda g: int(g[1:]))
    if len(groups) > 1 and all("weight" in v for v in cells.values()):
        filters = sorted({c.split(".", 1)[1] for c in cells})
        fig = go.Figure()
        for f in filters:
            for i, m in enumerate(models):
                ys = [cells[f"{g}.{f}"]["weight"][i] for g in groups]
                fig.add_trace(go.Scatter(x=list(range(len(groups))), y=ys, mode="lines+markers",
                                         name=f"{m}" + ("" if filters == ["rest"] else f" ({f})")))
        who = "The exported candidate's" if layered is best else f"{_name(layered)}'s (the best searched candidate)"
        fig.update_layout(title=f"{who} weights across layers",
                          xaxis_title="layer group (0 = closest to the embeddings)", yaxis_title="weight (0-1)",
                          xaxis={"dtick": 1})
        S(Section("layers", "Weights across layers",
                  "One line per model (and filter): the weight the exported candidate gives it in each layer group.",
                  fig))

    # per-task scores with intervals
    split = "test" if study.user_attrs.get(f"{TEST_ATTR}{best.number}") else "search"
    labelled = [t for t in full if t.user_attrs.get("label")]
    candidates = sorted((t for t in full if not t.user_attrs.get("label")),
                        key=lambda t: (-t.user_attrs["dev_score"], t.number))
    shown = labelled + [t for t in candidates if study.user_attrs.get(f"{TEST_ATTR}{t.number}") or split == "search"][:TOP_TASKS]
    if best not in shown:
        shown.append(best)
    fig = go.Figure()
    for t in shown:
        per = _task_examples(study, t, split)
        if not per:
            continue
        tasks = list(per)
        stats = [_mean_interval(per[k]) for k in tasks]
        fig.add_trace(go.Bar(x=tasks, y=[s[0] for s in stats], name=_name(t) + (" ★" if t.number == best.number else ""),
                             error_y={"type": "data", "symmetric": False, "array": [s[2] - s[0] for s in stats],
                                      "arrayminus": [s[0] - s[1] for s in stats]}))
    if fig.data:
        fig.update_layout(barmode="group", title=f"Per-task scores on {'test' if split == 'test' else 'dev'}",
                          xaxis_title="task", yaxis_title="primary metric (0-1)")
        S(Section("tasks", "Per-task scores",
                  f"Each group is a task of the {'held-out test' if split == 'test' else 'dev'} split: the sources, "
                  "uniform and the top candidates; whiskers are 95% bootstrap intervals over the task's items.", fig))

    # Pareto front
    if len(objectives) >= 2:
        front = {t.number for t in pareto_front(done)}
        a, b = objectives[:2]
        val = lambda t, o: t.user_attrs["dev"][o]["score"]  # noqa: E731
        fig = go.Figure(go.Scatter(x=[val(t, a) for t in done], y=[val(t, b) for t in done], mode="markers",
                                   text=[_name(t) for t in done], name="candidates", marker={"color": "lightgrey"}))
        on = sorted((t for t in done if t.number in front), key=lambda t: val(t, a))
        fig.add_trace(go.Scatter(x=[val(t, a) for t in on], y=[val(t, b) for t in on], mode="lines+markers",
                                 line={"shape": "hv"}, text=[_name(t) for t in on], name="Pareto front"))
        fig.add_trace(go.Scatter(x=[val(best, a)], y=[val(best, b)], mode="markers", name="exported",
                                 marker={"symbol": "star", "size": 16}))
        fig.update_layout(title="Pareto front of the dev objectives", xaxis_title=f"{a} (dev, 0-1)",
                          yaxis_title=f"{b} (dev, 0-1)")
        S(Section("pareto", "Pareto front",
                  "Each point is a candidate; the line joins those no other candidate beats on both objectives; "
                  "the star is the one exported.", fig))

    # time per trial
    timed = [t for t in trials if "timing" in t.user_attrs and t.datetime_complete and t.datetime_start]
    if timed:
        merge = [t.user_attrs["timing"]["merge_s"] for t in timed]
        ev = [t.user_attrs["timing"]["eval_s"] for t in timed]
        other = [max(0.0, (t.datetime_complete - t.datetime_start).total_seconds() - m - e)
                 for t, m, e in zip(timed, merge, ev)]
        x = [t.number for t in timed]
        fig = go.Figure([go.Bar(x=x, y=merge, name="merge"), go.Bar(x=x, y=ev, name="eval"),
                         go.Bar(x=x, y=other, name="other (sampler, storage, reports)")])
        fig.update_layout(barmode="stack", title="Time per trial", xaxis_title="trial number", yaxis_title="seconds")
        saved_text = (f" The pruner saved {100 * saved:.0f}% of the search examples." if saved else
                      " No trial was stopped early.")
        S(Section("time", "Time per trial",
                  "Each bar is one trial's wall time, split into the in-memory merge, the eval and the rest." + saved_text,
                  fig))
    return report


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
td:nth-child(2), td:nth-child(3), th { text-align: left; }
tr.best { background: #fff3c4; font-weight: bold; }
tr.pruned { color: #999; }
.caption { color: #555; margin: 0.2em 0 1.5em; }
.note { color: #555; font-size: 13px; margin: 0.2em 0; }
"""


def render_html(report: Report) -> str:
    _, pio = _plotly()
    from plotly.offline import get_plotlyjs

    parts = []
    for s in report.sections:
        body = s.html or pio.to_html(s.figure, include_plotlyjs=False, full_html=False, div_id=f"plot-{s.key}",
                                     config={"displaylogo": False, "responsive": True})
        parts.append(f"<section id='{s.key}'><h2>{html.escape(s.title)}</h2>"
                     f"<p class='caption'>{html.escape(s.caption)}</p>{body}</section>")
    title = f"merge-search: {html.escape(report.study)}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body><h1>{title}</h1>"
            f"<p>Exported: trial {report.best} (best.yaml).</p>{''.join(parts)}</body></html>\n")


def write_report(study: optuna.Study, path: Path) -> Report:
    """Build the report of `study` and write it to `path` (atomically: whole or not at all)."""
    report = build_report(study)
    _write(Path(path), render_html(report))
    return report
