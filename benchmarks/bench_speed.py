"""Same work, faster: one fixed list of configurations run by the plain loop and by autoft's core.

(a) the straightforward loop a practitioner writes: for every configuration build the model from the
    pretrained weights, freeze, train every epoch through the whole network, score on validation
    after every epoch (autoft's core with ``use_cache=False``: data encoded and weights read once,
    the frozen layers recomputed in every epoch of every configuration);
(b) autoft's core with the frozen-prefix cache, cold (a fresh, empty cache folder), shared by the
    configurations of the run.

Both run in the same process, interleaved configuration by configuration (alternating which goes
first), so machine load affects both alike.  Validation scores must be equal per configuration.
Head-only configurations are also timed again once the cache is warm (as they are in a search,
after the ranking or an earlier trial computed the features, or in a later process reading them
from disk).

    python benchmarks/bench_speed.py                  # 24 configs, digits, epochs from the task
    python benchmarks/bench_speed.py --n-configs 32 --threads 2
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def bucket(cfg, num_stages: int) -> str:
    if cfg.unfreeze == 0:
        return "head-only"
    return "all stages" if cfg.unfreeze == num_stages else "partial"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--n-configs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="seed of the configuration sampler")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per configuration (default: the task's max_epochs)")
    ap.add_argument("--head-only-every", type=int, default=0,
                    help="make every Nth configuration head-only (unfreeze=0); 0 keeps the sampled depths")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args(argv)
    _util.setup(args.threads)

    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.engines.base import build_request
    from autoft.space import num_stages
    from autoft.task import load_task

    task = load_task(args.task)
    req = build_request(task)
    epochs = args.epochs or task.budget.max_epochs
    configs = _util.sample_configs(req.space, args.n_configs, args.seed, {"seed": task.seed, "epochs": epochs})
    if args.head_only_every:
        configs = [c.model_copy(update={"unfreeze": 0}) if i % args.head_only_every == 0 else c
                   for i, c in enumerate(configs)]
    env = _util.environment()
    print(f"{len(configs)} configurations from {req.space.file}, {epochs} epochs each, task {task.name}, "
          f"{env['torch_threads']} thread(s), load {env['load_average_at_start']}", flush=True)

    t_setup = time.perf_counter()
    task_data = task.prepare()
    plain_cache = FeatureCache(disk=False)  # backbones read once, inputs encoded once; no prefix cache
    tmp = tempfile.TemporaryDirectory(prefix="autoft-bench-cache-")
    cache = FeatureCache(disk=Path(tmp.name))  # cold
    for name in req.space.backbones:  # weights read and data encoded before timing, for both sides alike
        bb = plain_cache.backbone(name)
        plain_cache.encoded(task_data.data, bb.preprocessing)
        cache.backbone(name)
        cache._encoded.update(plain_cache._encoded)
    setup_s = time.perf_counter() - t_setup

    rows = []
    for i, cfg in enumerate(configs):
        ns = num_stages(cfg.backbone)
        runs = {}
        order = ("plain", "cached") if i % 2 == 0 else ("cached", "plain")
        for which in order:
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "plain":
                r = fine_tune_and_score(cfg, task_data, cache=plain_cache, use_cache=False)
            else:
                r = fine_tune_and_score(cfg, task_data, cache=cache, use_cache=True)
            runs[which] = (time.perf_counter() - t0, r, time.process_time() - c0)
        (ta, ra, ca), (tb, rb, cb) = runs["plain"], runs["cached"]
        diff = max(abs(ha[task.metric] - hb[task.metric]) for ha, hb in zip(ra.history, rb.history))
        row = {"i": i, "backbone": cfg.backbone, "stages": ns, "unfreeze": cfg.unfreeze, "kind": bucket(cfg, ns),
               "head": cfg.head, "batch_size": cfg.batch_size, "plain_s": round(ta, 3), "cached_s": round(tb, 3),
               "speedup": round(ta / tb, 2), "plain_cpu_s": round(ca, 3), "cached_cpu_s": round(cb, 3),
               "cpu_speedup": round(ca / cb, 2), "score_plain": ra.score, "score_cached": rb.score,
               "max_abs_diff_per_epoch": diff, "equal": diff <= 1e-5}
        rows.append(row)
        print(f"[{i + 1:2d}/{len(configs)}] {cfg.backbone:8s} unfreeze {cfg.unfreeze:2d}/{ns:2d}  plain {ta:7.2f}s  "
              f"cached {tb:7.2f}s  x{ta / tb:6.1f} (cpu x{ca / cb:5.1f})  val {ra.score:.4f} / {rb.score:.4f}",
              flush=True)

    # head-only configurations again, cache warm (what every head-only trial after the first costs)
    warm = []
    for row in rows:
        if row["kind"] == "head-only":
            cfg = configs[row["i"]]
            t0 = time.perf_counter()
            r = fine_tune_and_score(cfg, task_data, cache=cache, use_cache=True)
            row["cached_warm_s"] = round(time.perf_counter() - t0, 4)
            row["equal_warm"] = abs(r.score - row["score_plain"]) <= 1e-5
            warm.append(row)

    def ratio(sel, key="cached_s"):
        sel = list(sel)
        if not sel:
            return None
        return round(sum(r["plain_s"] for r in sel) / sum(r[key] for r in sel), 2)

    summary = {
        "configs": len(rows), "epochs": epochs, "all_scores_equal": all(r["equal"] for r in rows),
        "plain_total_s": round(sum(r["plain_s"] for r in rows), 2),
        "cached_total_s": round(sum(r["cached_s"] for r in rows), 2),
        "speedup_overall": ratio(rows),
        "cpu_time_speedup_overall": round(sum(r["plain_cpu_s"] for r in rows) / sum(r["cached_cpu_s"] for r in rows), 2),
        "by_kind": {k: {"n": sum(r["kind"] == k for r in rows), "speedup": ratio(r for r in rows if r["kind"] == k)}
                    for k in ("head-only", "partial", "all stages")},
        "cpu_time_speedup_by_kind": {
            k: round(sum(r["plain_cpu_s"] for r in rows if r["kind"] == k)
                     / sum(r["cached_cpu_s"] for r in rows if r["kind"] == k), 2)
            for k in ("head-only", "partial", "all stages") if any(r["kind"] == k for r in rows)},
        "speedup_head_only_cold": ratio(r for r in rows if r["kind"] == "head-only"),
        "speedup_head_only_warm": ratio(warm, "cached_warm_s") if warm else None,
        "median_per_config_speedup": statistics.median(r["speedup"] for r in rows),
        "setup_s_untimed": round(setup_s, 2),
        "cache": cache.stats(),
    }
    doc = {"benchmark": "same work, faster", "task": task.name, "space": req.space.file,
           "sampler": f"optuna RandomSampler(seed={args.seed})", "head_only_every": args.head_only_every,
           "command": "python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": env, "summary": summary, "configs": rows}
    md = [f"## Same work, faster ({task.name}, {len(rows)} configurations, {epochs} epochs each)", "",
          f"Command: `{doc['command']}`  ",
          f"Machine: {env['cpu_count']} CPUs, torch {env['torch']} with {env['torch_threads']} thread(s), "
          f"load average at start {env['load_average_at_start']}", "",
          _util.md_table([
              {"what": "all configurations", "n": len(rows), "plain s": summary["plain_total_s"],
               "autoft s": summary["cached_total_s"], "speed-up": summary["speedup_overall"]},
              *[{"what": k, "n": v["n"], "plain s": round(sum(r["plain_s"] for r in rows if r["kind"] == k), 2),
                 "autoft s": round(sum(r["cached_s"] for r in rows if r["kind"] == k), 2), "speed-up": v["speedup"]}
                for k, v in summary["by_kind"].items() if v["n"]],
              *([{"what": "head-only, cache warm", "n": len(warm),
                  "plain s": round(sum(r["plain_s"] for r in warm), 2),
                  "autoft s": round(sum(r["cached_warm_s"] for r in warm), 3),
                  "speed-up": summary["speedup_head_only_warm"]}] if warm else [])],
              ["what", "n", "plain s", "autoft s", "speed-up"]), "",
          f"Process CPU time ratio (less sensitive to other load on the machine): overall "
          f"{summary['cpu_time_speedup_overall']}, by kind {summary['cpu_time_speedup_by_kind']}.", "",
          f"Validation scores equal for every configuration (|diff| <= 1e-5 every epoch): "
          f"**{summary['all_scores_equal']}**", "", "<details><summary>per configuration</summary>", "",
          _util.md_table(rows, ["i", "backbone", "unfreeze", "stages", "kind", "plain_s", "cached_s", "speedup",
                                "score_plain", "score_cached"]), "", "</details>", ""]
    j, m = _util.write("speed", doc, "\n".join(md), args.out)
    print("\n".join(md[:8]))
    print(f"wrote {j} and {m}")
    tmp.cleanup()
    return 0 if summary["all_scores_equal"] and not math.isnan(summary["speedup_overall"] or 0) else 1


if __name__ == "__main__":
    sys.exit(main())
