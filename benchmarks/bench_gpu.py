"""GPU benchmark of autoft's trial loop (needs a CUDA GPU; exits with a message on a machine without one).

Measures, on one CUDA GPU, and writes ``benchmarks/results/gpu-<gpu name>-<date>.json`` (with the GPU's name,
torch and CUDA versions):

1. **Trial loop vs a plain AMP loop**: training throughput (images/s) of ``fine_tune_and_score`` on an
   ImageNet backbone (default MobileNetV2, the offline weights; whole network trained, ``unfreeze`` = all
   stages, use_cache=False: every step runs the full network) against a strong hand-written training loop
   (:func:`plain_amp_loop`: images on the GPU once, ``torch.autocast`` (bf16 where native, else fp16 +
   GradScaler), channels-last, fused AdamW, cuDNN autotuning as autoft sets it, the loss read once an epoch; warmed up on a whole epoch, as autoft is), on the same
   model, batch size and data (random images of the preset's size). Target: >= 0.9x.
2. **Packing**: 4 trials of ``--n-jobs 4`` sharing the GPU (Optuna threads, GpuAdmission) vs the same 4
   trials one at a time: wall time of each.
3. **Memory**: ``torch.cuda.max_memory_allocated`` high-water marks of a head-only trial, a 1-stage and an
   all-stage fine-tune, in fp32 and bf16.
4. **Head-only cached path**: seconds per trial of head-only trials on cached pooled features (the
   frozen prefix computed once on the GPU, then kept on the CPU).

Usage::

    python benchmarks/bench_gpu.py [--backbone mobilenet_v2_folded] [--batch-size 64] [--images 2048] [--quick]

Weights come from AUTOFT_HOME like every autoft run (offline assets: ``AUTOFT_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.perf_counter()  # progress lines: seconds since the start


def need_cuda() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU: torch sees none on this machine "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was measured or written.",
              file=sys.stderr)
        raise SystemExit(2)


def synthetic_task(n: int, size: int, classes: int = 10, device: str = "cuda"):
    """A labelled image task of ``n`` random images (uint8 HWC arrays, as autoft's loaders produce)."""
    from autoft.core import TaskData
    from autoft.data import LabelledData, stratified_split

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    labels = rng.integers(0, classes, n)
    data = LabelledData(images, labels, [f"c{i}" for i in range(classes)], modality="image")
    splits = stratified_split(labels, val=0.1, test=0.0, seed=0, source="bench")
    return TaskData(data, splits, metric="accuracy", device=device, name="bench")


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def plain_amp_loop(backbone_name: str, encoded: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   epochs: int, precision: str) -> float:
    """The reference, a strong hand-written loop: the torchvision model + a linear head, the training images on
    the GPU once (channels-last), autocast, fused AdamW, cudnn.benchmark, and the loss read once an epoch (no
    wait for the GPU per step). No validation pass."""
    from autoft.core import FeatureCache

    from autoft.core.precision import configure_backends

    configure_backends("cuda")  # cuDNN autotuning as autoft sets it
    bb = FeatureCache(disk=False).backbone(backbone_name).set_unfreeze(0)
    bb.set_unfreeze(bb.num_stages)
    model = torch.nn.Sequential(bb, torch.nn.Linear(bb.feature_dim, int(labels.max()) + 1)).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    x_all = encoded.cuda().contiguous(memory_format=torch.channels_last)
    y_all = labels.cuda()
    n = len(encoded)
    model.train()

    def run():
        for _ in range(epochs):
            perm = torch.randperm(n, device="cuda")
            total = torch.zeros((), device="cuda")
            for i in range(0, n, batch_size):
                b = perm[i:i + batch_size]
                x, y = x_all[b].contiguous(memory_format=torch.channels_last), y_all[b]
                with torch.autocast("cuda", dtype=dtype):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.detach()
            total.item()  # the epoch's loss, read once

    _, secs = timed(run)
    return n * epochs / secs


def autoft_loop(backbone_name: str, task, batch_size: int, epochs: int, precision: str) -> tuple[float, dict]:
    from autoft.core import FeatureCache, fine_tune_and_score

    cache = FeatureCache(disk=False)
    bb = cache.backbone(backbone_name)
    cfg = dict(backbone=backbone_name, unfreeze=bb.num_stages, lr=1e-4, epochs=epochs, batch_size=batch_size,
               precision=precision, seed=0)
    n_train = len(task.splits.train)
    fine_tune_and_score({**cfg, "epochs": 1}, task, cache=cache, use_cache=False)  # warm-up (cuDNN autotuning)
    res, secs = timed(lambda: fine_tune_and_score(cfg, task, cache=cache, use_cache=False))
    return n_train * epochs / secs, {"seconds": secs, "epochs": res.epochs_run}


def peak_memory(backbone_name: str, task, batch_size: int) -> dict:
    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.core.gpu import release_memory

    cache = FeatureCache(disk=False)
    stages = cache.backbone(backbone_name).num_stages
    out = {}
    for unfreeze in (0, 1, stages):
        for precision in ("fp32", "bf16"):
            release_memory("cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fine_tune_and_score(dict(backbone=backbone_name, unfreeze=unfreeze, epochs=1, batch_size=batch_size,
                                     precision=precision), task, cache=cache)
            out[f"unfreeze={unfreeze},{precision}"] = {
                "peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                "after_mib": round((torch.cuda.memory_allocated() - base) / 2**20, 1)}
    return out


def head_only_cached(backbone_name: str, task, trials: int) -> dict:
    from autoft.core import FeatureCache, fine_tune_and_score

    cache = FeatureCache(disk=False)
    cfg = dict(backbone=backbone_name, unfreeze=0, epochs=5, batch_size=64)
    _, first = timed(lambda: fine_tune_and_score(cfg, task, cache=cache))
    secs = []
    for i in range(trials):
        _, s = timed(lambda: fine_tune_and_score({**cfg, "seed": i + 1, "lr": 1e-3 * (i + 1)}, task, cache=cache))
        secs.append(s)
    return {"first_trial_s": round(first, 3), "cached_trial_s_median": round(float(np.median(secs)), 4),
            "trials": trials}


def packing(backbone_name: str, task, batch_size: int, jobs: int = 4) -> dict:
    """4 trials one at a time vs 4 threads sharing the GPU through the admission controller."""
    from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
    from autoft.core.gpu import GpuAdmission, PackedTrials

    cache = FeatureCache(disk=False)
    cfgs = [TrialConfig(backbone=backbone_name, unfreeze=2, epochs=2, batch_size=batch_size, seed=i, lr=1e-4 * (i + 1))
            for i in range(jobs)]
    fine_tune_and_score(cfgs[0], task, cache=cache)  # warm-up: weights, prefix cache, cuDNN autotuning
    _, serial = timed(lambda: [fine_tune_and_score(c, task, cache=cache) for c in cfgs])
    packed = PackedTrials(GpuAdmission.for_device("cuda", max_trials=jobs), "cuda")
    errors = []

    def one(c):
        try:
            with packed.run(c, cache, task.data):
                fine_tune_and_score(c, task, cache=cache)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def run():
        threads = [threading.Thread(target=one, args=(c,)) for c in cfgs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    torch.cuda.reset_peak_memory_stats()
    _, together = timed(run)
    return {"trials": jobs, "one_at_a_time_s": round(serial, 2), "packed_s": round(together, 2),
            "speedup": round(serial / together, 2), "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "measured_need_mib": {str(k): round(v / 2**20, 1) for k, v in packed.admission.known.items()},
            "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v2_folded")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer images and trials (a smoke run)")
    ap.add_argument("--sections", default="throughput,memory,head_only,packing",
                    help="comma-separated: throughput, memory, head_only, packing (default: all)")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu-<name>-<date>.json)")
    args = ap.parse_args(argv)
    need_cuda()
    global T0
    T0 = time.perf_counter()

    from autoft.core import FeatureCache
    from autoft.core.precision import resolve_precision

    n = 256 if args.quick else args.images
    name = torch.cuda.get_device_name(0)
    precision = resolve_precision("auto", "cuda")
    if precision == "fp32":
        precision = "fp16"  # a GPU without native bf16: compare AMP against AMP
    pre = FeatureCache(disk=False).backbone(args.backbone).preprocessing
    task = synthetic_task(n, pre.input_size or 224)
    encoded, _ = FeatureCache(disk=False).encoded(task.data, pre)
    labels = torch.from_numpy(task.data.labels).long()
    train = torch.from_numpy(task.splits.train).long()

    doc = {"gpu": name, "capability": list(torch.cuda.get_device_capability(0)),
           "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": _dt.datetime.now().isoformat(timespec="seconds"), "backbone": args.backbone,
           "batch_size": args.batch_size, "images": n, "precision": precision}
    sections = set(args.sections.split(","))
    import os

    if "throughput" in sections:
        # the whole-network comparison runs on encoded images in memory, like the reference (autoft streams images
        # above its memory budget, 1 GiB by default: 2048 images at 224 px are 1.2 GB); streaming is its own figure
        os.environ["AUTOFT_MEMORY_BUDGET_MB"] = str(max(1024, encoded.numel() * 4 // 2**20 * 2))
        plain_amp_loop(args.backbone, encoded[train], labels[train], args.batch_size, 1, precision)  # warm-up: every shape
        ref = plain_amp_loop(args.backbone, encoded[train], labels[train], args.batch_size, args.epochs, precision)
        ours, _ = autoft_loop(args.backbone, task, args.batch_size, args.epochs, precision)
        print(f"[{time.perf_counter() - T0:6.1f} s] throughput in memory: {ours:.0f} vs {ref:.0f} images/s", flush=True)
        variants = {}
        if not args.quick:  # where a step's time goes: precision and memory format of autoft's loop
            for prec in ("bf16", "fp32"):
                for nhwc in ("1", "0"):
                    os.environ["AUTOFT_CHANNELS_LAST"] = nhwc
                    ips, _ = autoft_loop(args.backbone, task, args.batch_size, 1, prec)
                    variants[f"{prec},{'channels_last' if nhwc == '1' else 'contiguous'}"] = round(ips, 1)
            os.environ.pop("AUTOFT_CHANNELS_LAST", None)
        os.environ["AUTOFT_MEMORY_BUDGET_MB"] = "1"  # above the budget: decoded and transformed in DataLoader workers
        streamed, _ = autoft_loop(args.backbone, task, args.batch_size, 1, precision)
        os.environ.pop("AUTOFT_MEMORY_BUDGET_MB")
        print(f"[{time.perf_counter() - T0:6.1f} s] streamed: {streamed:.0f} images/s", flush=True)
        doc["throughput"] = {"plain_amp_images_per_s": round(ref, 1), "autoft_images_per_s": round(ours, 1),
                             "ratio": round(ours / ref, 3), "target": 0.9,
                             "note": "in memory (encoded images on the GPU for the trial); autoft's figure includes "
                                     "its per-epoch validation pass",
                             "autoft_variants_images_per_s": variants,
                             "autoft_streamed_images_per_s": round(streamed, 1),
                             "streamed_note": "images above the memory budget: decoded, resized and normalised per "
                                              "batch in DataLoader worker processes (one epoch)"}
    if "memory" in sections:
        doc["memory"] = peak_memory(args.backbone, task, args.batch_size)
        print(f"[{time.perf_counter() - T0:6.1f} s] memory", flush=True)
    if "head_only" in sections:
        doc["head_only_cached"] = head_only_cached(args.backbone, task, 5 if args.quick else 20)
        print(f"[{time.perf_counter() - T0:6.1f} s] head-only cached", flush=True)
    if "packing" in sections:
        doc["packing"] = packing(args.backbone, task, args.batch_size)
        print(f"[{time.perf_counter() - T0:6.1f} s] packing", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"gpu-{slug}-{_dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
