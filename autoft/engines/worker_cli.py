"""``autoft worker``: one of many processes cooperating on one study through a shared storage.

Start as many workers as you like, on one machine or many, with the same task, study name,
storage and search options::

    autoft worker --task digits --storage postgresql://user@db-host/autoft --study-name sweep1 --threads 1

Each worker runs :func:`autoft.engines.optuna_engine.run_study` on the shared study: it asks the
study's sampler for a configuration, fine-tunes it, reports every epoch (the study's pruner stops
poor trials) and records the result.  Workers stop together once the study has ``--n-trials``
finished trials in total (the budget is claimed slot by slot in the storage, so concurrent workers
never overshoot it).  With an RDB storage (PostgreSQL, MySQL) every running trial sends a heartbeat;
a trial whose worker dies is marked failed by the next worker that starts a trial and run again
once.  A journal file (``journal:/shared/path/study.log``) needs no server: use it for the workers
of one host (or a shared file system with working file locks).

Registered by :func:`autoft.cli.main` through :func:`add_parser`.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    w = subparsers.add_parser(
        "worker", help="run trials of a shared study (start several: one study, many processes or machines)",
        description="Join the study --study-name in --storage and run its trials until the study as a whole has "
                    "--n-trials finished trials.  Start any number of workers with the same options, on one or "
                    "many machines: PostgreSQL (postgresql://user:password@host:5432/db) for a cluster, a "
                    "journal file (journal:/path/study.log) for the workers of one host.")
    w.add_argument("--task", required=True, help="task name (tasks/NAME.yaml or built-in) or path")
    w.add_argument("--storage", required=True,
                   help="shared Optuna storage: postgresql://... (RDB, with heartbeats) or journal:/path/file.log")
    w.add_argument("--study-name", required=True, help="the study all workers share")
    w.add_argument("--n-trials", type=int, help="total trial budget of the study, across all workers "
                                                "(default: the task's; give every worker the same value)")
    w.add_argument("--threads", type=int, help="torch threads in this worker (1 when several workers share "
                                               "a machine's cores; default: torch's choice)")
    w.add_argument("--timeout", type=float, help="this worker starts no new trial after this many seconds")
    w.add_argument("--space", help="search space name or file (default: the task's search_space)")
    w.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix one parameter")
    w.add_argument("--backbones", help="comma-separated backbones to search (replaces the space's list)")
    w.add_argument("--pruner", choices=["hyperband", "median", "successive_halving", "none"])
    w.add_argument("--results-dir", default="results", help="where --report writes (default: ./results)")
    w.add_argument("--report", action="store_true",
                   help="when the study is done, write results/<task>/<study>/ (trials.csv, best.yaml, plots)")
    w.set_defaults(func=cmd_worker)


def worker_seed(task_seed: int) -> int:
    """A sampler seed of its own for this process: workers seeded alike would propose the same
    configurations (the random start-up trials in particular)."""
    return zlib.crc32(f"{task_seed}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}".encode()) & 0x7FFFFFFF


def cmd_worker(args: argparse.Namespace) -> int:
    from autoft.cli import _task_and_study, check_budget_options, check_paths
    from autoft.console import make_console
    from autoft.core import FeatureCache
    from autoft.core.device import resolve_device
    from autoft.engines.base import Execution, build_request, parse_overrides
    from autoft.engines.optuna_engine import create_study, run_study
    from autoft.study import open_storage
    from autoft.study.budget import count_finished, worker_id
    from autoft.study.record import ATTR_SURPLUS, metric_value, trial_origin

    check_budget_options(args)  # --n-trials, --timeout, --threads
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    task, _ = _task_and_study(args)
    req = build_request(task, space_path=args.space, overrides=parse_overrides(args.set),
                        backbones=args.backbones.split(",") if args.backbones else None,
                        study_name=args.study_name, results_dir=Path(args.results_dir), storage=args.storage,
                        n_trials=args.n_trials, timeout=args.timeout, pruner=args.pruner,
                        execution=Execution(device=resolve_device(task.device), n_jobs=1, shared=True))
    check_paths(req)
    storage = open_storage(req.storage_url)  # fails now (URL redacted) if it cannot be opened
    # the trials keep the task's seed (req.fixed); only this worker's sampler gets a seed of its own
    req.task = task.model_copy(update={"seed": worker_seed(task.seed)})
    console = make_console()
    me = worker_id()
    task_data = task.prepare(device=req.execution.device)
    console.print(f"[bold]autoft worker[/] {me} · task [cyan]{task.name}[/] · study '{req.study_name}' in "
                  f"{req.shown_storage} · budget {req.budget} trials (whole study) · "
                  f"torch threads {_threads()}")
    mine: list[int] = []

    def progress(study, trial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS):
            return
        mine.append(trial.number)
        value = metric_value(trial)  # trial.value raises in a multi-objective study
        val = f"{value:.4f}" if value is not None else "-"
        origin = trial_origin(trial)
        console.print(f"{me} · trial #{trial.number} {trial.state.name.lower()} ({val})"
                      f"{'' if origin == 'sampler' else ' · ' + origin} · study "
                      f"{count_finished(study)}/{req.budget}")

    t0 = time.perf_counter()
    study = run_study(req, task_data=task_data, callbacks=[progress], cache=FeatureCache(),
                      study=create_study(req, storage=storage, n_train=len(task_data.splits.train)))
    done = count_finished(study)
    console.print(f"{me} ran {len(mine)} trial(s) in {time.perf_counter() - t0:.1f}s; study '{req.study_name}' "
                  f"has {done}/{req.budget} finished trials")
    if args.report and done >= req.budget:
        from autoft.results import write_report

        try:
            rep = write_report(study, task, req.study_dir, space_file=req.space.file, root=req.results_dir)
        except OSError as exc:  # another worker finishing at the same moment writes the same files
            log.warning("could not write the report (%s); 'autoft report' writes it again", exc)
        else:
            console.print(f"results: {req.study_dir} ({', '.join(p.name for p in rep.files)})")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()
