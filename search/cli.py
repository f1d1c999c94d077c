"""The `merge-search` command.

    merge-search run                     # the demo: builds the demo family, searches, reports
    merge-search run configs/x.yaml --trials 50 --device cuda

Exit codes: 0 success, 2 bad input (one line on stderr), 1 a bug (with its traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from evaluation.errors import EvalError
from search.errors import MergeSearchError

USER_ERRORS = (MergeSearchError, EvalError)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2: help, not an error
console = Console(stderr=True)


def _one_line(message: str) -> str:
    """A multi-line message (an alignment report: a head line, then one problem per line) as one line."""
    head, *rest = [line.strip() for line in str(message).splitlines() if line.strip()] or [""]
    return f"{head}: {'; '.join(rest)}" if rest else head


class _Group(click.Group):
    """Turns user errors, bad options included, into one line and exit code 2; bugs keep their traceback."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as e:
            self._usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as e:  # a subcommand's options (click would print usage + hint + error)
            self._usage_error(e)

    @staticmethod
    def _usage_error(e: click.UsageError):
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
        sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v: info logs, -vv: debug logs.")
def main(verbose: int) -> None:
    """Find the best weights for merging fine-tuned checkpoints of one model.

    An Optuna study proposes merge weights, each candidate is merged in memory and scored on
    a lightweight eval suite, and the best weights are exported as a mergekit config.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    if verbose < 2:
        logging.getLogger("optuna").setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _storage_args(run_dir: str | None, storage: str | None, study_name: str | None):
    """Resolve RUN_DIR | --storage/--study-name to a loaded study."""
    from search.storage import load_existing_study

    if run_dir:
        db = Path(run_dir) / "study.db"
        if not db.is_file():
            raise MergeSearchError(f"{run_dir}: not a run folder (no study.db)")
        storage = f"sqlite:///{db.resolve()}"
    if not storage:
        raise MergeSearchError("give a RUN_DIR or --storage URL")
    if not study_name:
        import optuna

        from search.storage import mask_url, open_storage

        names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage, create=False))]
        if len(names) != 1:
            raise MergeSearchError(f"{mask_url(storage)} holds {len(names)} studies ({', '.join(names) or 'none'}): "
                                   "name one with --study-name")
        study_name = names[0]
    return load_existing_study(storage, study_name)


def _print_leaderboard(rows: list[dict], limit: int = 15, more: str = "leaderboard.md") -> None:
    """The top rows, narrow enough for 80 columns: `*` marks the exported candidate, the test
    gain over uniform carries its 95% interval, the weights are one column (legend above)."""
    if not rows:
        return
    f = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731

    def vs(r):
        if r.get("test_vs_uniform") is None:
            return ""
        return f"{r['test_vs_uniform']:+.2f} [{r['test_vs_uniform_low']:+.2f},{r['test_vs_uniform_high']:+.2f}]"

    weights = [c for c in rows[0] if c.startswith("w:")]
    objectives = [c for c in rows[0] if c.startswith("dev:") and c.count(":") == 1]
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, title=f"leaderboard (best dev first; * = exported; weights: "
                        f"{' / '.join(c[2:] for c in weights)})")
    for c in ["#", "label", "pruned", "dev", *(o[4:] for o in objectives), "test", "test vs uniform", "weights"]:
        table.add_column(c, justify="left" if c in ("label", "weights") else "right", no_wrap=True)
    for r in rows[:limit]:
        label = ("* " if r["selected"] else "") + r["label"]
        state = r["state"].removeprefix("pruned (").removesuffix(" seen)") if r["state"] != "complete" else ""
        table.add_row(str(r["rank"]), label, state, f(r["dev_score"]), *(f(r[o]) for o in objectives),
                      f(r["test_score"]), vs(r), "/".join(f"{r[c]:.2f}".removeprefix("0") for c in weights))
    Console().print(table)
    if len(rows) > limit:
        Console().print(f"... {len(rows) - limit} more rows{' in ' + more if more else ''}")


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--trials", type=int, help="Finished trials wanted in the study (a resumed study runs the rest).")
@click.option("--timeout", type=float, help="Stop starting new trials after this many seconds.")
@click.option("--storage", help="Optuna storage URL (default sqlite:///<out>/study.db).")
@click.option("--study-name", help="Study name (default: the config's name).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default runs/<name>).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where sources live and models run.")
@click.option("--search-on-test", is_flag=True, help="Allow eval.search_split to be the held-out split (its "
              "test score is then no longer held out).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table: only the final sentence.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine sharing the study (one per visible GPU, or the CPU cores "
                   "split between them); needs a journal:// or postgresql:// storage.")
@click.option("--worker", "as_worker", is_flag=True, hidden=True, help="Run trials only (a worker of --workers).")
def run(config, trials, timeout, storage, study_name, out, device, search_on_test, quiet, workers, as_worker) -> None:
    """Search merge weights for CONFIG (default: configs/demo.yaml) and write the run folder.

    Writes study.db, best.yaml (mergekit config), best.json, leaderboard.md,
    leaderboard.csv and report.html. Running again with the same storage and study name resumes.
    """
    from search.config import load_config
    from search.study import check_search_split, finished_count, run_search

    cfg = load_config(
        config, **{"study.n_trials": trials, "study.timeout": timeout, "study.storage": storage,
                   "study.study_name": study_name, "out": out, "device": device},
    )
    check_search_split(cfg, search_on_test)  # before the demo family is built
    if any(m.path.startswith("demo:") for m in cfg.models):
        from search.demo import demo_family_dir, ensure_demo_family

        if not demo_family_dir().is_dir():
            console.print(f"building the demo model family in {demo_family_dir()} (once, a few minutes)...")
        ensure_demo_family()
    if as_worker:
        run_search(cfg, search_on_test=search_on_test, rescore=False)
        return
    if workers > 1:
        _run_workers(cfg, config, workers, search_on_test, device)
    have = finished_count(cfg)
    if have >= cfg.study.n_trials:
        click.echo(f"study {cfg.study_name!r} already has {have} finished trials of the {cfg.study.n_trials} wanted: "
                   f"nothing left to run (pass --trials N for more); writing the outputs again")
        study = run_search(cfg, search_on_test=search_on_test)
    elif quiet:
        study = run_search(cfg, search_on_test=search_on_test)
    else:
        # the bar appears with the first trial's first batch: a bad source or suite fails before it
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("best dev {task.fields[best]}"), TimeElapsedColumn(), TextColumn("eta"),
                       TimeRemainingColumn(), console=console)
        task = bar.add_task(f"study {cfg.study_name}" + (f" (resumed at {have})" if have else ""),
                            total=cfg.study.n_trials, completed=have, best="-")
        batches = bar.add_task("  eval batches", total=1, visible=False, best="")
        started = [0.0, False]

        def show():
            if not started[1]:
                bar.start()
                started[1] = True

        def on_trial(study, trial):
            from search.study import budget_finished, complete_trials

            show()
            scores = [t.user_attrs.get("dev_score", 0.0) for t in complete_trials(study)]
            bar.update(task, completed=len(budget_finished(study)), best=f"{max(scores):.4f}" if scores else "-")

        def on_batch(done, total):
            # a second bar for a trial's eval, shown once an eval has run a couple of seconds
            show()
            if done == 0:
                started[0] = time.perf_counter()
                bar.update(batches, completed=0, total=total)
                return
            bar.update(batches, completed=done, visible=time.perf_counter() - started[0] > 2.0 and done < total)

        try:
            study = run_search(cfg, on_trial=on_trial, search_on_test=search_on_test, on_batch=on_batch)
        finally:
            if started[1]:
                bar.stop()
    _finish(study, cfg, quiet)


def _finish(study, cfg, quiet: bool) -> None:
    """Write the run folder's outputs and print the leaderboard and the final sentence."""
    from search.report import best_sentence, score_note, write_outputs

    summary, rows = write_outputs(study, cfg.out_dir)
    report = _write_report(study, cfg.out_dir / "report.html")
    if not quiet:
        _print_leaderboard(rows)
        note = score_note(study)
        if note:  # what dev_score is a mean of
            _echo_wrapped(note.splitlines()[0])
        if report:
            click.echo(report)
    click.echo(f"{best_sentence(summary)}; outputs in {cfg.out_dir}/")


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--steps", type=int, help="Learner steps (study.learner.steps).")
@click.option("--lr", type=float, help="Adam's learning rate (study.learner.lr).")
@click.option("--start", type=click.Choice(["uniform", "best"]), help="Start from uniform or from the selected "
              "candidate of the study's search (study.learner.start).")
