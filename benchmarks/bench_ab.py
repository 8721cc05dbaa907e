"""Did a change make the CPU path slower?  The same configurations run by two revisions of autoft.

A base revision (``--base``, checked out into a temporary git worktree) and this working tree each run
the same fixed list of configurations (digits, sampled from this tree's search space; fields the base
revision does not know are dropped, so they keep their defaults), every configuration in a fresh
process per revision, alternating which revision goes first (ABBA), so that load on the machine affects
both alike.  Each run is timed inside its process (imports and data loading excluded): wall time and
process CPU time, after an untimed one-epoch warm-up in the same process (one-time costs such as lazy
imports are not per-trial costs), for autoft's default path (frozen-prefix cache, cold) and the plain path
(``use_cache=False``).  Validation scores must be equal: on the CPU both revisions compute the same thing.

    python benchmarks/bench_ab.py --base 81bca24~1      # before the GPU work (issue 15)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

CHILD = r"""
import json, sys, time, os
import torch
cfg, mode, task_name = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
from autoft.task import load_task
from autoft.core import FeatureCache, fine_tune_and_score
from autoft.core.config import TrialConfig
task = load_task(task_name).prepare()
cfg = TrialConfig(**{k: v for k, v in cfg.items() if k in TrialConfig.model_fields})
# untimed warm-up (one epoch, its own cache): one-time costs of a process (lazy imports, first-call kernel
# set-up) are not what a search pays per trial
fine_tune_and_score(cfg.model_copy(update={"epochs": 1}), task, cache=FeatureCache(disk=False),
                    use_cache=(mode == "cached"))
cache = FeatureCache(disk=False)
cache.backbone(cfg.backbone)  # the weights are read before timing, in both revisions
w0, c0 = time.perf_counter(), time.process_time()
r = fine_tune_and_score(cfg, task, cache=cache, use_cache=(mode == "cached"))
print("RESULT " + json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                              "history": [h[task.metric] for h in r.history]}))
"""


def run_child(tree: Path, cfg: dict, mode: str, task: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), mode, task], env=env, cwd=tree,
                         capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"revision at {tree} failed on {cfg}: {out.stderr[-2000:]}")
    return json.loads(line[-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare with (e.g. 81bca24~1)")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--n-configs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args(argv)
    _util.setup(args.threads)
    from autoft.engines.base import build_request
    from autoft.task import load_task

    head = _util.ROOT
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=head, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=head, capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "autoft"], cwd=head, capture_output=True,
                                text=True).stdout.strip())
    task = load_task(args.task)
    req = build_request(task, overrides={"epochs": args.epochs})
    configs = [c.model_dump() for c in _util.sample_configs(req.space, args.n_configs, args.seed, req.fixed)]
    env = _util.environment()
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autoft-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=head, check=True,
                       capture_output=True)
        try:
            for i, cfg in enumerate(configs):
                for mode in ("cached", "plain"):
                    order = [("base", base), ("head", head)]
                    if (2 * i + (mode == "plain")) % 2:
                        order.reverse()
                    res = {name: run_child(tree, cfg, mode, args.task, args.threads) for name, tree in order}
                    row = {"i": i, "backbone": cfg["backbone"], "unfreeze": cfg["unfreeze"], "mode": mode,
                           "first": order[0][0], **{f"{k}_{m}": round(res[k][m], 3) for k in res for m in ("wall", "cpu")},
                           "same_scores": all(abs(a - b) <= 1e-5 for a, b in
                                              zip(res["base"]["history"], res["head"]["history"], strict=True))}
                    rows.append(row)
                    print(f"{i} {cfg['backbone']} unfreeze={cfg['unfreeze']} {mode}: base {row['base_wall']:.2f}s "
                          f"head {row['head_wall']:.2f}s (cpu {row['base_cpu']:.2f}/{row['head_cpu']:.2f}) "
                          f"same scores {row['same_scores']}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=head, capture_output=True)

    summary = {}
    for mode in ("cached", "plain", "all"):
        sel = [r for r in rows if mode == "all" or r["mode"] == mode]
        summary[mode] = {
            "wall_ratio_total": round(sum(r["head_wall"] for r in sel) / sum(r["base_wall"] for r in sel), 3),
            "cpu_ratio_total": round(sum(r["head_cpu"] for r in sel) / sum(r["base_cpu"] for r in sel), 3),
            "wall_ratio_median": round(statistics.median(r["head_wall"] / r["base_wall"] for r in sel), 3)}
    summary["same_scores"] = all(r["same_scores"] for r in rows)
    doc = {"benchmark": "CPU A/B of two revisions", "base": base_rev, "head": head_rev + ("+changes" if dirty else ""),
           "task": args.task, "epochs": args.epochs, "configs": configs, "environment": env, "summary": summary,
           "rows": rows, "command": "python benchmarks/bench_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "total_benchmark_s": round(time.perf_counter() - t_start, 1)}
    md = [f"## CPU A/B: {doc['head']} against {base_rev} ({args.task}, {len(configs)} configurations, "
          f"{args.epochs} epochs)", "", f"Command: `{doc['command']}`  ",
          f"Machine: {env['cpu_count']} CPUs, {args.threads} thread(s), load average at start "
          f"{env['load_average_at_start']}", "",
          "Time of this tree / time of the base revision (below 1: faster now):", "",
          _util.md_table([{"path": m, **summary[m]} for m in ("cached", "plain", "all")],
                         ["path", "wall_ratio_total", "cpu_ratio_total", "wall_ratio_median"]), "",
          f"Validation scores equal in every epoch of every configuration (|diff| <= 1e-5): "
          f"**{summary['same_scores']}**", "",
          "<details><summary>per run</summary>", "",
          _util.md_table(rows, list(rows[0].keys())), "", "</details>", ""]
    j, m = _util.write(f"ab_{args.task}", doc, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
