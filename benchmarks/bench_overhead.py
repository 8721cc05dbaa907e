"""Engine overhead: the time a trial spends outside the core, with SQLite storage.

Runs autoft's default search (Optuna TPE + Hyperband + cache + ranking, SQLite storage in a temporary
folder) and times, for every trial,

* the core: ``fine_tune_and_score`` (training and validation), minus the time spent inside the
  reporter (below);
* the reporter: ``trial.report`` + ``should_prune`` after every epoch (storage writes);
* everything else between one trial and the next (``ask``: creating the trial in storage; sampling
  the configuration; user attributes; ``tell``; callbacks).

Overhead per trial = wall time of Optuna's ``optimize`` loop minus core time, divided by trials,
compared with the median trial's wall time.  Opening the storage and the study (once per search,
not per trial) and the backbone ranking are reported on their own lines, and also amortised over
the trials ("incl. set-up").

    python benchmarks/bench_overhead.py --task digits-fewshot --n-trials 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits-fewshot")
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args(argv)
    _util.setup(args.threads)

    import optuna

    from autoft.core import FeatureCache
    from autoft.engines import optuna_engine as eng
    from autoft.engines.base import build_request
    from autoft.task import load_task

    task = load_task(args.task)
    task_data = task.prepare()
    env = _util.environment()
    tmp = tempfile.TemporaryDirectory(prefix="autoft-bench-overhead-")
    req = build_request(task, study_name="overhead", results_dir=Path(tmp.name) / "results", n_trials=args.n_trials)
    print(f"task {task.name}, {args.n_trials} trials, storage {req.storage_url}, "
          f"{env['torch_threads']} thread(s)", flush=True)

    core_s: dict[int, float] = {}
    report_s: dict[int, float] = {}
    real_core, real_report = eng.fine_tune_and_score, eng.OptunaReporter.report

    def timed_core(cfg, task_data, reporter, **kw):
        t0 = time.perf_counter()
        try:
            return real_core(cfg, task_data, reporter, **kw)
        finally:
            core_s[reporter.trial.number] = time.perf_counter() - t0

    def timed_report(self, step, value, metrics):
        t0 = time.perf_counter()
        try:
            return real_report(self, step, value, metrics)
        finally:
            n = self.trial.number
            report_s[n] = report_s.get(n, 0.0) + time.perf_counter() - t0

    rank_s = {}
    from autoft import rank as rank_mod

    real_apply = rank_mod.apply_ranking

    def timed_apply(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_apply(*a, **kw)
        finally:
            rank_s["ranking"] = time.perf_counter() - t0

    loop_s = {}
    real_optimize = optuna.Study.optimize

    def timed_optimize(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real_optimize(self, *a, **kw)
        finally:
            loop_s["optimize"] = time.perf_counter() - t0

    optuna.Study.optimize = timed_optimize
    eng.fine_tune_and_score, eng.OptunaReporter.report, rank_mod.apply_ranking = timed_core, timed_report, timed_apply
    cache = FeatureCache(disk=Path(tmp.name) / "features")
    try:
        t0 = time.perf_counter()
        study = eng.run_study(req, task_data=task_data, cache=cache)
        wall = time.perf_counter() - t0
    finally:
        eng.fine_tune_and_score, eng.OptunaReporter.report, rank_mod.apply_ranking = real_core, real_report, real_apply
        optuna.Study.optimize = real_optimize

    trials = [t for t in study.get_trials(deepcopy=False) if t.number in core_s]
    rows = []
    for t in trials:
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        core = core_s[t.number] - report_s.get(t.number, 0.0)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "trial_s": dur, "core_s": round(core, 4),
                     "report_s": round(report_s.get(t.number, 0.0), 4),
                     "in_trial_overhead_s": round(dur - core, 4) if dur is not None else None,
                     "epochs": len(t.intermediate_values), "backbone": t.params.get("backbone"),
                     "unfreeze": t.params.get("unfreeze")})
    n = len(rows)
    core_total = sum(r["core_s"] for r in rows)
    loop_wall = loop_s["optimize"]
    setup = wall - loop_wall - rank_s.get("ranking", 0.0)  # storage, study, resume check: once per search
    per_trial_overhead = (loop_wall - core_total) / n
    durations = [r["trial_s"] for r in rows if r["trial_s"] is not None]
    median_trial = statistics.median(durations)
    summary = {
        "trials": n, "states": {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}},
        "search_wall_s": round(wall, 2), "ranking_s": round(rank_s.get("ranking", 0.0), 3),
        "core_total_s": round(core_total, 2),
        "overhead_per_trial_s": round(per_trial_overhead, 4),
        "reporter_per_trial_s": round(statistics.mean(r["report_s"] for r in rows), 4),
        "in_trial_overhead_median_s": round(statistics.median(r["in_trial_overhead_s"] for r in rows), 4),
        "median_trial_s": round(median_trial, 3),
        "overhead_pct_of_median_trial": round(100 * per_trial_overhead / median_trial, 2),
        "overhead_pct_of_total": round(100 * (loop_wall - core_total) / loop_wall, 2),
        "study_setup_s": round(setup, 3),
        "overhead_incl_setup_per_trial_s": round(per_trial_overhead + setup / n, 4),
        "overhead_incl_setup_pct_of_median_trial": round(100 * (per_trial_overhead + setup / n) / median_trial, 2),
    }
    doc = {"benchmark": "engine overhead (SQLite)", "task": task.name, "storage": "sqlite (temporary file)",
           "command": "python benchmarks/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": env, "summary": summary, "trials": rows, "optuna": optuna.__version__}
    md = [f"## Engine overhead ({task.name}, {n} trials, SQLite storage)", "", f"Command: `{doc['command']}`  ",
          f"Machine: {env['cpu_count']} CPUs, {env['torch_threads']} torch thread(s), load average at start "
          f"{env['load_average_at_start']}", "",
          _util.md_table([{
              "trials": n, "median trial s": summary["median_trial_s"],
              "overhead per trial s": summary["overhead_per_trial_s"],
              "of which reporting s": summary["reporter_per_trial_s"],
              "overhead % of median trial": summary["overhead_pct_of_median_trial"],
              "overhead % of trial loop": summary["overhead_pct_of_total"],
              "incl. set-up: s per trial / % of median": f"{summary['overhead_incl_setup_per_trial_s']} / "
                                                         f"{summary['overhead_incl_setup_pct_of_median_trial']}"}],
              ["trials", "median trial s", "overhead per trial s", "of which reporting s",
               "overhead % of median trial", "overhead % of trial loop", "incl. set-up: s per trial / % of median"]), "",
          f"States: {summary['states']}; once per search: opening storage and study {summary['study_setup_s']} s, "
          f"ranking the backbones {summary['ranking_s']} s.", ""]
    j, m = _util.write("overhead", doc, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
