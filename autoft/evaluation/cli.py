"""``autoft evaluate`` and ``autoft suite`` (registered by :func:`autoft.cli.main` via ``add_parser``)."""
from __future__ import annotations

import argparse
import math


def _bands(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated character counts such as 60 or 60,160, "
                                         f"got '{value}'") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive character counts, got '{value}'")
    return out


def add_parser(subparsers) -> None:
    e = subparsers.add_parser(
        "evaluate", help="per-class results, calibration, fairness and explanations of a trial or an export",
        description="Evaluate a trial of a study (refitted with its exact configuration and seed; the best by "
                    "default) or an exported folder (--model), on a split of its task or on a new labelled file "
                    "or folder (--data). Writes per_class.csv, confusion.png, reliability.png, calibration.json, "
                    "predictions.csv, fairness.csv (with a group attribute), explanations, summary.json and "
                    "report.html.")
    e.add_argument("--task", help="task of the study (name or file); with --model: the task to evaluate on "
                                  "(default: the task file recorded in the export)")
    e.add_argument("--model", help="exported folder (from 'autoft export') instead of a trial of a study")
    e.add_argument("--study", "--study-name", dest="study_name", default="default",
                   help="study name (default: default)")
    e.add_argument("--trial", type=int, help="trial number (default: the best completed trial)")
    e.add_argument("--results-dir", default="results", help="where the search wrote results (default: ./results)")
    e.add_argument("--storage", help="Optuna storage URL (default: sqlite under <results-dir>/<task>/)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split of the task to evaluate on (default: test)")
    e.add_argument("--data", help="a new labelled file (text: CSV/TSV) or folder (images: one sub-folder per class)")
    e.add_argument("--text-column", help="text column of --data (default: the task's, else 'text')")
    e.add_argument("--label-column", help="label column of --data (default: the task's, else 'label')")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--group-column", help="fairness: a column of the text table holding each example's group")
    g.add_argument("--groups", dest="groups_file", metavar="FILE",
                   help="fairness: a CSV with a 'group' column and 'path' (image files), 'text' or 'index'")
    g.add_argument("--length-bands", type=_bands, metavar="N[,N...]",
                   help="fairness: group texts by length in characters, e.g. 60 (<=60 vs >60)")
    e.add_argument("--out", help="output folder (default: results/<task>/<study>/evaluation for the best trial; "
                                 "evaluation/<model>-<split> for --model)")
    e.add_argument("--explain", type=int, default=4, metavar="K",
                   help="attributions for the K most confident right and K wrong predictions (0: none; default 4)")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the interval (default 1000)")
    e.add_argument("--bins", type=int, default=15, help="calibration bins (default 15)")
    e.add_argument("--no-calibrate", action="store_true",
                   help="do not fit temperature / threshold on the validation split")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    e.set_defaults(func=cmd_evaluate)

    s = subparsers.add_parser(
        "suite", help="run many tasks and compare backbones across them",
        description="Run every task of a suite file (a search per task, or a fixed recipe on a fixed list of "
                    "backbones) and write a backbone x task table, each backbone's mean rank and, per task, "
                    "Kendall's tau between the LogME ranking and the fine-tuned scores. Resumable: tasks whose "
                    "result file exists are skipped.")
    s.add_argument("--suite", required=True, help="suite name (built-in or ./suites/NAME.yaml) or file")
    s.add_argument("--out", help="output folder (default: results/suites/<suite name>)")
    s.add_argument("--mode", choices=["search", "fixed"], help="override the suite's mode")
    s.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    s.add_argument("--n-trials", type=int, help="search mode: trials per task (overrides the suite)")
    s.add_argument("--timeout", type=float, help="search mode: seconds per task (overrides the suite)")
    s.add_argument("--fresh", action="store_true", help="re-run tasks even when their result file exists")
    s.set_defaults(func=cmd_suite)


