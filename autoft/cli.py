"""The ``autoft`` command.  Library errors become one-paragraph messages and exit code 2;
``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
log = logging.getLogger("autoft")


# --------------------------------------------------------------------------------------------
# helpers
def _console():
    from autoft.console import make_console

    return make_console()


def _task_and_study(args):
    """The task of ``--task`` and the study name, both checked: they become folders under the results folder."""
    from autoft.study import validate_name
    from autoft.task import load_task

    validate_name(args.study_name, "--study-name")
    task = load_task(args.task)
    validate_name(task.name, "name", file=task.file)  # checked here too: it names a folder (no '.', '..', '/')
    return task, args.study_name


def check_paths(req) -> None:
    """Every folder the study writes to resolves under the results folder (no link leads out of it)."""
    from autoft.study import ensure_inside

    ensure_inside(req.results_dir / req.task.name / req.study_name, req.results_dir, "--study-name")
    if not req.storage:
        ensure_inside(req.results_dir / req.task.name / "optuna.db", req.results_dir, "--storage")


def check_budget_options(args) -> None:
    """``--n-trials``, ``--timeout``, ``--n-jobs`` and ``--threads`` as the task file checks its budget."""
    from autoft.api import validate_budget_options

    validate_budget_options(n_trials=getattr(args, "n_trials", None), timeout=getattr(args, "timeout", None),
                            n_jobs=getattr(args, "n_jobs", None), threads=getattr(args, "threads", None))


def _open_study(args, task):
    from autoft.study import StudyLocation

    loc = StudyLocation(task.name, args.study_name, Path(args.results_dir), args.storage, task_file=task.file)
    return loc, loc.load()


def _print_table(console, df, title: str, max_rows: int = 20):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in df.columns:
        table.add_column(str(c), justify="right" if df[c].dtype.kind in "if" else "left")
    for _, row in df.head(max_rows).iterrows():
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)


def _fmt(v) -> str:
    import math

    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


# --------------------------------------------------------------------------------------------
# commands
def cmd_search(args) -> int:
    """``autoft search``: parse, call :func:`autoft.api.search`, print. The use case lives in the API."""
    from autoft.api import NoTrialCompleted, search
    from autoft.console import SearchProgress, time_summary
    from autoft.engines.base import parse_overrides

    check_budget_options(args)
    task, _ = _task_and_study(args)
    if args.device:  # one device for the whole command: ranking, trials, finalists, final check, evaluation
        from autoft.core.device import resolve_device

        task = task.model_copy(update={"device": resolve_device(args.device)})  # a device that is not there: error
    console = _console()
    view = SearchProgress(console, timeout_mode=args.timeout_mode or task.budget.timeout_mode)
    try:
        r = search(task, space=args.space, overrides=parse_overrides(args.set),
                   backbones=args.backbones.split(",") if args.backbones else None, study_name=args.study_name,
                   results_dir=Path(args.results_dir), storage=args.storage, n_trials=args.n_trials,
                   timeout=args.timeout, timeout_mode=args.timeout_mode, n_jobs=args.n_jobs, pruner=args.pruner,
                   extend=args.extend, objectives=args.objectives,
                   backend=args.backend, address=args.address, cpus_per_trial=args.cpus_per_trial,
                   gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, rank=not args.no_rank,
                   final_check=not args.no_final_check, export=args.export, track=args.track,
                   callbacks=[view, _FinalistLines(console)],
                   started=getattr(args, "started", None),  # the time budget counts the whole command
                   evaluate=not args.no_evaluate, finalists=args.finalists,
                   finalist_seeds=args.finalist_seeds, finalist_mode=args.finalist_mode)
    except NoTrialCompleted as exc:
        view.close()
        console.print(time_summary(exc.result), soft_wrap=True)
        _summary(console, exc.result)
        raise
    finally:
        view.close()
    console.print(time_summary(r), soft_wrap=True)
    if r.final_check_skipped:
        from rich.markup import escape

        console.print(f"[yellow]{escape(r.final_check_skipped)}[/]", soft_wrap=True)
    _print_finalists(console, r)
    _summary(console, r)
    if r.budget_taken:
        console.print(f"the budget was taken by another process: other processes hold the budget of study "
                      f"'{r.study.study_name}' and none is left for this one; nothing ran or failed here. When "
                      "they end, 'autoft report' (same --task, --study-name, --storage) writes the results")
        return 0
    if r.interrupted:
        console.print("[yellow]interrupted[/]: finished trials are kept; run the same command to resume")
        return EXIT_INTERRUPTED
    return 0


class _FinalistLines:
    """Prints each finalist re-run as it ends (a search callback; autoft.study.finalists.FinalistRun)."""

    def __init__(self, console):
        self.console = console

    def on_finalist(self, e) -> None:
        if e.score is not None or e.error:
            from rich.markup import escape

            self.console.print(escape(e.line()), soft_wrap=True)


def _print_finalists(console, r) -> None:
    from rich.markup import escape

    if r.finalists_skipped:
        console.print(f"[yellow]{escape(r.finalists_skipped)}[/]", soft_wrap=True)
    if r.finalists:
        from autoft.results.finalists import finalists_lines

        for line in finalists_lines(r.finalists):
            console.print(escape(line), soft_wrap=True)


def _summary(console, r) -> None:
    c = r.counts
    console.print(f"{c['complete']} complete · {c['pruned']} pruned · {c['fail']} failed "
                  f"(of {sum(c.values())} trials in the study)")
    metric = r.task.metric
    if r.best_trial is None:
        if c["fail"]:
            from autoft.results.tables import most_common_failure

            common = most_common_failure(r.study.get_trials(deepcopy=False))
            console.print("[red]no trial completed[/]" + (f"; most common failure ({common[1]}x): {common[0]}"
                                                         if common else ""))
    else:
        cfg = r.best_config or {}
        console.print(f"best: trial #{r.best_trial.number} · {cfg.get('backbone', '?')} · unfreeze "
                      f"{cfg.get('unfreeze', '?')} · validation {metric} [bold]{r.best_value:.4f}[/]")
    if r.test_metrics:
        shown = [metric] + [m for m in ("accuracy", "f1_macro") if m != metric and m in r.test_metrics]
        console.print("test (held out, scored once): " + " · ".join(
            f"{m} [bold]{r.test_metrics[m]:.4f}[/]" if m == metric else f"{m} {r.test_metrics[m]:.4f}"
            for m in shown if m in r.test_metrics))
    _print_pareto(console, r)
    if r.export_dir is not None:
        console.print(f"exported the winner to {r.export_dir}")
    console.print(f"results: {r.results_dir}" + (f" ({', '.join(p.name for p in r.files)})" if r.files else ""))


def _print_pareto(console, r) -> None:
    """The Pareto set of metric vs latency: every member of a multi-objective study, else one line."""
    try:
        front = r.pareto()
    except Exception as exc:  # noqa: BLE001 - the summary must not cost the user the search
        log.debug("no Pareto set: %s", exc)
        return
    if front.empty:
        return
    if len(r.study.directions) > 1:
        from autoft.results.pareto import LATENCY_LABELS, latency_column

        lat = latency_column(r.study)
        _print_table(console, front, f"Pareto set: validation {r.task.metric} vs {LATENCY_LABELS.get(lat, lat)}")
        console.print("the winner below is its most accurate member; export another with 'autoft export --trial N'")
    else:
        console.print(f"Pareto set of {r.task.metric} vs CPU latency (batch 1): trials "
                      + ", ".join(f"#{int(n)} ({lat:.2f} ms)" for n, lat in zip(front.number, front.latency_cpu_b1_ms))
                      + " (pareto.csv)")


def cmd_report(args) -> int:
    from autoft.results import write_report

    task, _ = _task_and_study(args)
    req, study = _open_study(args, task)
    rep = write_report(study, task, req.study_dir, root=req.results_dir)
    _console().print(f"wrote {', '.join(str(p) for p in rep.files)}")
    return 0


def cmd_show(args) -> int:
    from autoft.study.record import ATTR_RANKING
    from autoft.results.tables import leaderboard, state_counts, trials_table

    task, _ = _task_and_study(args)
    req, study = _open_study(args, task)
    trials = study.get_trials(deepcopy=False)
    df = trials_table(trials)
    console = _console()
    c = state_counts(trials)
    console.print(f"task {task.name} · study {study.study_name} · {len(trials)} trials: {c['complete']} complete, "
                  f"{c['pruned']} pruned, {c['fail']} failed")
    _print_table(console, leaderboard(df, task.direction, study.user_attrs.get(ATTR_RANKING)),
                 f"Leaderboard ({task.metric}, validation)")
    if not df.empty:
        done = df[df.state == "complete"].sort_values("score", ascending=task.direction != "maximize")
        cols = [c for c in ["number", "score", "backbone", "unfreeze", "cfg_lr", "cfg_head", "cfg_optimizer",
                            "cfg_batch_size", "epochs_run", "seconds", "latency_cpu_b1_ms"] if c in done.columns]
        _print_table(console, done[cols], f"Top {min(args.top, len(done))} trials", args.top)
    return 0


def cmd_backbones(args) -> int:
    """The zoo from its records (no network is built): stages, width, parameters, weights present?"""
    import pandas as pd

    from autoft.zoo import describe_backbones, zoo_files

    df = pd.DataFrame(describe_backbones(args.names or None, family=args.family))
    if args.json:
        print(df.to_json(orient="records", indent=1))
        return 0
    console = _console()
    _print_table(console, df.drop(columns=[c for c in ("weights",) if c in df.columns and not args.verbose_weights]),
                 "Backbone zoo", max_rows=1000)
    files = zoo_files()
    console.print("zoo files: " + (", ".join(str(f) for f in files) if files else
                                   "none (declare your own checkpoints in ./zoo.yaml or $AUTOFT_ZOO)"))
    return 0


def cmd_train(args) -> int:
    """Re-run one configuration (for example best.yaml) and print its scores."""
    import yaml

    from autoft.core import TrialConfig, fine_tune_and_score
    from autoft.task import load_task, read_yaml

    doc = read_yaml(Path(args.config), "configuration")
    cfg_doc = doc.get("config", doc)
    task = load_task(args.task or doc.get("task_file") or doc.get("task"))
    cfg = TrialConfig(**cfg_doc)
    res = fine_tune_and_score(cfg, task.prepare(), test=args.test)
    out = {"validation_score": res.score, "metric": task.metric, "validation_metrics": res.metrics,
           "epochs_run": res.epochs_run, "seconds": round(res.seconds, 2)}
    if res.test_metrics:
        out["test_metrics"] = res.test_metrics
    print(yaml.safe_dump(out, sort_keys=False))
    return 0


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoft", description="Auto-fine-tuning search over pretrained backbones.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_args(sp):
        sp.add_argument("--task", required=True, help="task name (tasks/NAME.yaml or built-in) or path")
        sp.add_argument("--study-name", default="default", help="study name (default: default)")
        sp.add_argument("--storage", help="Optuna storage URL (default: sqlite under results/<task>/)")
        sp.add_argument("--results-dir", default="results", help="where results go (default: ./results)")

    s = sub.add_parser("search", help="run (or resume) a search on a task")
    study_args(s)
    s.add_argument("--space", help="search space name or file (default: the task's search_space)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix one parameter")
    s.add_argument("--backbones", help="comma-separated backbones to search (replaces the space's list)")
    s.add_argument("--n-trials", type=int, help="total trial budget of the study (default: the task's)")
    s.add_argument("--timeout", type=float,
                   help="time budget in seconds (default: the task's budget.timeout); see --timeout-mode")
    s.add_argument("--timeout-mode", choices=["command", "trials"],
                   help="command (default): the timeout bounds the whole command: ranking, trials and final check "
                        "are planned inside it, a trial running at the deadline stops at an epoch boundary; "
                        "trials: no new trial starts after the timeout (running trials and the final check run "
                        "to their end). Default: the task's budget.timeout_mode")
    s.add_argument("--n-jobs", type=int, default=1, help="parallel trials in this process (threads)")
    s.add_argument("--device", metavar="DEVICE",
                   help="cpu, auto (the first CUDA GPU, else MPS, else the CPU), cuda, cuda:N or mps; replaces the "
                        "task's device for the whole command. Default: the task's device")
    s.add_argument("--pruner", choices=["hyperband", "median", "successive_halving", "none"])
    s.add_argument("--objectives", metavar="LIST",
                   help="accuracy (default: the task's metric alone) or accuracy,latency: a multi-objective study "
                        "of the metric and the model's CPU latency at batch 1 (latency_cpu_b64, latency_gpu_b1, "
                        "latency_gpu_b64 name the others); its trials are not pruned; the final check and --export "
                        "take the most accurate member of the Pareto set. Default: the task's objectives")
    s.add_argument("--extend", action="store_true", help="add --n-trials more trials to a finished study")
    s.add_argument("--no-final-check", action="store_true", help="skip scoring the winner on the test split")
    s.add_argument("--no-evaluate", action="store_true",
                   help="do not write the winner's evaluation (evaluation/) and report.html after the final check")
    s.add_argument("--no-rank", action="store_true",
                   help="do not rank the backbones (LogME) nor start with the search space's first_trials")
    s.add_argument("--backend", choices=["optuna", "ray"], default="optuna")
    s.add_argument("--address", help="ray: cluster address (auto or HOST:PORT); default starts a local Ray")
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0)
    s.add_argument("--max-concurrent", type=int, default=None)
    s.add_argument("--export", metavar="DIR", help="export the winner to DIR (its refit is the final check)")
    s.add_argument("--track", metavar="URI", help="record the search in MLflow at URI (default: the task's 'track')")
    s.add_argument("--finalists", type=int, metavar="K",
                   help="re-run the K best distinct configurations before choosing the winner by their mean "
                        "(0: off; default: the task's budget.finalists, 3)")
    s.add_argument("--finalist-seeds", type=int, metavar="S",
                   help="folds per finalist (cv), or seeds: its own + S-1 more (--finalist-mode seeds); default: the "
                        "task's budget.finalist_seeds, 3")
    s.add_argument("--finalist-mode", choices=["seeds", "cv"],
                   help="cv (default: the task's budget.finalist_mode): stratified folds of train+validation at "
                        "the search's split sizes; seeds: re-run with more seeds")
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("report", help="(re)write results files of a study")
    study_args(r)
    r.set_defaults(func=cmd_report)

    sh = sub.add_parser("show", help="print the leaderboard and best trials of a study")
    study_args(sh)
    sh.add_argument("--top", type=int, default=10)
    sh.set_defaults(func=cmd_show)

    b = sub.add_parser("backbones", help="list the backbone zoo (no network is built)")
    b.add_argument("names", nargs="*", help="only these backbones (e.g. resnet50 timm:convnext_atto)")
    b.add_argument("--family", help="only this family (cifar_resnet, torchvision, timm, hf_text, local)")
    b.add_argument("--weights", dest="verbose_weights", action="store_true", help="show where weights come from")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backbones)

    t = sub.add_parser("train", help="re-run one configuration (e.g. results/.../best.yaml)")
    t.add_argument("--config", required=True)
    t.add_argument("--task", help="task (default: the one recorded in the config file)")
    t.add_argument("--test", action="store_true", help="also score on the test split")
    t.set_defaults(func=cmd_train)

    for hook in _EXTRA_COMMANDS:
        hook(sub)
    return p


_EXTRA_COMMANDS: list = []  # other modules (export, worker, rank) register their sub-commands here


def _register_optional() -> None:
    import importlib

    for mod in ("autoft.export.cli", "autoft.engines.worker_cli", "autoft.rank_cli", "autoft.evaluation.cli"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        if m.add_parser not in _EXTRA_COMMANDS:  # main() may run many times in one process (tests)
            _EXTRA_COMMANDS.append(m.add_parser)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # a search's time budget counts from here
    _register_optional()
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("autoft").setLevel(logging.INFO if args.verbose else logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING if args.verbose else optuna.logging.ERROR)
    from autoft.errors import AutoftError

    try:
        return args.func(args)
    except AutoftError as exc:
        if args.debug:
            raise
        print(f"autoft: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("autoft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # python -m autoft.cli
    sys.exit(main())
