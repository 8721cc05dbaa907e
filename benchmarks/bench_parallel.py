"""Throughput of parallel trials: 1 vs 2 workers, one torch thread per trial, for both scaling paths.

* optuna: N ``autoft worker`` processes on one shared storage (a journal file by default,
  ``--postgres`` for a throw-away PostgreSQL server on loopback, as tests/pg.py starts it);
* ray: the Ray backend as ``autoft search --backend ray --max-concurrent N`` runs it (a local Ray
  instance, one CPU per trial).

Every run evaluates the same fixed list of configurations (resnet20 on digits, shallow fine-tuning of
the last 1 or 2 stages, 3 epochs, no pruning), queued before the run, so the work is identical.
Throughput = trials / span, where span runs from the first trial's start to the last trial's end
(process start-up, imports and Ray's start are reported separately as ``wall``).

    python benchmarks/bench_parallel.py            # writes benchmarks/out/bench_parallel.{json,md}
    python benchmarks/bench_parallel.py --postgres --repeat 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
# absolute: workers run in a temporary folder
os.environ["AUTOFT_HOME"] = str(Path(os.environ.get("AUTOFT_HOME") or ROOT.parent / "shared" / "assets").resolve())

# everything but unfreeze, lr and batch_size is fixed; the 8 configurations vary those three
FIXED = {"epochs": 3, "head": "linear", "optimizer": "adamw", "head_lr_mult": 10.0, "weight_decay": 1e-4,
         "label_smoothing": 0.0, "warmup": 0.0}
CONFIGS = [{"unfreeze": u, "lr": lr, "batch_size": bs}
           for u, lr, bs in itertools.product([1, 2], [1e-3, 3e-3], [64, 128])]
SETS = [x for k, v in FIXED.items() for x in ("--set", f"{k}={v}")]
COMMON = ["--task", "digits", "--backbones", "resnet20", "--pruner", "none", *SETS]


def request(results: Path, study: str, storage: str | None, max_concurrent: int | None = None):
    from autoft.engines.base import Execution, build_request, parse_overrides
    from autoft.task import load_task

    return build_request(load_task("digits"), overrides=parse_overrides([f"{k}={v}" for k, v in FIXED.items()]),
                         backbones=["resnet20"], study_name=study, results_dir=results, storage=storage,
                         n_trials=len(CONFIGS), pruner="none",
                         execution=Execution(shared=True, cpus_per_trial=1, max_concurrent=max_concurrent))


def measure(study, n: int, wall: float, path: str) -> dict:
    """Trials, span (first start → last end), throughput and the mean duration of one trial."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        reasons = {t.user_attrs.get("fail_reason") for t in study.get_trials(deepcopy=False)}
        raise RuntimeError(f"{path} with {n} worker(s): no trial completed; failures: {reasons}")
    sec = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)
    return {"path": path, "workers": n, "trials": len(done), "span_s": round(sec, 2), "wall_s": round(wall, 2),
            "trials_per_min": round(60 * len(done) / sec, 2), "mean_trial_s": round(mean, 2)}


def fresh_feature_cache(work: Path, name: str) -> None:
    """An empty frozen-prefix cache folder per run (inherited by workers and Ray trials), so that no
    run reads features an earlier run computed."""
    os.environ["AUTOFT_CACHE_DIR"] = str(work / "features" / name)


def run_optuna(n: int, storage: str, work: Path) -> dict:
    from autoft.engines.optuna_engine import create_study

    study_name = f"bench-optuna-{n}-{time.time_ns()}"
    study = create_study(request(work, study_name, storage))
    for params in CONFIGS:
        study.enqueue_trial(params)
    fresh_feature_cache(work, study_name)
    cmd = [sys.executable, "-m", "autoft.cli", "worker", *COMMON, "--storage", storage, "--study-name",
           study_name, "--n-trials", str(len(CONFIGS)), "--threads", "1"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=work, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{out[-3000:]}")
    return measure(create_study(request(work, study_name, storage)), n, wall, "optuna")


def run_ray(n: int, work: Path) -> dict:
    from autoft.engines.ray_engine import run_ray as ray_search

    study_name = f"bench-ray-{n}-{time.time_ns()}"
    req = request(work, study_name, None, max_concurrent=n)
    fresh_feature_cache(work, study_name)
    t0 = time.perf_counter()
    study = ray_search(req, enqueue=[dict(c) for c in CONFIGS])
    wall = time.perf_counter() - t0
    return measure(study, n, wall, "ray")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default="optuna,ray", help="comma-separated: optuna, ray")
    ap.add_argument("--postgres", action="store_true", help="optuna workers on PostgreSQL (default: journal file)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (the best is kept)")
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    OUT.mkdir(parents=True, exist_ok=True)
    rows, server = [], None
    with tempfile.TemporaryDirectory(prefix="aftbench") as tmp:
        work = Path(tmp)
        try:
            if "optuna" in paths:
                if args.postgres:
                    sys.path.insert(0, str(ROOT / "tests"))
                    from pg import PostgresServer

                    server = PostgresServer().start()
                    storage, kind = server.url, "postgresql"
                else:
                    storage, kind = f"journal:{work / 'journal.log'}", "journal file"
                for n in (1, 2):
                    runs = [run_optuna(n, storage, work) for _ in range(args.repeat)]
                    rows.append({**max(runs, key=lambda r: r["trials_per_min"]), "storage": kind})
                    print(rows[-1], flush=True)
            if "ray" in paths:
                for n in (1, 2):
                    runs = [run_ray(n, work) for _ in range(args.repeat)]
                    rows.append({**max(runs, key=lambda r: r["trials_per_min"]), "storage": "ray (local)"})
                    print(rows[-1], flush=True)
        finally:
            if server is not None:
                server.stop()
    for path in paths:
        one = next(r for r in rows if r["path"] == path and r["workers"] == 1)
        for r in rows:
            if r["path"] == path:
                r["speedup"] = round(r["trials_per_min"] / one["trials_per_min"], 2)
    meta = {"machine": f"{platform.machine()} · {os.cpu_count()} CPUs · {platform.python_version()}",
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "configs": CONFIGS, "fixed": FIXED,
            "backbone": "resnet20", "task": "digits", "threads_per_trial": 1}
    (OUT / "bench_parallel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| path | storage | workers | trials | span (s) | trials/min | speedup | mean trial (s) "
             "| wall incl. start-up (s) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['path']} | {r['storage']} | {r['workers']} | {r['trials']} | {r['span_s']} | "
              f"{r['trials_per_min']} | {r['speedup']}x | {r['mean_trial_s']} | {r['wall_s']} |" for r in rows]
    md = "\n".join(lines) + f"\n\n{meta['machine']}; load average at the end {meta['load_avg_1m_at_end']}\n"
    (OUT / "bench_parallel.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