def _console():
    from autoft.console import make_console

    return make_console()


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def print_evaluation(console, ev) -> None:
    from rich.table import Table

    s = ev.summary
    h = s["headline"]
    console.print(f"[bold]{s.get('title', '')}[/] · {s['split']} · {s['examples']} examples")
    line = (f"{h['metric']} [bold]{_f(h['value'])}[/] (95% CI {_f(h['ci_low'])}-{_f(h['ci_high'])}, "
            f"{h['resamples']} bootstrap resamples; decision: {h['decision']})")
    if h["argmax"]["value"] != h["value"]:
        a = h["argmax"]
        line += f" · argmax {_f(a['value'])} ({_f(a['low'])}-{_f(a['high'])})"
    console.print(line)
    cal = s.get("calibration")
    if cal:
        extra = (f" · threshold P({cal['positive_class']}) >= {cal['threshold']:.4f} (tuned for {cal['metric']})"
                 if cal.get("threshold") is not None else "")
        console.print(f"calibration: temperature {cal['temperature']:.3f} · ECE {_f(s['ece']['before'])} -> "
                      f"{_f(s['ece']['after'])} ({s['ece']['bins']} bins){extra}")
    else:
        console.print(f"ECE {_f(s['ece']['before'])} ({s['ece']['bins']} bins); no calibration fitted")
    t = Table(title="Per class")
    for c in ("class", "precision", "recall", "f1", "support", "predicted"):
        t.add_column(c, justify="left" if c == "class" else "right")
    for r in s["per_class"][:40]:
        t.add_row(str(r["class"]), _f(r["precision"]), _f(r["recall"]), _f(r["f1"]), str(r["support"]),
                  str(r["predicted"]))
    console.print(t)
    f = s.get("fairness")
    if f:
        gaps = f["gaps"]
        console.print(f"fairness by {f['attribute']} ({gaps['groups']} groups, {f['backend']}): demographic parity "
                      f"difference {_f(gaps.get('demographic_parity_difference'))} · equalised odds difference "
                      f"{_f(gaps.get('equalized_odds_difference'))} · accuracy difference "
                      f"{_f(gaps.get('accuracy_difference'))}", markup=False)
        ft = Table(title=f"Per group ({f['attribute']})")
        cols = list(f["groups"][0]) if f["groups"] else []
        for c in cols:
            ft.add_column(c, justify="left" if c == "group" else "right")
        for r in f["groups"]:
            ft.add_row(*[str(r[c]) if not isinstance(r[c], float) else _f(r[c]) for c in cols])
        console.print(ft)
        for note in f.get("notes", []):
            console.print(f"note: {note}", markup=False)
    pairs = s.get("confused_pairs") or []
    if pairs:
        console.print("most confused: " + "; ".join(f"{p['true']} -> {p['predicted']} ({p['count']}x)"
                                                    for p in pairs[:5]), markup=False)
    console.print(f"wrote {ev.folder} ({', '.join(s['files'])})", markup=False)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autoft.errors import ConfigError
    from autoft.evaluation.sources import evaluate_export, evaluate_trial

    if args.n_boot < 0 or args.bins < 1 or args.explain < 0:
        raise ConfigError("--n-boot and --explain must be 0 or more, --bins at least 1", field="--n-boot")
    common = dict(split=args.split, data=args.data, text_column=args.text_column, label_column=args.label_column,
                  group_column=args.group_column, groups_file=args.groups_file, length_bands=args.length_bands,
                  out=args.out, explain=args.explain, n_boot=args.n_boot, n_bins=args.bins, seed=args.seed,
                  calibrate=not args.no_calibrate)
    if not args.task and not args.model:
        raise ConfigError("give --task (a trial of a study of that task) or --model (an exported folder)",
                          field="--task")
    console = _console()
    if args.model:
        ev = evaluate_export(args.model, task=args.task, **common)
    else:
        ev = evaluate_trial(args.task, study=args.study_name, trial=args.trial, results_dir=args.results_dir,
                            storage=args.storage, **common)
    print_evaluation(console, ev)
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from autoft.evaluation.suite import load_suite, run_suite

    suite = load_suite(args.suite)
    console = _console()
    res = run_suite(suite, out=args.out, mode=args.mode, tasks=args.tasks.split(",") if args.tasks else None,
                    n_trials=args.n_trials, timeout=args.timeout, fresh=args.fresh,
                    progress=lambda msg: console.print(msg, markup=False))
    from rich.table import Table

    t = Table(title=f"suite {suite.name}: validation score per backbone and task ({res.mode} mode)")
    t.add_column("backbone")
    for task in res.table.columns:
        t.add_column(str(task), justify="right")
    t.add_column("mean rank", justify="right")
    for bb, row in res.table.iterrows():
        t.add_row(str(bb), *[_f(v) for v in row.tolist()], _f(res.mean_rank.get(bb)))
    console.print(t)
    for task, tau in res.kendall.items():
        console.print(f"{task}: Kendall's tau (LogME vs fine-tuned) {_f(tau.get('tau'))} over "
                      f"{tau.get('backbones')} backbones (p={_f(tau.get('p_value'))})", markup=False)
    console.print(f"wrote {res.folder} ({', '.join(p.name for p in res.files)}); ran {len(res.ran)} task(s), "
                  f"skipped {len(res.skipped)} with results", markup=False)
    return 0
