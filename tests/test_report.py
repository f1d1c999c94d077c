"""report.html and the terminal verbs on real demo runs: the report's numbers against the study,
self-contained HTML, every plot rendered in headless Chromium with no console error and no
network request, the live dashboard's JSON API, the 80-column leaderboard, resume in words."""

import json
import os
import re
import wsgiref.util
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from search.cli import main
from search.htmlreport import build_report, derived_weights
from search.report import leaderboard_rows, selected_trial
from search.selection import complete_trials
from search.study import load_existing_study

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots (ignored by git)


def _run(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(main, ["run", *args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run3(demo_family, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("run3"), "--trials", "12")


@pytest.fixture(scope="module")
def layer_run(demo_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    cfg = root / "layers.yaml"
    text = Path("configs/demo.yaml").read_text(encoding="utf-8")
    cfg.write_text(text.replace("  normalize: true", "  normalize: true\n  granularity: 1\n  filters: [mlp]"),
                   encoding="utf-8")
    return _run(root / "out", str(cfg), "--trials", "8")


@pytest.fixture(scope="module")
def pareto_run(demo_family, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pareto"), "configs/demo-objectives.yaml", "--trials", "8")


def _study(run: Path) -> optuna.Study:
    return load_existing_study(f"sqlite:///{run / 'study.db'}", "demo" if "pareto" not in str(run) else
                               optuna.get_all_study_summaries(f"sqlite:///{run / 'study.db'}")[0].study_name)


def test_the_report_numbers_are_the_studys(run3):
    study = _study(run3)
    report = build_report(study)
    assert report.best == selected_trial(study).number == json.loads((run3 / "best.json").read_text())["trial"]
    every = {r["trial"]: r for r in leaderboard_rows(study)}
    for row in report.rows:
        assert row == every[row["trial"]]  # the same values as leaderboard.md / csv
    labels = {r["label"] for r in report.rows}
    assert {"inst-v1", "inst-v2", "inst-meta", "uniform"} <= labels and report.best in {r["trial"] for r in report.rows}
    # importances: the derived weights of the one cell, shares summing to 1
    assert set(report.importances) == {f"g0.rest/{m}" for m in ("inst-v1", "inst-v2", "inst-meta")}
    assert sum(report.importances.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in report.importances.values())
    t = complete_trials(study)[0]
    assert derived_weights(t, ["inst-v1", "inst-v2", "inst-meta"]) == {
        f"g0.rest/{m}": w for m, w in zip(["inst-v1", "inst-v2", "inst-meta"], t.user_attrs["cells"]["g0.rest"]["weight"])}
    seen = [t.user_attrs.get("seen", 1.0) for t in study.get_trials() if "dev_score" in t.user_attrs]
    assert report.pruning_saved == pytest.approx(sum(1 - s for s in seen) / len(seen))
    assert {s.key for s in report.sections} >= {"leaderboard", "history", "importances", "simplex", "tasks", "time"}
    assert all(s.title and s.caption and (s.figure is not None or s.html) for s in report.sections)
    for s in report.sections:  # every plot has a title and axis titles with units (or a ternary's axes)
        if s.figure is not None:
            layout = s.figure.layout
            assert layout.title.text
            if s.key != "simplex":
                assert layout.xaxis.title.text and layout.yaxis.title.text
            else:
                assert all(getattr(layout.ternary, a).title.text for a in ("aaxis", "baxis", "caxis"))


def test_the_report_is_self_contained(run3):
    text = (run3 / "report.html").read_text(encoding="utf-8")
    assert text.count("plotly.js v") == 1  # the library inlined once, in the head
    page = text[text.index("</script>"):]  # everything after the library
    assert re.findall(r"<script[^>]*>", page) == ["<script>"] * page.count("<script")  # no src=
    assert not re.findall(r"https?://", page) and "<link" not in text[:text.index("<script>")]
    assert "★ exported" in text and "dev_score: the weighted mean" in text


def test_layer_wise_and_two_objective_reports_have_their_plots(layer_run, pareto_run):
    layers = build_report(_study(layer_run))
    assert "layers" in {s.key for s in layers.sections} and "simplex" in {s.key for s in layers.sections}
    fig = next(s.figure for s in layers.sections if s.key == "layers")
    assert len(fig.data) == 3 * 2  # three models x {mlp, rest}
    assert all(len(trace.y) == 4 for trace in fig.data)  # one point per layer of the demo's 4
    assert sum(layers.importances.values()) == pytest.approx(1.0) and len(layers.importances) == 3 * 2 * 4
    pareto = build_report(_study(pareto_run))
    assert "pareto" in {s.key for s in pareto.sections}
    assert (pareto_run / "report.html").is_file()


def _browser():
    from browser import chromium

    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromedriver (.ci/run installs them)")
        pytest.skip("chromium and chromedriver are not installed")


@pytest.mark.parametrize("which", ["run3", "layer_run", "pareto_run"])
def test_the_report_renders_in_headless_chromium_offline(which, request):
    _browser()
    from browser import open_page

    run = request.getfixturevalue(which)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{which}.png"
    page = open_page(run / "report.html", screenshot=shot)
    errors = [e for e in page["console"] if e["level"] == "SEVERE"]
    assert not errors, errors
    assert all(u.startswith(("file://", "data:")) for u in page["requests"]), page["requests"]
    report = build_report(_study(run))
    plotted = [s.key for s in report.sections if s.figure is not None]
    assert [p["id"] for p in page["plots"]] == [f"plot-{k}" for k in plotted]
    assert all(p["width"] > 100 and p["height"] > 100 and p["marks"] > 0 for p in page["plots"]), page["plots"]
    assert page["rows"] == len(report.rows)
    assert shot.stat().st_size > 10_000


def test_the_dashboard_lists_our_study_and_user_attrs(run3):
    from optuna_dashboard import wsgi

    app = wsgi(f"sqlite:///{run3 / 'study.db'}")

    def get(path):
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
        wsgiref.util.setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, exc=None: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["demo"]
    detail = get(f"/api/studies/{studies[0]['study_id']}")
    study = _study(run3)
    assert len(detail["trials"]) == len(study.trials)
    attrs = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
    assert attrs["label"] == "inst-v1" and "dev_score" in attrs and "weights" in attrs
    assert {a["key"] for a in detail["user_attrs"]} >= {"merge", "eval", "example_keys"}


def test_the_terminal_leaderboard_fits_80_columns_and_resume_says_so(run3):
    out = CliRunner().invoke(main, ["leaderboard", str(run3), "--top", "5"], terminal_width=80)
    assert out.exit_code == 0, out.output
    assert "inst-meta" in out.output and "* " in out.output
    assert max(len(line) for line in out.output.splitlines()) <= 80
    assert len([x for x in out.output.splitlines() if x.strip()[:1].isdigit()]) == 5
    md = CliRunner().invoke(main, ["leaderboard", str(run3), "--format", "csv", "--top", "3"])
    assert len(md.output.strip().splitlines()) == 1 + 3
    again = CliRunner().invoke(main, ["run", "--trials", "12", "--out", str(run3), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "already has 12 finished trials of the 12 wanted: nothing left to run" in again.output
    quiet = CliRunner().invoke(main, ["run", "-q", "--trials", "12", "--out", str(run3), "--device", "cpu"])
    assert quiet.output.strip().splitlines()[-1].startswith("best: ")


def test_report_command_and_its_errors(run3, tmp_path):
    out = CliRunner().invoke(main, ["report", "--storage", f"sqlite:///{run3 / 'study.db'}", "-o", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r.html").stat().st_size > 1_000_000
    missing = CliRunner().invoke(main, ["report", "--storage", f"sqlite:///{run3 / 'study.db'}"])
    assert missing.exit_code == 2 and "give -o FILE.html" in missing.output
    nowhere = CliRunner().invoke(main, ["report", str(run3), "-o", str(tmp_path / "no" / "r.html")])
    assert nowhere.exit_code == 2 and "no such folder" in nowhere.output
    other = next(t.number for t in complete_trials(_study(run3)) if t.number != selected_trial(_study(run3)).number)
    export = CliRunner().invoke(main, ["export", str(run3), "--trial", str(other), "-o", str(tmp_path / "t.yaml")])
    assert export.exit_code == 0 and f"trial {other}" in export.output, export.output
