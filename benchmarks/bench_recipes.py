"""First-trial recipes compared: validation score of fixed fine-tuning recipes over several seeds and splits.

How the ``first_trials`` recipe of ``autoft/builtin/search_spaces/cifar_resnets.yaml`` was chosen (split seed 0) and
checked (split seeds 1 and 2, not used to choose it), and why ``text_minilm.yaml`` keeps the default
(on sms-spam four recipes differ by less than the noise between seeds).  Each recipe runs on one
backbone with half of its stages unfrozen (``--unfreeze`` to choose); every other parameter is
TrialConfig's default.  Scores only, no timing: the machine's
load does not matter.

    python benchmarks/bench_recipes.py                         # the four recipes, split seed 0, 5 seeds
    python benchmarks/bench_recipes.py --splits 1 2 --seeds 0 1 2 --recipes old new
    python benchmarks/bench_recipes.py --task sms-spam --backbone minilm --unfreeze 1 --seeds 0 1 2 \
        --recipes text_default text_b16 text_lr3e-4_head30x_b16 text_mlp_b32   # MiniLM, last layer
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

RECIPES = {
    "old": {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": 64},  # TrialConfig's defaults
    "lr5e-3_head2x_b32": {"lr": 5e-3, "head_lr_mult": 2.0, "batch_size": 32},
    "lr1e-3_head10x_b32": {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": 32},
    "new": {"lr": 3e-3, "head_lr_mult": 3.0, "batch_size": 32},  # cifar_resnets.yaml first_trials
    # text (MiniLM, last layer unfrozen): --task sms-spam --backbone minilm --unfreeze 1 --recipes text_...
    "text_default": {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": 64},  # TrialConfig's defaults
    "text_b16": {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": 16},
    "text_lr3e-4_head30x_b16": {"lr": 3e-4, "head_lr_mult": 30.0, "batch_size": 16},
    "text_mlp_b32": {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": 32, "head": "mlp"},
}
IMAGE_RECIPES = ["old", "lr5e-3_head2x_b32", "lr1e-3_head10x_b32", "new"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits-fewshot")
    ap.add_argument("--backbone", default="resnet32")
    ap.add_argument("--recipes", nargs="+", default=IMAGE_RECIPES, choices=list(RECIPES))
    ap.add_argument("--unfreeze", type=int, default=None, help="stages to unfreeze (default: half the backbone's)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0], help="split seeds of the task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="initialisation seeds")
    ap.add_argument("--epochs", type=int, default=None, help="default: the task's max_epochs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=_util.OUT)
    args = ap.parse_args()
    _util.setup(args.threads)

    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.space import num_stages
    from autoft.task import load_task

    base = load_task(args.task)
    epochs = args.epochs or base.budget.max_epochs
    unfreeze = args.unfreeze if args.unfreeze is not None else max(1, round(num_stages(args.backbone) / 2))
    rows = []
    t0 = time.perf_counter()
    for split in args.splits:
        task = base.model_copy(update={"split": base.split.model_copy(update={"seed": split})})
        data = task.prepare()
        cache = FeatureCache(disk=False)
        for name in args.recipes:
            scores = []
            for seed in args.seeds:
                cfg = dict(backbone=args.backbone, unfreeze=unfreeze,
                           epochs=epochs, seed=seed, **RECIPES[name])
                scores.append(round(fine_tune_and_score(cfg, data, cache=cache).score, 4))
            row = {"split": split, "recipe": name, "head": "linear", **RECIPES[name], "scores": scores,
                   "mean": round(statistics.mean(scores), 4), "min": min(scores)}
            rows.append(row)
            print(f"split {split} {name:20s} {scores} mean {row['mean']:.4f}", flush=True)
    cmd = "python benchmarks/bench_recipes.py " + " ".join(sys.argv[1:])
    doc = {"benchmark": "first-trial recipes", "task": args.task, "backbone": args.backbone, "epochs": epochs,
           "metric": base.metric, "rows": rows, "command": cmd, "environment": _util.environment(),
           "total_s": round(time.perf_counter() - t0, 1)}
    doc["unfreeze"] = unfreeze
    md = (f"## First-trial recipes: {args.task} ({base.metric}), {args.backbone}, {unfreeze} of "
          f"{num_stages(args.backbone)} stages unfrozen, {epochs} epochs\n\n"
          f"Command: `{cmd}`\n\n"
          + _util.md_table([{**r, "scores": " / ".join(f"{s:.3f}" for s in r["scores"])} for r in rows],
                           ["split", "recipe", "lr", "head_lr_mult", "batch_size", "head", "scores", "mean", "min"]) + "\n")
    name = f"recipes_{args.task}" + ("" if args.splits == [0] else "_splits" + "-".join(map(str, args.splits)))
    j, m = _util.write(name, doc, md, args.out)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