@click.option("--early-stop", type=float, help="Share of the search split held out for early stopping "
              "(study.learner.early_stop).")
@click.option("--storage", help="Optuna storage URL (default sqlite:///<out>/study.db).")
@click.option("--study-name", help="Study name (default: the config's name).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default runs/<name>).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where sources live and models run.")
@click.option("--search-on-test", is_flag=True, hidden=True)
@click.option("-q", "--quiet", is_flag=True, help="No table: only the final sentence.")
def learn(config, steps, lr, start, early_stop, storage, study_name, out, device, search_on_test, quiet) -> None:
    """Learn merge weights by gradient for CONFIG (its study.learner, else the defaults) and score
    them as the trial `learned` of its study, then write the run folder as `run` does.

    A study with no trials yet gets its baselines first (each source alone, uniform), so that the
    learned candidate has rows to be compared with; a study that `run` searched is learned from
    (`--start best`) and added to. No black-box trials are run.
    """
    from search.config import load_config
    from search.study import check_search_split, finished_count, run_search

    common = {"study.storage": storage, "study.study_name": study_name, "out": out, "device": device}
    given = {"steps": steps, "lr": lr, "start": start, "early_stop": early_stop}
    cfg = load_config(config, **common)
    if cfg.study.learner is None:
        cfg = load_config(config, **common, **{"study.learner": {k: v for k, v in given.items() if v is not None}})
    else:
        cfg = load_config(config, **common, **{f"study.learner.{k}": v for k, v in given.items()})
    check_search_split(cfg, search_on_test)
    if any(m.path.startswith("demo:") for m in cfg.models):
        from search.demo import ensure_demo_family

        ensure_demo_family()
    baselines = len(cfg.models) + 1 + len(cfg.baseline_methods)
    trials = max(finished_count(cfg), min(baselines, cfg.study.n_trials))
    cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"n_trials": trials})})
    study = run_search(cfg, search_on_test=search_on_test)
    _finish(study, cfg, quiet)


