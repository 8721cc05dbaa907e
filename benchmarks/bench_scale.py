"""Scale benchmark: CIFAR-10's 60,000 JPEGs at 224 px with mobilenet_v2 (mobilenet_v2_folded).

For 6,000, 20,000 and 60,000 images it measures, each in a fresh process, the peak resident memory of
the whole process tree (the trial's process and its DataLoader workers; the sum of RSS, which counts
pages shared by the forked workers once per process, and the sum of PSS, which counts them once) and the
wall time of

  (a) a head-only trial (unfreeze 0, augment none): the pooled features are computed once by streaming
      the images through the evaluation transform into a feature file on disk, then a second trial reads
      them per batch (the cached trial every later trial of a search is);
  (b) a one-epoch trial with augment: light (unfreeze 2): images decoded, RandomResizedCrop'ed and
      flipped in DataLoader workers per batch, the whole backbone run every step; plus the time the
      training loop waits for its next batch as a share of step time.

The dataset always holds all N images (a table of N paths scanned and loaded lazily, labels, splits over
N), but on a 2-core CPU a 224 px mobilenet_v2 pass over 60,000 images takes far longer than this
benchmark's 15 minutes, so each trial trains on --train images and validates on --val images drawn from
the N; the full-epoch wall time is extrapolated linearly from the measured seconds per image (stated as
such in the results).

    python benchmarks/bench_scale.py                     # writes benchmarks/results/scale.{json,md}
    python benchmarks/bench_scale.py --sizes 6000 --train 256 --val 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOFT_HOME") or ROOT.parent / "shared" / "assets")
TARBALL = ASSETS / "data" / "cifar10-jpg.tar.gz"
BACKBONE = "mobilenet_v2_folded"


# -- the parent: runs each measurement in its own process and watches its memory -----------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process (0, 0 when it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def run_measured(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--result", str(out), *args])
    peak = {"rss": 0, "pss": 0, "procs": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            mems = [_mem(p) for p in _tree(proc.pid)]
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mems))
            peak["pss"] = max(peak["pss"], sum(m[1] for m in mems))
            peak["procs"] = max(peak["procs"], len(mems))
            stop.wait(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    rc = proc.wait()
    stop.set()
    t.join()
    if rc != 0:
        raise SystemExit(f"measurement {args} failed (exit {rc})")
    res = json.loads(out.read_text())
    out.unlink()
    res.update(peak_rss_gb=round(peak["rss"] / 1e9, 3), peak_pss_gb=round(peak["pss"] / 1e9, 3),
               max_processes=peak["procs"])
    return res


# -- the child: one measurement ------------------------------------------------------------------------
def cifar_folder() -> Path:
    folder = Path(os.environ.get("AUTOFT_BENCH_CIFAR", Path(tempfile.gettempdir()) / "autoft-cifar"))
    if not (folder / "train").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(TARBALL), "-C", str(folder)], check=True)
    return folder


def make_table(n: int, folder: Path, out: Path) -> Path:
    """A CSV of n image paths and labels, class-balanced, from train/ then test/."""
    classes = sorted(p.name for p in (folder / "train").iterdir())
    per = n // len(classes)
    rows = []
    for c in classes:
        files = sorted((folder / "train" / c).glob("*.jpg")) + sorted((folder / "test" / c).glob("*.jpg"))
        rows += [(str(f), c) for f in files[:per]]
    with open(out, "w") as f:
        f.write("path,label\n")
        f.writelines(f"{p},{c}\n" for p, c in rows)
    return out


def child(a) -> dict:
    import numpy as np
    import torch

    from autoft.core import FeatureCache, TaskData, TrialConfig, fine_tune_and_score
    from autoft.data import Splits, load_image_table

    tmp = Path(tempfile.mkdtemp(prefix="autoft-bench-"))
    t0 = time.perf_counter()
    data = load_image_table(make_table(a.n, cifar_folder(), tmp / "table.csv")).validate()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(data))
    splits = Splits(np.sort(pick[:a.train]), np.sort(pick[a.train:a.train + a.val]), np.array([], dtype=np.int64))
    td = TaskData(data, splits, name=f"cifar10-{a.n}", num_workers=a.workers)
    cache = FeatureCache(disk=tmp / "features")
    out = {"n": len(data), "mode": a.mode, "load_s": round(load_s, 2), "train_images": a.train,
           "val_images": a.val, "threads": torch.get_num_threads()}
    if a.mode == "a":
        cfg = TrialConfig(backbone=BACKBONE, unfreeze=0, epochs=1, batch_size=64, augment="none", bn="frozen")
        t = time.perf_counter()
        first = fine_tune_and_score(cfg, td, cache=cache)
        out["first_trial_s"] = round(time.perf_counter() - t, 2)  # features computed onto disk + the epoch
        t = time.perf_counter()
        second = fine_tune_and_score(cfg, td, cache=cache)
        out["cached_trial_s"] = round(time.perf_counter() - t, 2)  # features read per batch from disk
        out.update(data=second.data, accuracy=second.score, first_accuracy=first.score, cache=cache.stats())
        per_image = out["first_trial_s"] / (a.train + a.val)
        out["extrapolated_first_trial_s_all_n"] = round(per_image * a.n, 1)
        out["extrapolated_cached_trial_s_all_n"] = round(out["cached_trial_s"] / (a.train + a.val) * a.n, 2)
    else:
        cfg = TrialConfig(backbone=BACKBONE, unfreeze=2, epochs=1, batch_size=32, augment="light", bn="frozen",
                          lr=1e-3)
        t = time.perf_counter()
        res = fine_tune_and_score(cfg, td, cache=cache)
        out["trial_s"] = round(time.perf_counter() - t, 2)
        out.update(data=res.data, accuracy=res.score)
        step_per_image = res.data["step_s"] / a.train
        eval_s = max(0.0, out["trial_s"] - res.data["step_s"])
        out["extrapolated_epoch_s_all_n"] = round(step_per_image * a.n * 0.85 + eval_s / a.val * a.n * 0.15, 1)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out


def markdown(doc: dict) -> str:
    lines = [f"# Scale benchmark: CIFAR-10 JPEGs at 224 px, {BACKBONE}", "",
             f"Machine: {doc['machine']}. DataLoader workers: {doc['workers']}. Each trial trains on "
             f"{doc['train']} and validates on {doc['val']} of the N images (all N are listed, scanned and "
             "indexed); full-N times are extrapolated linearly from the measured seconds per image.", "",
             "| N | run | peak RSS, process tree (GB) | peak PSS (GB) | measured wall (s) | extrapolated to all N (s) "
             "| loader wait / step time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        if r["mode"] == "a":
            wall = f"{r['first_trial_s']} first (features to disk), {r['cached_trial_s']} cached"
            ext = f"{r['extrapolated_first_trial_s_all_n']} / {r['extrapolated_cached_trial_s_all_n']}"
            name = "(a) head only, features on disk"
        else:
            wall, ext, name = f"{r['trial_s']}", f"{r['extrapolated_epoch_s_all_n']}", "(b) 1 epoch, augment light"
        share = f"{100 * r['data'].get('loader_wait_share', 0):.1f} %"
        lines.append(f"| {r['n']:,} | {name} | {r['peak_rss_gb']} | {r['peak_pss_gb']} | {wall} | {ext} | {share} |")
    lines += ["", "Memory growth 20,000 → 60,000 images: " + ", ".join(
        f"{k} {v:+.1f} %" for k, v in doc["growth_20k_to_60k_pct"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[6000, 20000, 60000])
    ap.add_argument("--train", type=int, default=768)
    ap.add_argument("--val", type=int, default=192)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["a", "b"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("AUTOFT_HOME", str(ASSETS))
    if a.child:
        a.result.write_text(json.dumps(child(a)))
        return
    from autoft.data.stream import default_workers

    workers = default_workers() if a.workers is None else a.workers
    runs = []
    for n in a.sizes:
        for mode in ("a", "b"):
            r = run_measured(["--mode", mode, "--n", str(n), "--train", str(a.train), "--val", str(a.val),
                              "--workers", str(workers)])
            print(json.dumps(r), flush=True)
            runs.append(r)
    growth = {}
    for mode in ("a", "b"):
        by_n = {r["n"]: r for r in runs if r["mode"] == mode}
        if 20000 in by_n and 60000 in by_n:
            growth[f"({mode}) RSS"] = 100 * (by_n[60000]["peak_rss_gb"] / by_n[20000]["peak_rss_gb"] - 1)
            growth[f"({mode}) PSS"] = 100 * (by_n[60000]["peak_pss_gb"] / by_n[20000]["peak_pss_gb"] - 1)
    doc = {"machine": f"{os.cpu_count()} CPU cores, torch {__import__('torch').__version__}", "workers": workers,
           "train": a.train, "val": a.val, "backbone": BACKBONE, "runs": runs,
           "growth_20k_to_60k_pct": {k: round(v, 1) for k, v in growth.items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    (a.out / "scale.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
