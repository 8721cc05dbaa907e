"""Search efficiency: time to reach within 0.5 points of the best validation score of a long reference run.

(a) random search: Optuna's RandomSampler, no pruning, no frozen-prefix cache (every trial runs all
    its epochs through the whole network);
(b) autoft's default search: ``run_study`` as ``autoft search`` runs it (TPE, Hyperband pruning,
    frozen-prefix cache starting empty, backbone ranking, SQLite storage).

Each run stops when a *completed* trial scores at least ``best_reference - 0.005`` (0.5 points of
accuracy or F1), or when it has used ``--cap`` seconds (then its time is recorded as censored:
"more than the cap", and the speed-up is a lower bound).  Data loading is done once, before timing.
Seeds: the task's ``seed`` (sampler and initialisation) is set to each value in turn; the split is
the task's.

The reference run (TPE + cache, no pruning, ``--ref-trials`` trials) is stored in
``benchmarks/out/search_reference_<task>.json`` and reused while its settings match.

    python benchmarks/bench_search.py --task digits-fewshot
    python benchmarks/bench_search.py --task sms-spam --set unfreeze=[0,1] --set epochs=3 --ref-trials 30
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

POINTS = 0.005  # 0.5 points of a metric in [0, 1]


class Stop(Exception):
    pass


def run_random(req, task_data, target: float, cap: float, seed: int) -> dict:
    """Random search, no pruning, no prefix cache, until a completed trial reaches ``target``."""
    import optuna

    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.errors import TrialFailed

    plain = FeatureCache(disk=False)  # backbones and encoded inputs only: the prefix is recomputed every epoch
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    t0 = time.perf_counter()
    best, n, reached = -math.inf, 0, None
    while time.perf_counter() - t0 < cap:
        trial = study.ask()
        cfg = req.space.sample(trial, req.fixed)
        try:
            score = fine_tune_and_score(cfg, task_data, cache=plain, use_cache=False).score
            study.tell(trial, score)
        except TrialFailed:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            score = -math.inf
        n += 1
        best = max(best, score)
        if score >= target:
            reached = time.perf_counter() - t0
            break
    return {"seconds": reached if reached is not None else time.perf_counter() - t0, "reached": reached is not None,
            "trials": n, "best": best}


def run_autoft(req, task_data, target: float | None, cap: float, rank=None, pruner: str | None = None) -> dict:
    """autoft's default search (run_study) with an empty cache, until a completed trial reaches ``target``."""
    import optuna

    from autoft.core import FeatureCache
    from autoft.engines.optuna_engine import run_study

    tmp = tempfile.TemporaryDirectory(prefix="autoft-bench-search-")
    req.results_dir = Path(tmp.name) / "results"
    if pruner:
        req.pruner = pruner
    cache = FeatureCache(disk=Path(tmp.name) / "features")
    state = {"reached": None, "best": -math.inf}
    t0 = time.perf_counter()

    def stopper(study, trial):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            state["best"] = max(state["best"], trial.value)
            if target is not None and trial.value >= target and state["reached"] is None:
                state["reached"] = time.perf_counter() - t0
                study.stop()
        if time.perf_counter() - t0 >= cap:
            study.stop()

    study = run_study(req, task_data=task_data, callbacks=[stopper], cache=cache, rank=rank)
    elapsed = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    out = {"seconds": state["reached"] if state["reached"] is not None else elapsed, "reached": state["reached"] is not None,
           "trials": len(trials), "pruned": sum(t.state.name == "PRUNED" for t in trials), "best": state["best"],
           "ranking": study.user_attrs.get("ranking"), "cache": cache.stats(),
           "history": [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                        "params": t.params, "epochs": len(t.intermediate_values)} for t in trials]}
    tmp.cleanup()
    return out