def _run_workers(cfg, config: str | None, workers: int, search_on_test: bool, device: str | None) -> None:
    """K `run --worker` processes on the study's storage, until it has its trials; Optuna's
    storage hands out the trials. One GPU per worker where there are GPUs, else the cores split."""
    import os
    import subprocess

    import torch

    from search.storage import mask_url, storage_kind

    if storage_kind(cfg.storage_url) == "sqlite":
        raise MergeSearchError(f"--workers {workers} needs a storage several processes can share: pass "
                               f"--storage journal:///{cfg.out_dir.resolve()}/study.log or postgresql+psycopg://..., "
                               f"not {mask_url(cfg.storage_url)}")
    gpus = torch.cuda.device_count() if (device or cfg.device) != "cpu" else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    args = [sys.executable, "-m", "search.cli", "run", *([config] if config else []), "--worker",
            "--storage", cfg.storage_url, "--study-name", cfg.study_name, "--trials", str(cfg.study.n_trials),
            "--out", str(cfg.out_dir)]
    if cfg.study.timeout:
        args += ["--timeout", str(cfg.study.timeout)]
    if device:
        args += ["--device", device]
    if search_on_test:
        args.append("--search-on-test")
    from search.storage import open_storage

    open_storage(cfg.storage_url, create=True)  # the schema once, before the workers race to make it
    procs = []
    for i in range(workers):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MERGE_SEARCH_WORKERS=str(workers))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        procs.append(subprocess.Popen(args, env=env))
    console.print(f"{workers} workers on {mask_url(cfg.storage_url)} "
                  f"({'one GPU each' if gpus else f'{threads} CPU threads each'})")
    codes = [p.wait() for p in procs]
    if any(codes):
        raise MergeSearchError(f"{sum(c != 0 for c in codes)} of {workers} workers failed (exit codes {codes}); "
                               "run the same command again to resume the study")


