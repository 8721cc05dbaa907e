"""Selection: the validation-to-test gap of the chosen winner, single-seed best vs finalists by mean.

For each task and seed, one small autoft search (``autoft.search``: ranking, first-trial recipes, TPE,
Hyperband, the frozen-prefix cache) with the finalists on (``--finalists`` best distinct configurations,
``--finalist-seeds`` folds each, or seeds with ``--finalist-mode seeds``). From its ``finalists`` record:

* **single-seed winner** (the study's best trial, what autoft chose before the finalists): its validation
  score and its test score (a refit with its own seed, scored once on the test split);
* **finalists winner** (best mean): its validation mean over the folds or seeds and its test score (the search's
  final check: a refit with the trial's own seed);
* the gap = validation − test of each, and whether the choice changed.

The seed ``s`` sets the task's ``seed`` (sampler, initialisation) and its split seed, so every seed has
its own validation and test sets (a gap measured on one split would be one draw). Results go to
``benchmarks/results/selection_<mode>.json`` and ``.md`` (``--name`` another name). ``--finalist-mode cv`` (the
default, as in ``autoft search``) re-runs the finalists on folds of train+validation at the search's split sizes:
their mean then comes from other draws of the data, scored on held-out parts only partly the search's validation
split; ``seeds`` re-runs them
with more seeds on the search's own split.

    nice -n 5 python benchmarks/bench_selection.py                       # digits-fewshot, 5 seeds
    python benchmarks/bench_selection.py --tasks digits-fewshot sms-spam   # + sms-spam head only, 3 seeds
    python benchmarks/bench_selection.py --tasks digits-fewshot --seeds 0 1 --n-trials 6
    python benchmarks/bench_selection.py --tasks sms-spam banking77 --sms-seeds 0 1 2 3 4 --append
      # adds these tasks' runs to the stored selection_cv.json (runs of other tasks are kept)
    python benchmarks/bench_selection.py --finalist-mode seeds   # seeds instead of folds: selection_seeds.json/.md
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

RESULTS = _util.ROOT / "benchmarks" / "results"
# per task: search space overrides (as --set) and the trial budget
PRESETS = {
    # CIFAR ResNets, head only or the last stage (cached prefix): the whole space's deep fine-tunes took about
    # 75 s of CPU per trial on this shared 2-core machine, 12 trials x 5 seeds would not fit ~15 minutes
    "digits-fewshot": {"overrides": {"unfreeze": [0, 1]}, "n_trials": 12},
    "sms-spam": {"overrides": {"unfreeze": 0}, "n_trials": 8},  # MiniLM head only (cached features)
    # MiniLM head only: 77 intents, 10 training and 10 validation queries each, the official test set (3,080)
    "banking77": {"overrides": {"unfreeze": 0}, "n_trials": 8},
}


def run_one(task_name: str, seed: int, n_trials: int, overrides: dict, k: int, seeds: int, mode: str = "cv") -> dict:
    import autoft
    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.core.config import TrialConfig
    from autoft.task import load_task

    base = load_task(task_name)
    task = base.model_copy(update={"seed": seed, "split": base.split.model_copy(update={"seed": seed}),
                                   "budget": base.budget.model_copy(update={"timeout": None})})
    t0 = time.perf_counter()
    td = task.prepare()
    with tempfile.TemporaryDirectory() as tmp:
        r = autoft.search(task, overrides=overrides or None, n_trials=n_trials, results_dir=tmp, task_data=td,
                          evaluate=False, finalists=k, finalist_seeds=seeds,
                          finalist_mode=mode)
    took = time.perf_counter() - t0
    metric = task.metric
    rec = r.finalists
    single = r.study.best_trial
    row = {"task": task_name, "seed": seed, "trials": len(r.study.trials), "complete": r.counts["complete"],
           "single_trial": single.number, "single_val": single.value, "seconds": round(took, 1),
           "finalists_seconds": r.timings.get("finalists")}
    chosen_test = r.test_metrics[metric]
    if rec is None:  # fewer than 2 distinct completed configurations: nothing to choose between
        row.update(chosen_trial=single.number, chosen_val_mean=single.value, chosen_ci95=None, changed=False,
                   single_test=chosen_test, chosen_test=chosen_test, finalists=0)
    else:
        f = next(f for f in rec["finalists"] if f["trial"] == rec["chosen_trial"])
        row.update(chosen_trial=rec["chosen_trial"], chosen_val_mean=f["mean"], chosen_ci95=[f["ci95_low"],
                   f["ci95_high"]], changed=rec["changed"], chosen_test=chosen_test, finalists=len(rec["finalists"]),
                   single_val_mean=next(x["mean"] for x in rec["finalists"] if x["trial"] == single.number))
        if rec["changed"]:  # the single-seed winner's own test score: a refit with its seed
            cfg = TrialConfig(**single.user_attrs["config"])
            row["single_test"] = fine_tune_and_score(cfg, td, cache=FeatureCache(), test=True).test_metrics[metric]
        else:
            row["single_test"] = chosen_test
    row["gap_single"] = row["single_val"] - row["single_test"]
    row["gap_finalists"] = row["chosen_val_mean"] - row["chosen_test"]
    row["test_change"] = row["chosen_test"] - row["single_test"]
    return row


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        g = [r for r in rows if r["task"] == task]
        out.append(_summ(task, g))
    if len(out) > 1:
        out.append(_summ("all", rows))
    return out


def _summ(name: str, g: list[dict]) -> dict:
    m = statistics.fmean
    return {"task": name, "runs": len(g), "gap_single": m(r["gap_single"] for r in g),
            "gap_finalists": m(r["gap_finalists"] for r in g), "abs_gap_single": m(abs(r["gap_single"]) for r in g),
            "abs_gap_finalists": m(abs(r["gap_finalists"]) for r in g), "test_single": m(r["single_test"] for r in g),
            "test_finalists": m(r["chosen_test"] for r in g), "changed": f"{sum(r['changed'] for r in g)}/{len(g)}"}


def render(doc: dict) -> str:
    rows, summ = doc["runs"], doc["summary"]
    pts = [{**r, **{k: 100 * r[k] for k in ("gap_single", "gap_finalists", "test_change")}} for r in rows]
    s_pts = [{**s, **{k: 100 * s[k] for k in ("gap_single", "gap_finalists", "abs_gap_single", "abs_gap_finalists")
                      if k in s}} for s in summ]
    st = doc["settings"]
    how = (f"{st['finalist_seeds']} cross-validation folds of train+validation at the search's split sizes (every fold "
           "trains and validates on as many examples per class as the search)" if st.get("finalist_mode") == "cv"
           else f"{st['finalist_seeds']} seeds (the trial's own + the rest)")
    lines = ["## Selection: validation-to-test gap of the chosen winner", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {doc['environment']['cpu_count']} CPUs, {doc['environment']['torch_threads']} torch thread(s), "
             f"load average at start {doc['environment']['load_average_at_start']}, at end "
             f"{doc['environment'].get('load_average_at_end', '?')}; total {doc['seconds']:.0f} s  ",
             f"Finalists: {st['finalists']} best distinct configurations x {how}, chosen by the mean; the winner's "
             "test score is a refit with its own seed on the search's training split. Gap = validation - test, in "
             "points (x100); abs = mean absolute gap. Seed s = the task's seed and its split seed.",
             "", "### Mean over seeds", "",
             _util.md_table(s_pts, ["task", "runs", "gap_single", "gap_finalists", "abs_gap_single",
                                    "abs_gap_finalists", "test_single", "test_finalists", "changed"]),
             "", "### Per run", "",
             _util.md_table(pts, ["task", "seed", "complete", "single_trial", "single_val", "single_test",
                                  "gap_single", "chosen_trial", "chosen_val_mean", "chosen_test", "gap_finalists",
                                  "changed", "test_change", "seconds", "finalists_seconds"]), ""]
    for e in doc.get("earlier", []):
        env = e["environment"]
        lines += [f"Earlier runs kept: `{e['command']}` ({env.get('started', '?')}, load average at start "
                  f"{env['load_average_at_start']}, {e.get('seconds', 0):.0f} s)", ""]
    if doc.get("notes"):
        lines += ["Notes: " + " ".join(doc["notes"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["digits-fewshot"], choices=list(PRESETS),
                    help="sms-spam (MiniLM head only) is offered, not run by default: see the README section")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sms-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of sms-spam (costlier)")
    ap.add_argument("--n-trials", type=int, default=None, help="default: per task (digits-fewshot 12, sms-spam 8)")
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--finalist-seeds", type=int, default=3, help="folds (cv), or seeds with --finalist-mode seeds")
    ap.add_argument("--finalist-mode", choices=["seeds", "cv"], default="cv", help="as autoft search (default cv)")
    ap.add_argument("--name", default=None, help="results file name (default selection_<finalist mode>: .json, .md)")
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="a task is started only while the runs so far leave time for it (estimated)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true",
                    help="keep the runs stored in OUT/<name>.json of the tasks not run now (the summary is over all)")
    args = ap.parse_args(argv)
    args.name = args.name or f"selection_{args.finalist_mode}"
    _util.setup(args.threads)
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    doc = {"command": "python benchmarks/bench_selection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": _util.environment(), "notes": [],
           "settings": {"finalists": args.finalists, "finalist_seeds": args.finalist_seeds,
                        "finalist_mode": args.finalist_mode}, "runs": []}
    t0 = time.perf_counter()
    for task in args.tasks:
        seeds = args.sms_seeds if task == "sms-spam" else args.seeds
        preset = PRESETS[task]
        n = args.n_trials or preset["n_trials"]
        for s in seeds:
            done = [r["seconds"] for r in doc["runs"]]
            est = statistics.fmean(done) if done and task == doc["runs"][-1]["task"] else 0.0
            if time.perf_counter() - t0 + est > 60 * args.max_minutes:
                doc["notes"].append(f"{task} seed {s} not run: the {args.max_minutes:g} min budget was spent.")
                print(doc["notes"][-1], flush=True)
                continue
            row = run_one(task, s, n, preset["overrides"], args.finalists, args.finalist_seeds, args.finalist_mode)
            row["n_trials"], row["overrides"] = n, preset["overrides"]
            doc["runs"].append(row)
            print(f"{task} seed {s}: single #{row['single_trial']} val {row['single_val']:.4f} test "
                  f"{row['single_test']:.4f} · finalists #{row['chosen_trial']} mean {row['chosen_val_mean']:.4f} "
                  f"test {row['chosen_test']:.4f} · changed {row['changed']} · {row['seconds']:.0f} s", flush=True)
    doc["seconds"] = time.perf_counter() - t0
    doc["environment"]["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    stored = args.out / f"{args.name}.json"
    if args.append and stored.is_file():  # earlier runs of the other tasks, with the command that made them
        import json

        old = json.loads(stored.read_text())
        kept = [r for r in old["runs"] if r["task"] not in args.tasks]
        earlier = old.get("earlier", []) + ([{k: old[k] for k in ("command", "environment", "seconds", "notes")
                                              if k in old}] if kept else [])
        doc["runs"] = kept + doc["runs"]
        doc["earlier"] = earlier
    doc["summary"] = summary(doc["runs"])
    md = render(doc)
    j, m = _util.write(args.name, doc, md, args.out)
    print(md)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