def reference(args, task, task_data, overrides) -> dict:
    """The long reference run: TPE + cache, no pruning, ``--ref-trials`` trials (stored and reused)."""
    from autoft.engines.base import build_request

    path = args.out / f"search_reference_{task.name}.json"
    sig = {"task": task.name, "overrides": overrides, "task_set": args.task_set, "ref_trials": args.ref_trials, "space": task.search_space,
           "max_epochs": task.budget.max_epochs, "split": task.split.model_dump()}
    if path.is_file() and not args.redo_reference:
        doc = json.loads(path.read_text())
        if doc.get("signature") == sig:
            print(f"reference: reusing {path} (best {doc['best']:.4f}; --redo-reference recomputes it)", flush=True)
            return doc
    print(f"reference: TPE + cache, no pruning, {args.ref_trials} trials ...", flush=True)
    req = build_request(task.model_copy(update={"seed": 1000}), overrides=overrides, study_name="reference",
                        n_trials=args.ref_trials)
    t0 = time.perf_counter()
    res = run_autoft(req, task_data, None, math.inf, pruner="none")
    doc = {"signature": sig, "best": res["best"], "seconds": round(time.perf_counter() - t0, 1),
           "trials": res["trials"], "history": res["history"]}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"reference: best {doc['best']:.4f} in {doc['trials']} trials, {doc['seconds']}s", flush=True)
    return doc