def _check_finite(model, ck) -> None:
    """A NaN or inf weight of a loaded model is an error naming the file and the tensor (no
    scores are printed: the JSON is written once every model is scored)."""
    import torch

    bad = [(n, int((~torch.isfinite(p)).sum())) for n, p in model.state_dict().items()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        name, n = bad[0]
        info = ck.tensors.get(name)
        file = info.file if info else ck.path
        more = f" ({len(bad) - 1} more tensors hold NaN/inf too)" if len(bad) > 1 else ""
        raise MergeSearchError(f"{file}: tensor {name} holds {n} NaN/inf value{'s' if n > 1 else ''} "
                               f"of {model.state_dict()[name].numel()}{more}")


def _echo_wrapped(text: str) -> None:
    """A paragraph wrapped to the terminal's width (80 columns when it is not a terminal)."""
    import textwrap

    click.echo(textwrap.fill(text, width=max(40, Console().width)))


def _write_report(study, path: Path) -> str:
    """Write report.html when the report extra (plotly) is installed; the line to print."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return "report.html skipped: pip install 'merge-search[report]' (plotly) to get it"
    from search.htmlreport import write_report

    write_report(study, path)
    return f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB, opens offline)"


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config) -> None:
    """Check that the sources of CONFIG can be merged (names, shapes, dtypes, configs, tokenizers)."""
    from search.config import load_config

    cfg = load_config(config)  # before the slow imports: a bad config fails at once
    from search.checkpoints import check_finite_weights
    from search.study import open_sources

    sources, base = open_sources(cfg)
    for s in sources + ([base] if base else []):
        check_finite_weights(s)  # reads every tensor: a NaN in a source would poison every merge
    for s in sources + ([base] if base else []):
        click.echo(f"ok  {s.name}: {s.path} ({len(s.tensors)} tensors, all finite)")
    click.echo(f"{len(sources) + (base is not None)} models aligned")


@main.command("eval")
@click.argument("target", type=click.Path(exists=True))
@click.option("--suite", help="Suite name, suite folder/YAML, one data file (JSONL, C-Eval CSV, datasets folder) "
              "or an lm-eval task YAML (default: the config's suite, else demo).")
@click.option("--split", default="dev", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--system", help="System prompt for tasks that set none.")
@click.option("--chat/--no-chat", default=None, help="Use the tokenizer's chat template for every task / for none "
              "(default: as each task and suite say; C-Eval data and lm-eval tasks without it).")
def eval_(target, suite, split, device, batch_size, system, chat) -> None:
    """Score one model folder, or every source of a config, and print JSON (per task and total)."""
    if batch_size < 1:
        raise MergeSearchError(f"--batch-size must be at least 1 but got {batch_size}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.suite import EvalSuite
    from evaluation.tasks import load_suite
    from search.checkpoints import open_checkpoint
    from search.config import load_config
    from search.merger import resolve_device
    from search.study import source_path

    if Path(target).is_file():
        cfg = load_config(target)
        models = {m.name: source_path(m.path, cfg.base_dir) for m in cfg.models}
        suite = suite or cfg.eval.suite
    else:
        models = {Path(target).name: Path(target)}
        suite = suite or "demo"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars per model: noise around the JSON or an error
    dev = resolve_device(device)
    checkpoints = {name: open_checkpoint(name, path) for name, path in models.items()}  # clear errors first
    results, evaluator = {}, None
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if evaluator is None:
            evaluator = EvalSuite(load_suite(suite), tokenizer, split, batch_size=batch_size, device=dev,
                                  system=system, chat=chat)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        _check_finite(model, checkpoints[name])  # in memory: no second read of the weights
        results[name] = evaluator.score(model).as_dict()
    primary = {t.name: t.primary_metric for t in evaluator.tasks}  # the metric each task adds to "score"
    click.echo(json.dumps({"suite": suite, "split": split, "primary_metric": primary, "models": results},
                          ensure_ascii=False, indent=2))


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--storage", help="Optuna storage URL instead of RUN_DIR.")
@click.option("--study-name", help="Study name (needed when the storage holds several).")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]), default="table", show_default=True,
              help="table: the top rows, readable at 80 columns; md, csv, json: every row and column.")
@click.option("--top", type=int, help="Only the first K rows (table default: 15).")
def leaderboard(run_dir, storage, study_name, fmt, top) -> None:
    """Print the leaderboard of a run folder or a study."""
    from search.report import leaderboard_rows, render, score_note

    if top is not None and top < 1:
        raise MergeSearchError(f"--top must be at least 1 but got {top}")
    study = _storage_args(run_dir, storage, study_name)
    rows = leaderboard_rows(study)
    if fmt == "table":
        _print_leaderboard(rows, top or 15, more="(--top K or --format md for more)")
        note = score_note(study)
        if note:
            _echo_wrapped(note.splitlines()[0])
        return
    click.echo(render(rows[:top] if top else rows, fmt, score_note(study)), nl=False)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--storage", help="Optuna storage URL instead of RUN_DIR.")
@click.option("--study-name", help="Study name (needed when the storage holds several).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The HTML file (default RUN_DIR/report.html).")
def report(run_dir, storage, study_name, output) -> None:
    """Write report.html: leaderboard, history, importances, simplex, per-task scores, timing."""
    from search.htmlreport import write_report

    if not output and not run_dir:
        raise MergeSearchError("give -o FILE.html with --storage (or a RUN_DIR to write RUN_DIR/report.html)")
    study = _storage_args(run_dir, storage, study_name)
    path = Path(output) if output else Path(run_dir) / "report.html"
    if not path.parent.is_dir():
        raise MergeSearchError(f"{path.parent}: no such folder for the report")
    write_report(study, path)
    click.echo(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB, opens offline)")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--storage", help="Optuna storage URL instead of RUN_DIR.")
@click.option("--study-name", help="Study name (needed when the storage holds several).")
@click.option("--trial", default="best", show_default=True, help="`best` or a trial number.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The mergekit YAML to write.")
def export(run_dir, storage, study_name, trial, output) -> None:
    """Write a trial's weights as a mergekit config (for mergekit-yaml)."""
    from search.export import to_yaml
    from search.report import leaderboard_trial, trial_config

    if trial != "best" and not trial.isdigit():
        raise MergeSearchError(f"--trial must be 'best' or a trial number but got {trial!r}")
    if not Path(output).parent.is_dir():
        raise MergeSearchError(f"-o {output}: {Path(output).parent}: no such folder")
    study = _storage_args(run_dir, storage, study_name)
    t = leaderboard_trial(study, trial if trial == "best" else int(trial))
    Path(output).write_text(to_yaml(trial_config(t)), encoding="utf-8")
    click.echo(f"trial {t.number} (dev score {t.user_attrs.get('dev_score', t.values[0]):.4f}) -> {output}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The model folder to create.")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard (2GB, 500MB, bytes).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where tensors are merged.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dare_* drop masks.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def merge(config, output, shard_size, device, seed, force) -> None:
    """Merge the mergekit YAML CONFIG into a new, verified model folder (streamed, atomic)."""
    from search.merger import resolve_device
    from search.writer import merge_to_folder

    manifest = merge_to_folder(config, output, shard_size=shard_size, device=str(resolve_device(device)),
                               force=force, seed=seed)
    click.echo(f"merged {manifest['tensors']} tensors -> {output}")


@main.command("methods")
def methods_cmd() -> None:
    """The registered merge methods: inputs, searched parameters with their ranges, the fixed ones."""
    from search.methods import METHODS, REQUIRED, parameter_free

    for name, spec in METHODS.items():
        n = f"{spec.min_models}+" if spec.max_models is None else (
            str(spec.min_models) if spec.min_models == spec.max_models else f"{spec.min_models}-{spec.max_models}")
        base = "first model is the base" if spec.base_is_first_model else "needs base" if spec.needs_base else "no base"
        simplex = spec.normalize_default or spec.weights_scale_free
        searched = [f"{k} {('on the simplex' if simplex else 'in weight_range') if p.search == 'weight' else list(p.search)}"
                    for k, p in {**spec.model_params, **spec.shared_params}.items() if p.search is not None]
        fixed = [f"{k}={p.default}" for k, p in {**spec.model_params, **spec.shared_params}.items()
                 if p.search is None and p.default is not REQUIRED and p.default is not None]
        single = spec.max_models is not None and spec.max_models - spec.base_row < 2
        what = ("slices only (one model, nothing to search)" if single else
                "a baseline row (nothing to search)" if parameter_free(spec) else "searches " + ", ".join(searched))
        extra = [x for x, on in (("random", spec.random), ("fused kernel", spec.kernel is not None),
                                 ("cached selection", spec.precompute is not None)) if on]
        click.echo(f"{name}: {n} inputs, {base}; {what}; fixed {', '.join(fixed) or 'none'}"
                   + (f"; {', '.join(extra)}" if extra else ""))


@main.command("demo-models")
@click.option("--out", type=click.Path(file_okay=False), help="Cache root (default $MERGE_SEARCH_CACHE or ~/.cache/merge-search).")
def demo_models(out) -> None:
    """Build (or find in the cache) the demo model family and print its folders."""
    from search.demo import ensure_demo_family

    for name, path in ensure_demo_family(Path(out) if out else None).items():
        click.echo(f"{name}\t{path}")


@main.group(cls=_Group)
def bench() -> None:
    """Performance figures measured side by side in one run (--json: one JSON object, last line)."""


@bench.command("merge")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on the last line.")
@click.option("--params", default="150M", show_default=True, help="Size of the generated bf16 sources.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed merges of each kind (median).")
@click.option("--no-mergekit", is_flag=True, help="Skip the mergekit comparisons (ours and the bound only).")
@click.option("--methods", help="Also time these merge methods in memory: 'all' or a comma list.")
def bench_merge_cmd(as_json, params, device, repeats, no_mergekit, methods) -> None:
    """Our in-memory merge vs the streaming bound, mergekit's in-memory path and mergekit-yaml; TIES; peak memory."""
    from search.bench.merge import bench_merge, report
    from search.merger import resolve_device
    from search.methods import METHODS

    wanted = None
    if methods:
        wanted = list(METHODS) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown or not wanted:
            raise MergeSearchError(f"--methods: unknown merge method {unknown[0]!r}; known: all, {', '.join(METHODS)}"
                                   if unknown else "--methods: give 'all' or a comma list of methods")
    fig = bench_merge(params=params, device=str(resolve_device(device)), repeats=repeats, mergekit=not no_mergekit,
                      methods=wanted)
    click.echo(report(fig))
    if as_json:
        click.echo(json.dumps(fig))


@bench.command("eval")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on the last line.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs of each side, interleaved (median).")
@click.option("--split", default="dev", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="torch CPU threads for both sides (default: torch's).")
@click.option("--suite-models", default="demo,150M", show_default=True,
              help="Also time one candidate on the whole zh-instruct-lite suite, per task kind, for these "
                   "models (demo: the demo family's uniform merge; a size such as 150M: a random Llama); "
                   "'' to skip.")
def bench_eval_cmd(as_json, batch_size, repeats, split, device, threads, suite_models) -> None:
    """Native EvalSuite vs lm-eval's evaluator.evaluate (same tasks, weights and batch size), and
    the time of a whole suite per candidate with the share of each task kind."""
    import torch

    from search.bench.eval import bench_eval, bench_suite, report_suite
    from search.merger import resolve_device

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        fig = bench_eval(split=split, batch_size=batch_size, repeats=repeats, device=str(resolve_device(device)))
        models = tuple(m.strip() for m in suite_models.split(",") if m.strip())
        if models:
            fig["suite_timing"] = bench_suite(split=split, models=models, batch_size=batch_size,
                                              device=str(resolve_device(device)))
            click.echo(report_suite(fig["suite_timing"]))
    finally:
        torch.set_num_threads(before)
    for task, t in fig["tasks"].items():
        click.echo(f"{task}: acc native {t['native']['acc']:.4f} lm-eval {t['lmeval']['acc']:.4f} "
                   f"(acc_norm {t['native']['acc_norm']:.4f} / {t['lmeval']['acc_norm']:.4f})")
    click.echo(f"native {fig['native_s']:.3f}s vs lm-eval {fig['lmeval_s']:.3f}s: "
               f"{fig['speedup_vs_lmeval']:.1f}x faster; acc identical: {fig['acc_identical']}")
    if as_json:
        click.echo(json.dumps(fig, ensure_ascii=False))
    if not fig["acc_identical"]:
        sys.exit(1)  # the two scorers disagree: a bug


@bench.command("search")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on the last line.")
@click.option("--seeds", type=int, help="Studies per measurement, medians over them (default 5, --quick 2).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="2 seeds, a coarse grid and short studies (a smoke test, not figures).")
def bench_search_cmd(as_json, seeds, device, quick) -> None:
    """Samplers, pruning, selection and trial overhead on the demo family, against a dense weight grid."""
    from search.bench.search import bench_search, report
    from search.merger import resolve_device

    fig = bench_search(seeds=seeds if seeds is not None else 2 if quick else 5, device=str(resolve_device(device)), quick=quick)
    click.echo(report(fig))
    if as_json:
        click.echo(json.dumps(fig))


@bench.command("learn")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on the last line.")
@click.option("--seeds", type=int, help="Seeds per space, medians over them (default 3, --quick 1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="1 seed, the global space, 3 steps (a smoke test, not figures).")
@click.option("--steps", type=int, help="Learner steps (default: study.learner's).")
@click.option("--lr", type=float, help="Learner learning rate (default: study.learner's).")
@click.option("--early-stop", type=float, help="Share of the search split held out for early stopping.")
@click.option("--params", default="150M", show_default=True, help="Size of the bench checkpoints for the step figures.")
def bench_learn_cmd(as_json, seeds, device, quick, steps, lr, early_stop, params) -> None:
    """Learned weights against the black-box search at equal wall time on the demo family, and one
    learner step's time and peak memory on the bench checkpoints."""
    from search.bench.learn import bench_learn, report
    from search.merger import resolve_device

    fig = bench_learn(seeds=seeds if seeds is not None else 1 if quick else 3, device=str(resolve_device(device)),
                      quick=quick, steps=steps, lr=lr, early_stop=early_stop, params=params)
    click.echo(report(fig))
    if as_json:
        click.echo(json.dumps(fig))


if __name__ == "__main__":
    main()
