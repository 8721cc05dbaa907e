"""Profile behind the same-work speed-up: what a frozen-prefix cache can and cannot remove.

For every backbone of the digits space it times, over one epoch of the digits training split,

* ``forward``: each stage's forward pass with the stage frozen (what the plain loop recomputes every
  epoch for the frozen stages, and what the cache removes);
* ``train``: each stage's forward + backward + AdamW step with the stage trainable (paid by the plain
  loop and by the cached core alike).

From these it predicts, for the configuration list of ``bench_speed.py`` (same sampler and seed),
the plain loop's time, the cached core's time, and the ceiling: the speed-up of a cache that were
free (prefix features for nothing).  If the ceiling is below a target, no cache implementation can
reach it for that list; only a different list (shallower unfreezing) or cheaper training can.

    python benchmarks/profile_speed.py                # 24 configurations, 3 epochs, as bench_speed.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def stage_costs(backbone, x, batch: int = 64) -> tuple[list[float], list[float]]:
    """Seconds per epoch over ``x`` for every stage: frozen forward, and trainable forward+backward+step."""
    import torch

    fwd, train = [], []
    h = x
    for i in range(backbone.num_stages):
        stage = backbone.stages[i]
        stage.eval()
        for p in stage.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = torch.cat([stage(h[j:j + batch]) for j in range(0, len(h), batch)])
        fwd.append(time.perf_counter() - t0)
        stage.train()
        for p in stage.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        for j in range(0, len(h), batch):
            xb = h[j:j + batch].clone().requires_grad_(True)  # a middle stage also passes gradients back
            loss = stage(xb).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train.append(time.perf_counter() - t0)
        stage.eval()
        for p in stage.parameters():
            p.requires_grad_(False)
        h = out
    return fwd, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-configs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args(argv)
    _util.setup(args.threads)

    import numpy as np
    import torch

    from autoft.core import FeatureCache
    from autoft.engines.base import build_request
    from autoft.task import load_task

    task = load_task("digits")
    req = build_request(task)
    configs = _util.sample_configs(req.space, args.n_configs, args.seed, {"seed": task.seed, "epochs": args.epochs})
    td = task.prepare()
    cache = FeatureCache(disk=False)
    train_idx = torch.from_numpy(np.sort(td.splits.train)).long()
    val_frac = len(td.splits.val) / len(td.splits.train)  # validation forward, every epoch, per train forward
    env = _util.environment()
    profile = {}
    for name in req.space.backbones:
        bb = cache.backbone(name)
        encoded, _ = cache.encoded(td.data, bb.preprocessing)
        fwd, train = stage_costs(bb, encoded[train_idx])
        profile[name] = {"stages": bb.num_stages, "forward_s": [round(v, 4) for v in fwd],
                         "train_s": [round(v, 4) for v in train],
                         "train_over_forward": round(sum(train) / sum(fwd), 2)}
        print(f"{name}: {bb.num_stages} stages, forward {sum(fwd):.2f}s/epoch, train every stage "
              f"{sum(train):.2f}s/epoch (x{sum(train) / sum(fwd):.2f})", flush=True)

    rows, seen = [], set()
    for cfg in configs:
        p = profile[cfg.backbone]
        f, t, s, k = p["forward_s"], p["train_s"], p["stages"], cfg.unfreeze
        frozen_f, train_t, train_f = sum(f[:s - k]), sum(t[s - k:]), sum(f[s - k:])
        plain = args.epochs * (frozen_f + train_t + val_frac * sum(f))
        suffix = args.epochs * (train_t + val_frac * train_f)
        key = (cfg.backbone, s - k)
        prefix = 0.0 if key in seen or k == s else (1 + val_frac) * frozen_f  # computed once per split point
        seen.add(key)
        rows.append({"backbone": cfg.backbone, "unfreeze": k, "stages": s, "plain_s": round(plain, 3),
                     "cached_s": round(suffix + prefix, 3), "free_cache_s": round(suffix, 3),
                     "frozen_forward_share": round(args.epochs * frozen_f * (1 + val_frac) / plain, 3)})
    plain = sum(r["plain_s"] for r in rows)
    summary = {"configs": len(rows), "epochs": args.epochs, "predicted_plain_s": round(plain, 1),
               "predicted_cached_s": round(sum(r["cached_s"] for r in rows), 1),
               "predicted_speedup": round(plain / sum(r["cached_s"] for r in rows), 2),
               "ceiling_speedup_free_cache": round(plain / sum(r["free_cache_s"] for r in rows), 2),
               "frozen_forward_share_of_plain": round(
                   sum(r["frozen_forward_share"] * r["plain_s"] for r in rows) / plain, 3),
               "mean_unfreeze_fraction": round(sum(r["unfreeze"] / r["stages"] for r in rows) / len(rows), 3)}
    doc = {"benchmark": "profile of the same-work speed-up", "task": task.name,
           "command": "python benchmarks/profile_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": env, "profile": profile, "summary": summary, "configs": rows}
    md = [f"## Where the same-work time goes (digits, {len(rows)} configurations of bench_speed, {args.epochs} epochs)",
          "", f"Command: `{doc['command']}`  ",
          f"Machine: {env['cpu_count']} CPUs, {env['torch_threads']} torch thread(s)", "",
          _util.md_table([{"backbone": n, "stages": p["stages"], "forward s/epoch": round(sum(p["forward_s"]), 2),
                           "train s/epoch (all stages)": round(sum(p["train_s"]), 2),
                           "train / forward": p["train_over_forward"]} for n, p in profile.items()],
                         ["backbone", "stages", "forward s/epoch", "train s/epoch (all stages)", "train / forward"]),
          "", _util.md_table([{
              "predicted plain s": summary["predicted_plain_s"], "predicted cached s": summary["predicted_cached_s"],
              "predicted speed-up": summary["predicted_speedup"],
              "ceiling (free cache)": summary["ceiling_speedup_free_cache"],
              "frozen forward share of plain": summary["frozen_forward_share_of_plain"],
              "mean unfreeze fraction": summary["mean_unfreeze_fraction"]}],
              ["predicted plain s", "predicted cached s", "predicted speed-up", "ceiling (free cache)",
               "frozen forward share of plain", "mean unfreeze fraction"]), "",
          "The frozen forward share is all a prefix cache can remove; the rest (training the unfrozen "
          "stages, scoring through them) is paid by both.", ""]
    j, m = _util.write("profile_speed", doc, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