def load_task_with(name: str, sets: list[str]):
    """A task file with dotted ``KEY=VALUE`` overrides applied (values parsed as YAML)."""
    import yaml

    from autoft.task import find_task, parse_task, read_yaml

    path = find_task(name)
    doc = read_yaml(path, "task")
    for item in sets:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return parse_task(doc, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits-fewshot")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cap", type=float, default=300.0, help="seconds per autoft run before it counts as not reached")
    ap.add_argument("--cap-random", type=float, default=900.0,
                    help="seconds per random-search run before it counts as not reached")
    ap.add_argument("--ref-trials", type=int, default=60)
    ap.add_argument("--redo-reference", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="search space override, as in autoft search --set")
    ap.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a task file field, dotted (e.g. split.train_per_class=50 budget.max_epochs=3)")
    ap.add_argument("--ablate-rank", action="store_true", help="also run autoft without the ranking")
    ap.add_argument("--skip-random", action="store_true", help="only autoft runs (e.g. to compare policies)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    ap.add_argument("--render", type=Path, help="only re-render a stored result JSON (summary + markdown)")
    args = ap.parse_args(argv)
    if args.render:  # re-render the summary and markdown of a stored result
        doc = json.loads(args.render.read_text())
        md = render(doc)
        _util.write(args.render.stem, doc, md, args.render.parent)
        print(md)
        return 0
    _util.setup(args.threads)

    from autoft.engines.base import build_request, parse_overrides
    task = load_task_with(args.task, args.task_set)
    overrides = parse_overrides(args.set)
    env = _util.environment()
    task_data = task.prepare()
    sizes = task_data.splits.sizes()
    print(f"task {task.name} ({sizes}), metric {task.metric}, overrides {overrides}, "
          f"{env['torch_threads']} thread(s), caps {args.cap}s / {args.cap_random}s (random)", flush=True)
    t_start = time.perf_counter()
    ref = reference(args, task, task_data, overrides)
    # scores are float32 fractions (193/200 = 0.96499997): a small tolerance so that exactly 0.5 points
    # below the best counts as within 0.5 points
    target = ref["best"] - POINTS - 1e-6
    print(f"target: {task.metric} >= {target:.4f}", flush=True)

    rows = []
    for seed in args.seeds:
        task_s = task.model_copy(update={"seed": seed})
        row = {"seed": seed}
        runs = [("autoft", {})] + ([("autoft_no_rank", {"rank": False})] if args.ablate_rank else []) \
            + ([] if args.skip_random else [("random", None)])
        for name, kw in runs:
            req = build_request(task_s, overrides=overrides, study_name=f"bench-{name}-{seed}", n_trials=100000)
            if kw is None:
                res = run_random(req, task_data, target, args.cap_random, seed)
            else:
                res = run_autoft(req, task_data, target, args.cap, **kw)
            row[name] = res
            print(f"seed {seed} {name:15s} {'reached' if res['reached'] else 'NOT reached'} in "
                  f"{res['seconds']:7.1f}s after {res['trials']} trials (best {res['best']:.4f})", flush=True)
        rows.append(row)

    doc = {"benchmark": "search efficiency", "task": task.name, "metric": task.metric, "overrides": overrides,
           "task_overrides": args.task_set, "sizes": sizes, "reference": {k: ref[k] for k in ("best", "trials", "seconds")},
           "target": target, "cap_s": args.cap, "cap_random_s": args.cap_random, "seeds": args.seeds,
           "command": "python benchmarks/bench_search.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": env, "runs": rows, "total_benchmark_s": round(time.perf_counter() - t_start, 1)}
    md = render(doc)
    j, m = _util.write(f"search_{task.name}", doc, md, args.out)
    print(md)
    print(f"wrote {j} and {m}")
    return 0


def speedup(row: dict) -> tuple[float | None, str]:
    """random time / autoft time, and what it is: exact, a lower or upper bound (a run hit its cap),
    or undetermined (neither reached the target)."""
    a, r = row["autoft"], row["random"]
    if not a["reached"] and not r["reached"]:
        return None, "undetermined"
    ratio = r["seconds"] / a["seconds"]
    if a["reached"] and r["reached"]:
        return ratio, "exact"
    return ratio, "lower bound" if a["reached"] else "upper bound"


def render(doc: dict) -> str:
    """Summary (into ``doc``) and the markdown table."""
    rows, env = doc["runs"], doc["environment"]
    ratios = []
    for r in rows:
        if "random" in r:
            r["speedup"], r["speedup_kind"] = speedup(r)
            if r["speedup"] is not None:
                ratios.append(r["speedup"])
    doc["summary"] = summary = {
        "target": doc["target"], "reference_best": doc["reference"]["best"],
        "median_speedup": statistics.median(ratios) if ratios else None,
        "speedups": [(r.get("speedup"), r.get("speedup_kind")) for r in rows],
        "autoft_reached": sum(r["autoft"]["reached"] for r in rows),
        "random_reached": sum(r["random"]["reached"] for r in rows if "random" in r),
        "autoft_median_s": statistics.median(r["autoft"]["seconds"] for r in rows)}
    if any("autoft_no_rank" in r for r in rows):
        summary["autoft_no_rank_median_s"] = statistics.median(r["autoft_no_rank"]["seconds"] for r in rows)
        summary["autoft_no_rank_reached"] = sum(r["autoft_no_rank"]["reached"] for r in rows)

    def cell(res):
        return f"{res['seconds']:.1f}" + ("" if res["reached"] else " (not reached: cap)") + f" / {res['trials']}"

    table = []
    for r in rows:
        t = {"seed": r["seed"], "autoft s / trials": cell(r["autoft"])}
        if "autoft_no_rank" in r:
            t["autoft w/o ranking s / trials"] = cell(r["autoft_no_rank"])
        if "random" in r:
            t["random s / trials"] = cell(r["random"])
            t["speed-up"] = "-" if r["speedup"] is None else \
                {"exact": "", "lower bound": "≥ ", "upper bound": "≤ "}[r["speedup_kind"]] + f"{r['speedup']:.1f}x"
        table.append(t)
    ref, sizes = doc["reference"], doc["sizes"]
    med = summary["median_speedup"]
    md = [f"## Search efficiency: {doc['task']} ({doc['metric']})", "", f"Command: `{doc['command']}`  ",
          f"Machine: {env['cpu_count']} CPUs, {env['torch_threads']} torch thread(s), load average at start "
          f"{env['load_average_at_start']}  ",
          f"Reference: best validation {doc['metric']} {ref['best']:.4f} in {ref['trials']} trials (TPE + cache, no "
          f"pruning); target {doc['target']:.4f}; cap {doc['cap_s']:g}s per autoft run, {doc['cap_random_s']:g}s per "
          f"random run; space overrides {doc['overrides'] or 'none'}; task overrides {doc['task_overrides'] or 'none'} "
          f"(train {sizes['train']}, val {sizes['val']})", "",
          _util.md_table(table, list(table[0].keys())), "",
          (f"Median speed-up over the {sum(r.get('speedup') is not None for r in doc['runs'])} of {len(doc['runs'])} "
           f"seeds where a run reached the target: **{med:.1f}x** (a censored run counts at its cap: '≥' are lower "
           f"bounds; seeds where neither reached it are left out)"
           if med is not None else "Median speed-up: undetermined (no run reached the target)"), ""]
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
