"""``autoft rank --task NAME``: rank the backbones of a task's search space before training."""
from __future__ import annotations

import json
import time


def cmd_rank(args) -> int:
    from rich.table import Table

    from autoft.console import make_console
    from autoft.core import FeatureCache
    from autoft.engines.base import build_request
    from autoft.rank import rank_backbones
    from autoft.task import load_task

    task = load_task(args.task)
    req = build_request(task, space_path=args.space,
                        backbones=args.backbones.split(",") if args.backbones else None)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    console = make_console()
    t0 = time.perf_counter()
    task_data = task.prepare()
    cache = FeatureCache(disk=False if args.no_disk_cache else None)
    scores = rank_backbones(task_data, req.space.backbones, cache, methods=methods, knn_k=args.k)
    total = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"task": task.name, "methods": list(methods), "seconds": round(total, 3),
                          "ranking": [s.to_dict() for s in scores]}, indent=1))
        return 0
    table = Table(title=f"Backbone ranking for task {task.name} (frozen features of the train split)")
    table.add_column("rank", justify="right")
    table.add_column("backbone")
    if "logme" in methods:
        table.add_column("LogME", justify="right")
    if "knn" in methods:
        table.add_column(f"kNN-{args.k} acc", justify="right")
    table.add_column("examples", justify="right")
    table.add_column("dim", justify="right")
    table.add_column("seconds", justify="right")
    for i, s in enumerate(scores, 1):
        row = [str(i), s.backbone]
        if "logme" in methods:
            row.append("-" if s.logme is None else f"{s.logme:.4f}")
        if "knn" in methods:
            row.append("-" if s.knn is None else f"{s.knn:.4f}")
        row += [str(s.examples), str(s.feature_dim), f"{s.seconds:.2f}"]
        if s.error:
            row[1] += f" [red](unavailable: {s.error[:80]})[/]"
        table.add_row(*row)
    console.print(table)
    console.print(f"ranked {len(scores)} backbone(s) in {total:.1f}s (data loading included; features are "
                  f"cached, so head-only trials and the next ranking reuse them). The ranking is advisory: "
                  f"fine-tuned validation scores decide.")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("rank", help="rank a task's backbones by transferability (LogME) before training")
    p.add_argument("--task", required=True, help="task name (tasks/NAME.yaml or built-in) or path")
    p.add_argument("--space", help="search space name or file (default: the task's search_space)")
    p.add_argument("--backbones", help="comma-separated backbones (default: those of the search space)")
    p.add_argument("--methods", default="logme,knn", help="comma-separated: logme, knn (default: both)")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN probe (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-disk-cache", action="store_true", help="do not read or write the on-disk feature cache")
    p.set_defaults(func=cmd_rank)
