"""Other speed sources for the same-work list, measured: would any of them close the gap to 3x?

The frozen-prefix cache removes the frozen forward pass only (``profile_speed.py``: ceiling 1.8x on
the default digits space).  This times one training step (forward + backward + AdamW) of a whole
CIFAR ResNet on a digits-sized batch three ways, in one process:

* ``2 threads``: as the plain loop and autoft's core run on this 2-core machine;
* ``channels_last``: the same with NHWC memory format (oneDNN's preferred layout on CPU; not
  bit-identical to NCHW, so it would also break the equal-scores check of the benchmark);
* ``1 thread``: what each of two side-by-side trial processes would get.  Two such processes give
  ``2 x t(2 threads) / t(1 thread)`` times the throughput of one 2-thread process.

    python benchmarks/profile_alternatives.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def step_seconds(name: str, threads: int, channels_last: bool, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from autoft.zoo import get_backbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bb = get_backbone(name)
    bb.set_unfreeze(bb.num_stages)
    model = torch.nn.Sequential(*bb.stages, bb.pool, torch.nn.Linear(bb.feature_dim, 10))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["resnet20", "resnet32", "resnet44", "resnet56"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args()
    _util.setup(None)

    rows = []
    for name in args.backbones:
        t2 = step_seconds(name, 2, False, args.batch, args.steps)
        tcl = step_seconds(name, 2, True, args.batch, args.steps)
        t1 = step_seconds(name, 1, False, args.batch, args.steps)
        row = {"backbone": name, "ms_2_threads": round(1e3 * t2, 1), "ms_channels_last": round(1e3 * tcl, 1),
               "ms_1_thread": round(1e3 * t1, 1), "channels_last_speedup": round(t2 / tcl, 2),
               "two_processes_speedup": round(2 * t2 / t1, 2)}
        rows.append(row)
        print(row, flush=True)
    best_cl = max(r["channels_last_speedup"] for r in rows)
    best_pp = max(r["two_processes_speedup"] for r in rows)
    cmd = "python benchmarks/profile_alternatives.py " + " ".join(sys.argv[1:])
    doc = {"benchmark": "other speed sources", "batch": args.batch, "steps": args.steps, "rows": rows,
           "command": cmd, "environment": _util.environment()}
    summary = f"At best channels_last gives {best_cl}x and two single-thread processes {best_pp}x the " \
              "throughput of one 2-thread process."
    profile = _util.ROOT / "benchmarks" / "results" / "profile_speed.json"
    if profile.is_file():  # the cache's ceiling on the same-work list, from profile_speed.py
        ceiling = json.loads(profile.read_text())["summary"]["ceiling_speedup_free_cache"]
        doc["cache_ceiling"] = ceiling
        doc["all_combined_ceiling"] = round(ceiling * best_cl * best_pp, 2)
        summary += (f" Stacked on a free prefix cache (ceiling {ceiling}x, `benchmarks/results/profile_speed.md`) "
                    f"the three together would give at most {doc['all_combined_ceiling']}x.")
    md = (f"## Other speed sources for the same-work list (training step, batch {args.batch})\n\n"
          f"Command: `{cmd}`\n\n" + _util.md_table(rows, list(rows[0])) + "\n\n" + summary + "\n")
    j, m = _util.write("profile_alternatives", doc, md, args.out)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
