"""Training losses compared on an imbalanced task: ce, weighted (class-weighted ce) and focal.

One fixed, otherwise good configuration (MiniLM head-only, ``unfreeze: 0``: a linear head on the
cached frozen features, so a run takes seconds), the same for every loss; only ``loss`` (and
``focal_gamma`` for focal) changes.  Over several initialisation seeds it reports the task's metric
(sms-spam: f1_pos) on the validation split and on the held-out test split, mean and spread, plus
spam precision and recall.  ``--spam-fractions`` also subsamples the positive class in the
*training split only* (e.g. 0.03 = 3 % spam instead of the natural 13 %); validation and test keep
the task's own distribution.  Scores only, so the machine's load does not matter.

    nice -n 5 python benchmarks/bench_losses.py                     # 5 seeds, natural + 3 % spam, focal γ 2 and 1
    python benchmarks/bench_losses.py --seeds 0 1 2 --spam-fractions natural --gammas 0.5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's autoft, installed or not
import _util

# the fixed configuration: MiniLM, head only (cached features), an MLP head (256 wide) at head lr 3e-2,
# 10 epochs: the best of 12 head-only variants tried with loss=ce (3 or 10 epochs, head lr 1e-2/3e-2/1e-1,
# linear or mlp head; 2 seeds; val f1_pos 0.90-0.95), so the baseline is not handicapped
CONFIG = {"backbone": "minilm", "unfreeze": 0, "head": "mlp", "head_width": 256, "lr": 3e-3, "head_lr_mult": 10.0,
          "batch_size": 32, "optimizer": "adamw", "weight_decay": 1e-4, "schedule": "cosine", "epochs": 10}


def subsample_positive(task_data, fraction: float, seed: int = 0):
    """A copy of ``task_data`` whose training split keeps only enough positives for ``fraction`` of it."""
    import dataclasses

    splits = task_data.splits
    labels = task_data.data.labels[splits.train]
    pos = splits.train[labels == task_data.positive_index]
    neg = splits.train[labels != task_data.positive_index]
    keep = round(fraction / (1 - fraction) * len(neg))
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(pos, min(keep, len(pos)), replace=False))
    train = np.sort(np.concatenate([neg, pos]))
    return dataclasses.replace(task_data, splits=dataclasses.replace(splits, train=train))


def spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sms-spam")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--spam-fractions", nargs="+", default=["natural", "0.03"],
                    help="'natural' (the task's split) and/or fractions of positives kept in the training split")
    ap.add_argument("--gammas", type=float, nargs="+", default=[2.0, 1.0], help="focal_gamma values of loss=focal")
    ap.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=_util.ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    _util.setup(args.threads)

    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.task import load_task

    task = load_task(args.task)
    epochs = args.epochs
    t0 = time.perf_counter()
    base = task.prepare()
    cache = FeatureCache()
    prep_s = time.perf_counter() - t0
    metric = task.metric
    rows, runs = [], []
    for frac in args.spam_fractions:
        td = base if frac == "natural" else subsample_positive(base, float(frac))
        tr = base.data.labels[td.splits.train]
        n_pos = int((tr == base.positive_index).sum())
        setting = "natural" if frac == "natural" else f"{float(frac):.0%} positive"
        for loss, extra in [("ce", {}), ("weighted", {})] + [("focal", {"focal_gamma": g}) for g in args.gammas]:
            val, test, vp, vr, secs = [], [], [], [], []
            for seed in args.seeds:
                cfg = {**CONFIG, "epochs": epochs, "seed": seed, "loss": loss, **extra}
                t = time.perf_counter()
                res = fine_tune_and_score(cfg, td, cache=cache, test=True)
                secs.append(time.perf_counter() - t)
                val.append(res.metrics[metric])
                test.append(res.test_metrics[metric])
                vp.append(res.metrics.get("precision_pos", float("nan")))
                vr.append(res.metrics.get("recall_pos", float("nan")))
                runs.append({"setting": setting, "loss": loss, **extra, "seed": seed, "val": res.metrics,
                             "test": res.test_metrics, "seconds": round(secs[-1], 2)})
            row = {"training split": setting, "train positives": f"{n_pos}/{len(tr)}", "loss":
                   loss + (f" (γ={extra['focal_gamma']:g})" if loss == "focal" else ""),
                   f"val {metric}": f"{statistics.mean(val):.3f} ± {spread(val):.3f}",
                   f"test {metric}": f"{statistics.mean(test):.3f} ± {spread(test):.3f}",
                   "val precision": round(statistics.mean(vp), 3), "val recall": round(statistics.mean(vr), 3),
                   "val_mean": statistics.mean(val), "val_sd": spread(val), "test_mean": statistics.mean(test),
                   "test_sd": spread(test), "val_scores": [round(v, 4) for v in val],
                   "test_scores": [round(v, 4) for v in test], "s/run": round(statistics.mean(secs), 2)}
            rows.append(row)
            print(f"{setting:14s} {row['loss']:14s} val {row[f'val {metric}']}  test {row[f'test {metric}']}  "
                  f"P {row['val precision']} R {row['val recall']}  {row['s/run']} s/run", flush=True)
    cmd = "python benchmarks/bench_losses.py " + " ".join(sys.argv[1:])
    doc = {"benchmark": "training losses", "task": args.task, "metric": metric, "config": {**CONFIG, "epochs": epochs},
           "focal_gammas": args.gammas, "seeds": args.seeds, "rows": rows, "runs": runs, "command": cmd,
           "prepare_s": round(prep_s, 1), "total_s": round(time.perf_counter() - t0, 1),
           "environment": _util.environment()}
    cols = ["training split", "train positives", "loss", f"val {metric}", f"test {metric}", "val precision",
            "val recall", "s/run"]
    md = (f"## Training losses: {args.task} ({metric}), MiniLM head-only (unfreeze 0, cached "
          f"features, MLP head), {epochs} epochs, seeds {', '.join(map(str, args.seeds))}\n\n"
          f"Command: `{cmd}`\n\nMean ± standard deviation over the seeds; validation and test keep the task's "
          "own class distribution (only the training split is subsampled). Fixed configuration: "
          f"`{ {**CONFIG, 'epochs': epochs} }`.\n\n" + _util.md_table(rows, cols) + "\n")
    name = "losses" if args.task == "sms-spam" else f"losses_{args.task}"
    j, m = _util.write(name, doc, md, args.out)
    print(f"wrote {j} and {m} ({doc['total_s']} s)")


if __name__ == "__main__":
    main()
