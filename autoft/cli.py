"""The ``autoft`` command.  Library errors become one-paragraph messages and exit code 2;
``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import logging
import os
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
    from autoft.errors import ConfigError

    if getattr(args, "n_trials", None) is not None and args.n_trials < 1:
        raise ConfigError(f"the study's trial budget must be at least 1, got {args.n_trials}", field="--n-trials")
    if getattr(args, "timeout", None) is not None and not args.timeout > 0:  # also rejects nan
        raise ConfigError(f"expected a number of seconds above 0, got {args.timeout:g}", field="--timeout")
    if getattr(args, "n_jobs", None) is not None and args.n_jobs < 1:
        raise ConfigError(f"expected at least 1 parallel trial, got {args.n_jobs}", field="--n-jobs")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError(f"expected at least 1 torch thread, got {args.threads}", field="--threads")


def _open_study(args, task):
    import optuna

    from autoft.engines.common import SearchRequest
    from autoft.errors import ConfigError
    from autoft.study import open_storage

    req = SearchRequest(task=task, space=None, study_name=args.study_name, results_dir=Path(args.results_dir),
                        storage=args.storage)
    check_paths(req)
    storage = open_storage(req.storage_url)
    try:
        return req, optuna.load_study(study_name=args.study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study '{args.study_name}' for task '{task.name}' in {req.shown_storage}; "
                          f"run 'autoft search --task {args.task}' first (or pass --study-name / --storage)") from None


def trial_config(trial, purpose: str):
    """The trial's configuration as a TrialConfig, or None (and a warning naming the trial) when its
    ``config`` attribute does not validate (a shared study may hold one written by another version)."""
    from autoft.core.config import TrialConfig
    from autoft.engines.common import ATTR_CONFIG
    from autoft.study.storage import warn_malformed

    doc = trial.user_attrs.get(ATTR_CONFIG)
    try:
        return TrialConfig(**doc)
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warn_malformed(trial.number, ATTR_CONFIG, doc, f"it does not validate ({reason[:200]}): {purpose}")
        return None


class ProgressView:
    """A live line on the terminal: trials done / pruned / failed, best so far, elapsed."""

    def __init__(self, total: int, already: int, metric: str, direction: str, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.metric, self.direction = metric, direction
        self.progress = Progress(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                                 transient=False, disable=not console.is_terminal and os.environ.get("AUTOFT_PROGRESS") != "1")
        self.task_id = self.progress.add_task("", total=total, completed=already)
        self.console, self.total = console, total
        self.ran = self.surplus = 0  # trials this process ran / found the budget already taken for

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, study, trial) -> None:
        from autoft.results.tables import best_trial, state_counts, trial_origin

        if trial.user_attrs.get("surplus"):  # never ran: the budget was taken by other processes
            self.surplus += 1
            return
        self.ran += 1
        c = state_counts(study.get_trials(deepcopy=False))
        bt = best_trial(study)
        bcfg = bt.user_attrs.get("config") if bt else None
        bb = (bcfg if isinstance(bcfg, dict) else bt.params).get("backbone", "?") if bt else None
        best = f"best {self.metric} {bt.value:.4f} (#{bt.number}, {bb})" if bt else "no result yet"
        self.progress.update(self.task_id, completed=c["complete"] + c["pruned"] + c["fail"],
                             description=f"{c['complete']} complete · {c['pruned']} pruned · {c['fail']} failed · {best}")
        if self.progress.disable:  # not a terminal (CI log, file, pipe): one plain line per trial
            state = trial.state.name.lower()
            val = f"{trial.value:.4f}" if trial.value is not None else "-"
            epochs = len(trial.intermediate_values)
            cfg = trial.user_attrs.get("config")
            cfg = cfg if isinstance(cfg, dict) else trial.params
            origin = trial_origin(trial)
            note = {"sampler": "", "first trial": " (first trial: a first_trials recipe of the search space)"}.get(origin, f" ({origin})")
            self.console.print(f"trial {trial.number} {state}{note}: {self.metric} {val} after {epochs} "
                               f"epoch{'s' if epochs != 1 else ''} ({cfg.get('backbone', '?')}, unfreeze "
                               f"{cfg.get('unfreeze', '?')} stages) · {c['complete'] + c['pruned'] + c['fail']}/"
                               f"{self.total} done: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} "
                               f"failed · {best}", soft_wrap=True)


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
    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.engines.common import build_request, parse_overrides
    from autoft.errors import AutoftError
    from autoft.results import write_report
    from autoft.results.tables import best_trial, most_common_failure, state_counts
    from autoft.study import open_storage

    check_budget_options(args)
    task, _ = _task_and_study(args)
    req = build_request(task, space_path=args.space, overrides=parse_overrides(args.set),
                        backbones=args.backbones.split(",") if args.backbones else None,
                        study_name=args.study_name, results_dir=Path(args.results_dir), storage=args.storage,
                        n_trials=args.n_trials, timeout=args.timeout, n_jobs=args.n_jobs, pruner=args.pruner,
                        extend=args.extend)
    check_paths(req)
    storage = open_storage(req.storage_url)  # a storage that cannot be opened fails now, not after the data is read
    console = _console()
    task_data = task.prepare()
    sizes = task_data.splits.sizes()
    console.print(f"[bold]autoft search[/] task [cyan]{task.name}[/] · {len(task_data.data)} examples "
                  f"(train {sizes['train']}, val {sizes['val']}, test {sizes['test']}) · "
                  f"{task_data.data.num_classes} classes · metric {task.metric} · backbones "
                  f"{', '.join(req.space.backbones)}")
    console.print(f"study '{req.study_name}' in {req.shown_storage} · budget {req.budget} trials"
                  + (f", timeout {req.timeout:g}s" if req.timeout else "") + f" · pruner {req.pruner or task.pruner}")
    if args.backend == "ray":
        from autoft.engines.ray_engine import run_ray

        study = run_ray(req, task_data=task_data, address=args.address, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                        rank=False if args.no_rank else None)
        cache = FeatureCache()
        interrupted = False  # Ray Tune handles Ctrl-C itself: it saves the experiment (same command resumes)
        view = None
    else:
        from autoft.engines.optuna_engine import count_finished, create_study, run_study

        cache = FeatureCache()
        study = create_study(req, storage=storage, n_train=len(task_data.splits.train))
        already = count_finished(study)
        total = req.budget + (already if req.extend else 0)
        if already:
            console.print(f"resuming: {already} finished trial(s) already in the study")
        t0 = time.perf_counter()
        interrupted = False
        with ProgressView(total, min(already, total), task.metric, task.direction, console) as view:
            try:
                run_study(req, task_data=task_data, callbacks=[view], cache=cache,
                          rank=False if args.no_rank else None, study=study)
            except KeyboardInterrupt:
                interrupted = True
        console.print(f"search took {time.perf_counter() - t0:.1f}s")
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    bt = best_trial(study)
    test_metrics = None
    if bt is not None and not args.no_final_check and not (args.backend != "ray" and interrupted):
        cfg = trial_config(bt, "the final check is skipped")
        if cfg is not None:
            console.print(f"final check: re-fitting trial #{bt.number} and scoring it once on the untouched test split")
            res = fine_tune_and_score(cfg, task_data, cache=cache, test=True)
            test_metrics = res.test_metrics
    rep = write_report(study, task, req.study_dir, test_metrics=test_metrics, space_file=req.space.file,
                       root=req.results_dir)
    console.print(f"{counts['complete']} complete · {counts['pruned']} pruned · {counts['fail']} failed "
                  f"(of {sum(counts.values())} trials in the study)")
    if bt is None and view is not None and not interrupted and view.ran == 0 and counts["fail"] == 0 \
            and (counts["running"] or view.surplus):
        # another process started on the study at the same time and holds its whole budget: nothing failed
        held = (f"{counts['running']} trial(s) of study '{req.study_name}' run in other processes" if counts["running"]
                else f"other processes hold the budget of study '{req.study_name}'")
        console.print(f"the budget was taken by another process: {held} and none is left for this one; nothing "
                      "ran or failed here. When they end, 'autoft report' (same --task, --study-name, --storage) "
                      "writes the results")
        console.print(f"results: {req.study_dir}")
        return 0
    if bt is None:
        common = most_common_failure(trials)
        reason = f"; most common failure ({common[1]}x): {common[0]}" if common else ""
        console.print(f"[red]no trial completed[/]{reason}")
        console.print(f"results: {req.study_dir}")
        if interrupted:
            return EXIT_INTERRUPTED
        raise AutoftError(f"every trial of study '{req.study_name}' failed{reason}")
    best_cfg = bt.user_attrs.get("config")
    best_cfg = best_cfg if isinstance(best_cfg, dict) else bt.params
    console.print(f"best: trial #{bt.number} · {best_cfg.get('backbone', '?')} · unfreeze "
                  f"{best_cfg.get('unfreeze', '?')} · validation {task.metric} [bold]{bt.value:.4f}[/]")
    if test_metrics:
        shown = [task.metric] + [m for m in ("accuracy", "f1_macro") if m != task.metric]
        console.print("test (held out, scored once): " + " · ".join(
            f"{m} [bold]{test_metrics[m]:.4f}[/]" if m == task.metric else f"{m} {test_metrics[m]:.4f}" for m in shown))
    console.print(f"results: {req.study_dir} ({', '.join(p.name for p in rep.files)})")
    if interrupted:
        console.print("[yellow]interrupted[/]: finished trials are kept; run the same command to resume")
        return EXIT_INTERRUPTED
    return 0


def cmd_report(args) -> int:
    from autoft.results import write_report

    task, _ = _task_and_study(args)
    req, study = _open_study(args, task)
    rep = write_report(study, task, req.study_dir, root=req.results_dir)
    _console().print(f"wrote {', '.join(str(p) for p in rep.files)}")
    return 0


def cmd_show(args) -> int:
    from autoft.engines.common import ATTR_RANKING
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
                            "cfg_batch_size", "epochs_run", "seconds"] if c in done.columns]
        _print_table(console, done[cols], f"Top {min(args.top, len(done))} trials", args.top)
    return 0


def cmd_backbones(args) -> int:
    import pandas as pd

    from autoft.zoo import list_backbones

    rows = []
    for spec in list_backbones():
        try:
            bb = spec.build(pretrained=False)
            rows.append({"name": spec.name, "family": spec.family, "modality": spec.modality,
                         "stages": bb.num_stages, "feature_dim": bb.feature_dim,
                         "params_M": round(sum(p.numel() for p in bb.parameters()) / 1e6, 2),
                         "weights_local": "yes" if spec.available() else "no", "description": spec.description})
        except Exception as exc:
            rows.append({"name": spec.name, "family": spec.family, "modality": spec.modality, "stages": None,
                         "feature_dim": None, "params_M": None, "weights_local": "no",
                         "description": f"unavailable: {exc}"})
    df = pd.DataFrame(rows)
    if args.json:
        print(df.to_json(orient="records", indent=1))
    else:
        _print_table(_console(), df, "Backbone zoo", max_rows=1000)
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
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.add_argument("--n-jobs", type=int, default=1, help="parallel trials in this process (threads)")
    s.add_argument("--pruner", choices=["hyperband", "median", "successive_halving", "none"])
    s.add_argument("--extend", action="store_true", help="add --n-trials more trials to a finished study")
    s.add_argument("--no-final-check", action="store_true", help="skip scoring the winner on the test split")
    s.add_argument("--no-rank", action="store_true",
                   help="do not rank the backbones (LogME) nor start with the search space's first_trials")
    s.add_argument("--backend", choices=["optuna", "ray"], default="optuna")
    s.add_argument("--address", help="ray: cluster address (auto or HOST:PORT); default starts a local Ray")
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0)
    s.add_argument("--max-concurrent", type=int, default=None)
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("report", help="(re)write results files of a study")
    study_args(r)
    r.set_defaults(func=cmd_report)

    sh = sub.add_parser("show", help="print the leaderboard and best trials of a study")
    study_args(sh)
    sh.add_argument("--top", type=int, default=10)
    sh.set_defaults(func=cmd_show)

    b = sub.add_parser("backbones", help="list the backbone zoo")
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

    for mod in ("autoft.export.cli", "autoft.engines.worker_cli", "autoft.rank_cli"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        if m.add_parser not in _EXTRA_COMMANDS:  # main() may run many times in one process (tests)
            _EXTRA_COMMANDS.append(m.add_parser)


def main(argv: list[str] | None = None) -> int:
    _register_optional()
    args = build_parser().parse_args(argv)
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
