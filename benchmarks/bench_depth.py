"""Depth as a fidelity (issue 17, item 2): does ``head_first`` (LP-FT: the first epochs train the head alone on
the cached pooled features, then the configured depth from that warm-started head) help the search?

Two measurements, on one task:

``fixed``: the same configurations (the space's first-trial recipe on its first backbone(s), plus configurations drawn
    at random from the space with ``unfreeze`` > 0) trained with each ``--head-first`` value: final and best
    validation score, seconds; and how well the score at the pruner's first rung predicts the final score
    (Spearman over the configurations), i.e. how good a fidelity the first epochs are with and without it.
``search``: time until a completed trial is within 0.5 points of the long reference run's best (the reference
    of ``bench_search.py``, reused from ``benchmarks/results/search_reference_<task>.json``), autoft's default
    search (``bench_search.run_autoft``) as it is and with ``--set head_first=K`` on every trial, over seeds.

    AUTOFT_HOME=../shared/assets python benchmarks/bench_depth.py --task digits-fewshot
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402
import bench_search  # noqa: E402

RESULTS = _util.ROOT / "benchmarks" / "results"


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


def fixed_configs(req, n_random: int, seed: int, recipe_backbones: int) -> list:
    """The space's first-trial recipes on its first ``recipe_backbones`` backbones, then random configurations
    with unfreeze > 0."""
    from autoft.core.config import TrialConfig
    from autoft.space import num_stages

    out = []
    for b in req.space.backbones[:recipe_backbones]:
        for recipe in req.space.first_trials or []:
            r = dict(recipe)
            if r.get("unfreeze") == "half":
                r["unfreeze"] = max(1, num_stages(b) // 2)
            base = _util.sample_configs(req.space, 1, seed, {**req.fixed, "backbone": b})[0].model_dump()
            out.append(TrialConfig(**{**base, **r, **req.fixed, "backbone": b}))
    drawn = [c for c in _util.sample_configs(req.space, 4 * n_random, seed, req.fixed) if c.unfreeze > 0]
    return out + drawn[:n_random]


def run_fixed(args, task, task_data, req) -> dict:
    from autoft.core import FeatureCache, NullReporter, fine_tune_and_score
    from autoft.errors import TrialFailed

    cache = FeatureCache(disk=False)
    rung = req.pruner_spec(len(task_data.splits.train)).first
    configs = fixed_configs(req, args.random_configs, args.seed, args.recipe_backbones)
    # warm-up, untimed: the backbones and the prefix of each split point, so no variant pays them
    for cfg in configs:
        for u in {0, cfg.unfreeze}:
            fine_tune_and_score(cfg.model_copy(update={"epochs": 1, "unfreeze": u, "head_first": 0}), task_data,
                                cache=cache)
    rows = []
    for i, cfg in enumerate(configs):
        for hf in args.head_first:
            c = cfg.model_copy(update={"head_first": hf})
            t0 = time.perf_counter()
            try:
                res = fine_tune_and_score(c, task_data, NullReporter(), cache=cache)
            except TrialFailed as exc:
                rows.append({"config": i, "head_first": hf, "failed": str(exc)})
                continue
            curve = [h[task.metric] for h in res.history]
            rows.append({"config": i, "backbone": c.backbone, "unfreeze": c.unfreeze, "lr": c.lr,
                         "head_lr": c.head_lr, "head_first": hf, "final": res.score, "best": res.best_score,
                         "at_rung": curve[min(rung, len(curve)) - 1], "seconds": round(time.perf_counter() - t0, 3),
                         "curve": curve})
            print(f"config {i} {c.backbone} unfreeze {c.unfreeze} head_first {hf}: final {res.score:.4f} "
                  f"(rung {rows[-1]['at_rung']:.3f}) {rows[-1]['seconds']:.1f}s", flush=True)
    summary = {}
    for hf in args.head_first:
        ok = [r for r in rows if r["head_first"] == hf and "final" in r]
        summary[hf] = {"mean_final": statistics.fmean(r["final"] for r in ok),
                       "mean_best": statistics.fmean(r["best"] for r in ok),
                       "mean_seconds": statistics.fmean(r["seconds"] for r in ok),
                       "rung_spearman": spearman([r["at_rung"] for r in ok], [r["final"] for r in ok]),
                       "failed": sum(1 for r in rows if r["head_first"] == hf and "failed" in r), "n": len(ok)}
        base = {r["config"]: r for r in rows if r["head_first"] == args.head_first[0] and "final" in r}
        diffs = [r["final"] - base[r["config"]]["final"] for r in ok if r["config"] in base]
        summary[hf]["wins_ties_losses_vs_first"] = [sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs),
                                                    sum(d < -1e-9 for d in diffs)]
        summary[hf]["mean_diff_vs_first"] = statistics.fmean(diffs) if diffs else None
    return {"rung": rung, "configs": [c.model_dump() for c in configs], "rows": rows, "summary": summary}


def run_search(args, task, task_data) -> dict:
    from autoft.engines.base import build_request

    ref = json.loads(args.reference.read_text())
    sig = ref.get("signature", {})
    if sig.get("task") != task.name or sig.get("overrides") or sig.get("task_set"):
        raise SystemExit(f"{args.reference} is not a plain reference run of {task.name}: {sig}")
    target = ref["best"] - bench_search.POINTS - 1e-6
    print(f"target: {task.metric} >= {target:.4f} (reference best {ref['best']:.4f}, {ref['trials']} trials)", flush=True)
    variants = [("off", {})] + [(f"head_first={k}", {"head_first": k}) for k in args.search_head_first]
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, ov in variants:
            req = build_request(task.model_copy(update={"seed": seed}), overrides=ov, study_name=f"depth-{seed}",
                                n_trials=100000)
            res = bench_search.run_autoft(req, task_data, target, args.cap)
            res.pop("history", None)
            row[name] = res
            print(f"seed {seed} {name:14s} {'reached' if res['reached'] else 'NOT reached'} in {res['seconds']:6.1f}s "
                  f"after {res['trials']} trials ({res['pruned']} pruned, best {res['best']:.4f})", flush=True)
        rows.append(row)
    summary = {}
    for name, _ in variants:
        summary[name] = {"median_s": statistics.median(r[name]["seconds"] for r in rows),
                         "reached": sum(r[name]["reached"] for r in rows),
                         "median_trials": statistics.median(r[name]["trials"] for r in rows)}
        if name != "off":
            ratios = [r["off"]["seconds"] / r[name]["seconds"] for r in rows if r["off"]["reached"] and r[name]["reached"]]
            summary[name]["median_ratio_off_over_this"] = statistics.median(ratios) if ratios else None
            summary[name]["ratio_seeds"] = len(ratios)  # seeds where both reached the target (exact ratios)
    return {"target": target, "reference": {k: ref[k] for k in ("best", "trials", "seconds")}, "cap_s": args.cap,
            "seeds": args.seeds, "rows": rows, "summary": summary}


def render(doc: dict) -> str:
    env = doc["environment"]
    md = [f"## Depth as a fidelity (head_first): {doc['task']} ({doc['metric']})", "",
          f"Machine: {env['cpu_count']} CPUs, {env['torch_threads']} torch thread(s), load average at start "
          f"{env['load_average_at_start']}, at end {env.get('load_average_at_end', '?')}", ""]
    fx = doc.get("fixed")
    if fx:
        first = str(list(fx["summary"])[0])
        md += [f"Command: `{doc.get('commands', {}).get('fixed', doc['command'])}`", "",
               f"### Fixed configurations ({len(fx['configs'])}: the first-trial recipe + random "
               f"ones with unfreeze > 0; {doc['epochs']} epochs; the pruner's first rung is epoch {fx['rung']})", ""]
        table = [{"head_first": hf, "mean final": s["mean_final"], "mean best": s["mean_best"],
                  f"vs head_first={first}: wins/ties/losses": "/".join(map(str, s["wins_ties_losses_vs_first"])),
                  "mean diff (points)": 100 * s["mean_diff_vs_first"] if s["mean_diff_vs_first"] is not None else "-",
                  "mean s": s["mean_seconds"],
                  f"Spearman(epoch {fx['rung']}, final)": s["rung_spearman"] if s["rung_spearman"] is not None else "-",
                  "failed": s["failed"]}
                 for hf, s in fx["summary"].items()]
        md += [_util.md_table(table, list(table[0])), ""]
        per = {}
        for r in fx["rows"]:
            p = per.setdefault(r["config"], {"config": r["config"], "backbone": r.get("backbone", ""),
                                             "unfreeze": r.get("unfreeze", ""), "lr": r.get("lr", "")})
            p[f"hf={r['head_first']} final (rung)"] = (f"{r['final']:.3f} ({r['at_rung']:.3f})" if "final" in r
                                                      else "failed")
        rows = list(per.values())
        md += [_util.md_table(rows, list(rows[0])), ""]
    se = doc.get("search")
    if se:
        names = list(se["summary"])
        md += [f"Command: `{doc.get('commands', {}).get('search', doc['command'])}`", "",
               f"### Time to target (a completed trial >= {se['target']:.4f}: 0.5 points below the reference best "
               f"{se['reference']['best']:.4f}); autoft's default search, cap {se['cap_s']:g} s", ""]
        table = []
        for r in se["rows"]:
            t = {"seed": r["seed"]}
            for n in names:
                x = r[n]
                t[f"{n} s / trials (pruned)"] = (f"{x['seconds']:.1f}" + ("" if x["reached"] else " (cap)")
                                                 + f" / {x['trials']} ({x['pruned']})")
            table.append(t)
        md += [_util.md_table(table, list(table[0])), ""]
        if se.get("load_average_note"):
            md += [f"Note: {se['load_average_note']}.", ""]
        for n in names:
            s = se["summary"][n]
            extra = (f"; median ratio off / this over the {s['ratio_seeds']} seeds where both reached it: "
                     f"**{s['median_ratio_off_over_this']:.2f}x**" if s.get("median_ratio_off_over_this") else "")
            md.append(f"- {n}: reached on {s['reached']} of {len(se['rows'])} seeds, median {s['median_s']:.1f} s, "
                      f"median {s['median_trials']} trials{extra}")
        md.append("")
    if doc.get("verdict"):
        md += [f"Verdict: {doc['verdict']}", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits-fewshot")
    ap.add_argument("--part", choices=["fixed", "search", "both"], default="both")
    ap.add_argument("--head-first", type=int, nargs="+", default=[0, 5], help="values compared on fixed configs")
    ap.add_argument("--random-configs", type=int, default=7)
    ap.add_argument("--recipe-backbones", type=int, default=1, help="the first-trial recipe on this many backbones")
    ap.add_argument("--seed", type=int, default=0, help="sampler and initialisation seed of the fixed configurations")
    ap.add_argument("--search-head-first", type=int, nargs="+", default=[5], help="head_first values of the search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--cap", type=float, default=120.0)
    ap.add_argument("--reference", type=Path, default=None,
                    help="bench_search's reference run (default benchmarks/results/search_reference_<task>.json)")
    ap.add_argument("--verdict", default="", help="the conclusion, written into the markdown")
    ap.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, help="only re-render a stored result JSON (with --verdict)")
    args = ap.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        if args.verdict:
            doc["verdict"] = args.verdict
        _util.write(args.render.stem, doc, render(doc), args.render.parent)
        print(render(doc))
        return 0
    _util.setup(args.threads)
    from autoft.engines.base import build_request

    task = bench_search.load_task_with(args.task, args.task_set)
    args.reference = args.reference or RESULTS / f"search_reference_{task.name}.json"
    task_data = task.prepare()
    env = _util.environment()
    req = build_request(task, study_name="depth", n_trials=1)
    doc = {"benchmark": "depth as a fidelity", "task": task.name, "metric": task.metric,
           "epochs": bench_search.task_data_epochs(req), "sizes": task_data.splits.sizes(), "environment": env,
           "command": "python benchmarks/bench_depth.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    path = args.out / f"depth_{task.name}.json"
    if path.is_file():  # one part at a time: keep the other part's figures
        old = json.loads(path.read_text())
        for part in ("fixed", "search"):
            if part in old and args.part not in (part, "both"):
                doc[part] = old[part]
                doc.setdefault("commands", {})[part] = old.get("commands", {}).get(part, old.get("command"))
    t0 = time.perf_counter()
    if args.part in ("fixed", "both"):
        doc["fixed"] = run_fixed(args, task, task_data, req)
        doc.setdefault("commands", {})["fixed"] = doc["command"]
    if args.part in ("search", "both"):
        doc["search"] = run_search(args, task, task_data)
        doc.setdefault("commands", {})["search"] = doc["command"]
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    doc["verdict"] = args.verdict
    env["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    md = render(doc)
    j, m = _util.write(f"depth_{task.name}", doc, md, args.out)
    print(md)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
