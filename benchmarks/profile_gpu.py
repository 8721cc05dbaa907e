"""Where a GPU trial's time goes, on real photos (needs a CUDA GPU).

Runs trials of one ImageNet backbone on an image folder (default: the ants/bees train/ photos under
AUTOFT_HOME) on the GPU: head-only, 2 stages unfrozen without augmentation (in memory: cached prefix), and 2
stages with augmentation (streamed: decoded and transformed per batch in DataLoader workers). For each it
prints the seconds of every epoch, the data mode, the loader's wait fraction, and for the augmented trial
the 20 functions with the most own time (cProfile). Writes the text to ``--out``.

    python benchmarks/profile_gpu.py [--folder DIR] [--backbone mobilenet_v2_folded] [--out FILE]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch


class EpochTimes:
    def __init__(self):
        self.t0 = None
        self.times = []

    def on_train_start(self):
        self.t0 = time.perf_counter()

    def report(self, epoch, score, metrics):
        now = time.perf_counter()
        self.times.append(round(now - self.t0, 3))
        self.t0 = now
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default=os.path.join(os.environ.get("AUTOFT_HOME", "."), "data", "hymenoptera", "train"))
    ap.add_argument("--backbone", default="mobilenet_v2_folded")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from autoft.core import FeatureCache, TaskData, fine_tune_and_score
    from autoft.data import load_image_folder, stratified_split

    lines = []

    def say(*a):
        msg = " ".join(str(x) for x in a)
        print(msg, flush=True)
        lines.append(msg)

    t = time.perf_counter()
    from pathlib import Path

    data = load_image_folder(Path(args.folder))
    splits = stratified_split(data.labels, val=0.25, test=0.0, seed=0, source=args.folder)
    task = TaskData(data, splits, metric="accuracy", device="cuda", name="profile")
    say(f"cudnn.benchmark {'off' if os.environ.get('AUTOFT_CUDNN_BENCHMARK') == '0' else 'on'}")
    say(f"loaded {len(data)} images in {time.perf_counter() - t:.1f} s; {torch.cuda.get_device_name(0)}, cpus {os.cpu_count()}")
    cache = FeatureCache(disk=False)
    base = dict(backbone=args.backbone, lr=1e-3, epochs=args.epochs, batch_size=16, seed=0)
    for name, extra in [("head only", dict(unfreeze=0)), ("unfreeze 2", dict(unfreeze=2)),
                        ("unfreeze 2 again (warm)", dict(unfreeze=2)),
                        ("unfreeze 2, augment strong", dict(unfreeze=2, augment="strong"))]:
        rep = EpochTimes()
        prof = cProfile.Profile() if "augment" in name else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        res = fine_tune_and_score({**base, **extra}, task, rep, cache=cache)
        if prof:
            prof.disable()
        say(f"{name}: {time.perf_counter() - t:.2f} s total, epochs {rep.times}, score {res.score:.3f}, data {res.data}")
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
            say(s.getvalue())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
