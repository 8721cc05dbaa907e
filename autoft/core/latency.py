"""Inference latency and size of a trial's model (backbone + head), measured once per architecture.

A trial's model is its backbone (stages, then pool) followed by its head. Latency depends on that
architecture only, never on the trained weights, so it is measured on the backbone as the zoo builds
it and a head of the trial's shape, and cached per architecture key in the :class:`LatencyMeter`
(one per process, :func:`default_meter`): a configuration that differs only in its training recipe
(learning rate, unfrozen stages, optimizer, epochs, dropout, ...) costs nothing.

What is measured (``torch.inference_mode``, eval mode, float32):

* the forward latency at batch 1 and batch 64 on the CPU with one intra-op thread (``AUTOFT_LATENCY_THREADS``
  sets another count; recorded), and, when the task runs on a CUDA device, on that GPU too (synchronised
  around every run). One thread because the figure must compare architectures, not machines or loads:
  with two threads on two cores that other processes share, every OpenMP barrier waits for a thread that
  is not running (a MobileNetV2 measured 407 ms at batch 1 that way, under a load of 9), and a figure
  per thread count is what a deployment picks from. torch's thread count is process-wide: it is set for
  the measurement and put back after it (trials running beside it, ``--n-jobs``, run on one thread meanwhile);
* inputs of the backbone's real size: images of its preprocessing preset (``C x S x S``, ``S`` the
  crop size), text of the full ``max_length`` tokens of the task (or the backbone's preset), all
  attended (the worst case a deployment sees);
* each figure is the median of several timed runs after warm-up runs; runs go on until a small time
  budget is spent (at least :attr:`Timing.min_runs`, at most :attr:`Timing.max_runs`);
* the parameter count and the size in MB (10^6 bytes) of the parameters and buffers of backbone + head.

The model is timed in its two parts, backbone and head, each cached by its own key, and the whole
model's figure is their sum: eager PyTorch runs ``head(backbone(x))`` one part after the other, so
the sum is the whole forward, and a head tried on a backbone already measured costs a few
milliseconds instead of a new timing of the backbone (a MiniLM at 64 tokens takes seconds at batch 64
on two CPU cores). The core knows nothing about Optuna or Ray: the engines call :meth:`LatencyMeter.measure`
after a trial completes and record the result (:func:`autoft.study.record.latency_attrs`).
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 64)
# the figures a measurement gives, as recorded (``latency_<figure>``); ``latency`` alone means cpu_b1_ms
FIGURES = ("cpu_b1_ms", "cpu_b64_ms", "gpu_b1_ms", "gpu_b64_ms")
DEFAULT_FIGURE = "cpu_b1_ms"
TEXT_TOKEN = 100  # any id inside every vocabulary: the cost of a forward does not depend on which


@dataclass(frozen=True)
class Timing:
    """How one figure is timed: ``warmup`` untimed runs, then timed runs until ``budget_s`` seconds are
    spent, at least ``min_runs`` and at most ``max_runs``; the figure is their median."""

    warmup: int = 2
    min_runs: int = 5
    max_runs: int = 30
    budget_s: float = 0.3


# batch 1 is cheap: more runs. Batch 64 of a large backbone on one CPU thread takes seconds (MobileNetV2 at
# 224 px: 3.7 s a run on the H100 machine's CPU, so three runs and a warm-up made 15 s per architecture, more
# than a GPU trial): a warm-up and one run when a run outlasts the budget, up to ten when runs are short
DEFAULT_TIMINGS = {1: Timing(warmup=2, min_runs=5, max_runs=30, budget_s=0.3),
                   64: Timing(warmup=1, min_runs=1, max_runs=10, budget_s=1.0)}


@dataclass(frozen=True)
class Latency:
    """The measurement of one architecture. Latencies in milliseconds (median per forward of a batch)."""

    cpu_b1_ms: float
    cpu_b64_ms: float
    params: int
    size_mb: float
    gpu_b1_ms: float | None = None
    gpu_b64_ms: float | None = None
    backbone: str = ""
    input: str = ""  # one example as the network sees it: "3x224x224", "128 tokens"
    threads: int = 1  # torch intra-op threads of the CPU figures
    gpu: str | None = None  # the GPU's name, when there are GPU figures
    seconds: float = 0.0  # what measuring this architecture cost (timing runs, building the parts)
    cached: bool = False  # True: taken from the meter's cache (``seconds`` is what it cost when measured)
    runs: dict[str, int] = field(default_factory=dict)  # timed runs per figure (whole model: of its backbone)

    def figures(self) -> dict[str, float | int]:
        """The figures (``cpu_b1_ms``, ``cpu_b64_ms``, ``gpu_*`` when measured, ``n_params``, ``size_mb``)."""
        out: dict[str, float | int] = {"cpu_b1_ms": self.cpu_b1_ms, "cpu_b64_ms": self.cpu_b64_ms}
        if self.gpu_b1_ms is not None:
            out.update(gpu_b1_ms=self.gpu_b1_ms, gpu_b64_ms=self.gpu_b64_ms)
        out.update(n_params=self.params, size_mb=self.size_mb)
        return out

    def setup(self) -> dict[str, Any]:
        """How it was measured (threads, input, GPU, cost, cache)."""
        return {"backbone": self.backbone, "input": self.input, "threads": self.threads, "gpu": self.gpu,
                "batch_sizes": list(BATCH_SIZES), "seconds": round(self.seconds, 3), "cached": self.cached,
                "runs": dict(self.runs), "method": "median of timed runs after warm-up, torch.inference_mode, "
                                                   "float32; backbone and head timed apart and added"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Part:
    """The timing of one part (backbone or head) on one device."""

    ms: dict[int, float]  # batch size -> median milliseconds
    runs: dict[int, int]
    seconds: float


def head_spec(cfg) -> tuple:
    """What of a configuration's head shapes its inference (dropout is the identity at inference)."""
    if cfg.head == "linear":
        return ("linear",)
    return ("mlp", int(cfg.head_width), int(cfg.head_depth), str(cfg.activation))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, device: torch.device, timing: Timing) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` (one forward) after warm-up, and the number of timed runs."""
    for _ in range(timing.warmup):
        fn()
        _sync(device)
    times: list[float] = []
    end = time.perf_counter() + timing.budget_s
    while len(times) < timing.max_runs and (len(times) < timing.min_runs or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def example_input(pre, batch: int, device: torch.device, max_length: int | None = None):
    """A batch of ``batch`` inputs of the backbone's real size (images: the preset's crop; text:
    ``max_length`` tokens, all attended), and its description."""
    if pre.modality == "text":
        n = int(max_length or pre.max_length)
        ids = torch.full((batch, n), TEXT_TOKEN, dtype=torch.long, device=device)
        return (ids, torch.ones((batch, n), dtype=torch.long, device=device)), f"{n} tokens"
    size = int(pre.input_size)
    x = torch.randn(batch, int(pre.channels), size, size).to(device)
    return x, f"{int(pre.channels)}x{size}x{size}"


def model_size(*modules: nn.Module) -> tuple[int, float]:
    """Parameters (count) and MB (10^6 bytes) of the parameters and buffers of ``modules``."""
    params = sum(p.numel() for m in modules for p in m.parameters())
    nbytes = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    return int(params), round(nbytes / 1e6, 3)


class LatencyMeter:
    """Measures the latency and size of trial models, caching every measurement per architecture key
    (and the backbone and head timings per part) for the life of the meter. Thread-safe: measurements
    run one at a time (two at once would slow each other down).

    ``timings``: batch size -> :class:`Timing`; ``gpu``: also time on the task's CUDA device."""

    def __init__(self, timings: dict[int, Timing] | None = None, gpu: bool = True, threads: int | None = None):
        self.timings = dict(DEFAULT_TIMINGS if timings is None else timings)
        self.gpu = gpu
        self.threads = int(threads) if threads else latency_threads()
        self._lock = threading.RLock()
        self._models: dict[tuple, Latency] = {}
        self._backbones: dict[tuple, tuple] = {}  # (part, input, params, MB, feature width)
        self._heads: dict[tuple, _Part] = {}
        self.measured: list[tuple] = []  # the architecture keys measured (not taken from the cache), in order
        self.backbones_timed = 0  # backbone timings run (one per backbone, input size, threads and device)

    # -- keys --------------------------------------------------------------------------------
    @staticmethod
    def _devices(task_device) -> list[torch.device]:
        devs = [torch.device("cpu")]
        dev = torch.device(str(task_device or "cpu"))
        if dev.type == "cuda" and torch.cuda.is_available():
            devs.append(dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device()))
        return devs

    def key(self, cfg, num_classes: int, max_length: int | None = None, device: str = "cpu") -> tuple:
        """The architecture key: backbone, input length (text), head shape, classes, threads, devices."""
        devs = tuple(str(d) for d in self._devices(device)) if self.gpu else ("cpu",)
        return (cfg.backbone, max_length, head_spec(cfg), int(num_classes), self.threads, devs)

    # -- measuring ---------------------------------------------------------------------------
    def measure(self, cfg, task, cache=None) -> Latency:
        """The :class:`Latency` of ``cfg``'s model on ``task`` (a :class:`~autoft.core.TaskData`: its number of
        classes, text length and device). ``cache``: a :class:`~autoft.core.FeatureCache` whose backbone is
        reused (else the zoo builds it)."""
        from autoft.core.config import TrialConfig

        cfg = cfg if isinstance(cfg, TrialConfig) else TrialConfig(**cfg)
        max_length = getattr(task, "max_length", None)
        num_classes = int(task.data.num_classes)
        key = self.key(cfg, num_classes, max_length, getattr(task, "device", "cpu"))
        with self._lock:
            hit = self._models.get(key)
            if hit is not None:
                return _replace(hit, cached=True)
            t0 = time.perf_counter()
            devices = [torch.device(d) for d in key[-1]]
            threads = key[4]
            ms: dict[str, dict[int, float]] = {}
            runs: dict[str, int] = {}
            before = torch.get_num_threads()
            torch.set_num_threads(threads)  # the CPU figures' thread count (process-wide; put back below)
            try:
                self._measure_parts(cfg, cache, max_length, num_classes, devices, threads, ms, runs)
            finally:
                torch.set_num_threads(before)
            part, text, params, mb, feature_dim = self._backbones[(cfg.backbone, max_length, threads, "cpu")]
            head_params, head_mb = model_size(_build_head(feature_dim, num_classes, cfg))
            gpu = devices[1] if len(devices) > 1 else None
            lat = Latency(cpu_b1_ms=round(ms["cpu"][1], 4), cpu_b64_ms=round(ms["cpu"][64], 4),
                          params=params + head_params, size_mb=round(mb + head_mb, 3),
                          gpu_b1_ms=round(ms["cuda"][1], 4) if gpu is not None else None,
                          gpu_b64_ms=round(ms["cuda"][64], 4) if gpu is not None else None,
                          backbone=cfg.backbone, input=text, threads=threads,
                          gpu=torch.cuda.get_device_name(gpu) if gpu is not None else None,
                          seconds=time.perf_counter() - t0, runs=runs)
            self._models[key] = lat
            self.measured.append(key)
            log.info("latency of %s + %s head: CPU %.2f ms (batch 1), %.1f ms (batch 64), %s parameters, "
                     "%.1f MB; measured in %.1f s", cfg.backbone, cfg.head, lat.cpu_b1_ms, lat.cpu_b64_ms,
                     f"{lat.params:,}", lat.size_mb, lat.seconds)
            return lat

    def _measure_parts(self, cfg, cache, max_length, num_classes, devices, threads, ms, runs) -> None:
        """Time the backbone (unless timed before) and the head on each device; fill ``ms`` and ``runs``."""
        backbone = None
        with torch.random.fork_rng(devices=[]):  # the trial's random state is left as it was
            for dev in devices:
                bkey = (cfg.backbone, max_length, threads, str(dev))
                if bkey not in self._backbones:
                    if backbone is None:
                        backbone = self._backbone(cfg.backbone, cache, max_length)
                    self._backbones[bkey] = self._time_backbone(backbone, dev, max_length)
                    self.backbones_timed += 1
                part, _, _, _, feature_dim = self._backbones[bkey]
                hkey = (head_spec(cfg), feature_dim, num_classes, threads, str(dev))
                if hkey not in self._heads:
                    self._heads[hkey] = self._time_head(_build_head(feature_dim, num_classes, cfg), feature_dim, dev)
                ms[dev.type] = {b: part.ms[b] + self._heads[hkey].ms[b] for b in BATCH_SIZES}
                runs.update({f"{dev.type}_b{b}": part.runs[b] for b in BATCH_SIZES})

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._backbones.clear()
            self._heads.clear()
            self.measured.clear()
            self.backbones_timed = 0

    # -- parts -------------------------------------------------------------------------------
    @staticmethod
    def _backbone(name: str, cache, max_length: int | None):
        import dataclasses

        if cache is not None:
            bb = cache.backbone(name)
        else:
            from autoft.zoo import get_backbone

            bb = get_backbone(name)
        if max_length and bb.preprocessing.modality == "text":
            bb.preprocessing = dataclasses.replace(bb.preprocessing, max_length=int(max_length))
        return bb.eval()

    def _time_backbone(self, backbone, device: torch.device, max_length: int | None):
        t0 = time.perf_counter()
        model = backbone if device.type == "cpu" else _copy_to(backbone, device)
        ms, runs, text = {}, {}, ""
        try:
            with torch.inference_mode():
                for b in BATCH_SIZES:
                    x, text = example_input(backbone.preprocessing, b, device, max_length)
                    ms[b], runs[b] = time_forward(lambda x=x: model(x), device, self.timings[b])
        finally:
            if model is not backbone:
                del model
                torch.cuda.empty_cache()
        params, mb = model_size(backbone)
        return _Part(ms, runs, time.perf_counter() - t0), text, params, mb, int(backbone.feature_dim)

    def _time_head(self, head: nn.Module, feature_dim: int, device: torch.device) -> _Part:
        t0 = time.perf_counter()
        head = head.to(device).eval()
        ms, runs = {}, {}
        with torch.inference_mode():
            for b in BATCH_SIZES:
                x = torch.randn(b, feature_dim).to(device)
                ms[b], runs[b] = time_forward(lambda x=x: head(x), device, Timing(warmup=2, min_runs=5, max_runs=20,
                                                                               budget_s=0.05))
        return _Part(ms, runs, time.perf_counter() - t0)


def _build_head(feature_dim: int, num_classes: int, cfg) -> nn.Module:
    from autoft.core.model import build_head

    torch.manual_seed(0)  # the values do not matter (the caller forks the random state)
    return build_head(feature_dim, num_classes, cfg).eval()


def _copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(device).eval()


def _replace(lat: Latency, **kw) -> Latency:
    import dataclasses

    return dataclasses.replace(lat, **kw)


_DEFAULT: LatencyMeter | None = None
_DEFAULT_LOCK = threading.Lock()


def default_meter() -> LatencyMeter:
    """The process's meter: the engines measure through it, so a configuration repeated in any search of
    this process is measured once."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = LatencyMeter()
        return _DEFAULT


def reset_default_meter() -> None:
    """Forget every measurement of the process's meter: the next search measures its architectures again
    (a benchmark that times several searches in one process must not let later ones reuse earlier ones')."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = None


def latency_threads() -> int:
    """Intra-op threads of the CPU figures: ``AUTOFT_LATENCY_THREADS``, else 1."""
    import os

    try:
        return max(1, int(os.environ.get("AUTOFT_LATENCY_THREADS", "1")))
    except ValueError:
        return 1


def latency_enabled() -> bool:
    """Trials' latency is measured unless ``AUTOFT_LATENCY`` is 0/off/no/false."""
    from autoft.core.env import env_flag

    return env_flag("AUTOFT_LATENCY", True)


def measure_latency(cfg, task, cache=None) -> Latency:
    """:meth:`LatencyMeter.measure` with the process's meter."""
    return default_meter().measure(cfg, task, cache)
