"""GPU memory: copies to the device, cleanup between trials, out-of-memory, peak memory, packing.

* :func:`to_device`: a batch to the device; on CUDA from pinned (page-locked) host memory with a
  non-blocking copy, so the copy overlaps the GPU's work; optionally channels-last for images.
* :func:`release_memory`: what a trial leaves behind is freed (garbage collection, then the CUDA
  caching allocator's unused blocks go back to the driver), so a long search does not creep up.
* :func:`is_oom` / :class:`TrialOutOfMemory`: out-of-memory (CUDA, MPS, the CPU allocator) is told
  apart from other errors; the trial fails with its reason, and the Optuna engine runs it again once
  at half the batch size (``oom_retry`` in the trial record, :mod:`autoft.study.record`).
* :class:`PeakMemory`, :func:`estimate_trial_bytes`, :class:`GpuAdmission`: several trials share one
  GPU (``--n-jobs``) while their memory fits: a trial's need is measured (the CUDA peak of its first
  steps while it ran alone) or, until then, estimated from the backbone, batch size, unfrozen depth
  and precision, and the admission controller starts a further trial only while the needs of the
  running ones plus its own fit the GPU's memory.
"""
from __future__ import annotations

import gc
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from autoft.core.env import env_flag
from autoft.errors import TrialFailed

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30


# -- copies ---------------------------------------------------------------------------------------
def _copy(t: torch.Tensor, device: torch.device, memory_format) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    else:
        t = t.to(device)
    if memory_format is not None and t.dim() == 4 and t.is_floating_point():
        t = t.contiguous(memory_format=memory_format)
    return t


def to_device(state, device: torch.device | str, channels_last: bool = False):
    """A state (tensor or tuple of tensors) on ``device``: pinned memory and a non-blocking copy on CUDA,
    a plain ``.to`` elsewhere (the same tensors as ``state_to``); 4-D float images channels-last when asked."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else None
    if isinstance(state, tuple):
        return tuple(_copy(s, device, fmt) for s in state)
    return _copy(state, device, fmt)


def state_nbytes(state) -> int:
    """Bytes of a state's tensors (a tensor or a tuple of tensors)."""
    return int(sum(t.numel() * t.element_size() for t in (state if isinstance(state, tuple) else (state,))))


RESIDENT_FRACTION = 0.25  # of the GPU's memory: the most a trial's resident input may take


def fits_on_device(state, device: torch.device | str) -> bool:
    """Whether a trial's whole in-memory input (encoded examples or cached prefix states) is kept on the CUDA
    ``device`` for the trial, so that a training step indexes it there instead of gathering a batch on the
    host, pinning it and copying it (on an H100 that host work was most of a MobileNetV2 step). Yes when it
    takes at most :data:`RESIDENT_FRACTION` of the device's memory and half of what is free now;
    ``AUTOFT_GPU_RESIDENT=0`` switches it off."""
    dev = torch.device(device)
    if dev.type != "cuda" or not env_flag("AUTOFT_GPU_RESIDENT", True):
        return False
    free, total = torch.cuda.mem_get_info(dev)
    return state_nbytes(state) <= min(RESIDENT_FRACTION * total, 0.5 * free)


# -- cleanup --------------------------------------------------------------------------------------
def release_memory(device: torch.device | str | None = None) -> None:
    """Free what finished trials left: unreachable Python objects (a trial's model, optimizer, batches
    and any traceback holding them), then the CUDA caching allocator's unused blocks. Safe while other
    trials run: memory they use is not touched."""
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    elif dev is not None and dev.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            mps.empty_cache()


def allocated_bytes(device: torch.device | str = "cuda") -> int:
    """Bytes of live tensors on a CUDA device (0 elsewhere)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_allocated(dev))


def live_tensors(device_type: str | None = None) -> int:
    """Number of tensors the Python garbage collector can see (on ``device_type`` when given): the
    CPU counterpart of "allocated memory returns to its baseline"."""
    n = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and (device_type is None or obj.device.type == device_type):
                n += 1
        except Exception:  # noqa: BLE001 - objects that cannot be inspected
            pass
    return n


# -- out of memory --------------------------------------------------------------------------------
_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                 "can't allocate memory", "not enough memory", "failed to allocate memory")


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error: ``torch.OutOfMemoryError`` (CUDA's ``torch.cuda.OutOfMemoryError``
    is the same class), the messages of cuBLAS/cuDNN allocation failures, MPS and the CPU allocator."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        msg = str(exc).lower()
        return isinstance(exc, MemoryError) or any(m in msg for m in _OOM_MESSAGES)
    return False


class TrialOutOfMemory(TrialFailed):
    """A trial ran out of memory. ``batch_size`` is the batch size it had; ``retry_batch_size`` the one a
    retry uses (half, None when the batch is already 1)."""

    def __init__(self, message: str, *, batch_size: int, device: str = "cuda"):
        super().__init__(message)
        self.batch_size = int(batch_size)
        self.device = str(device)

    @property
    def retry_batch_size(self) -> int | None:
        return half_batch(self.batch_size)


def half_batch(batch_size: int) -> int | None:
    return batch_size // 2 if batch_size > 1 else None


def oom_failure(exc: BaseException, batch_size: int, device, where: str = "") -> TrialOutOfMemory:
    """The :class:`TrialOutOfMemory` of an out-of-memory error; its message says where and how to avoid it."""
    first = str(exc).strip().split("\n")[0][:300]
    retry = half_batch(batch_size)
    hint = (f"a batch size of {retry} or a lower unfreeze depth needs less" if retry
            else "a lower unfreeze depth, a smaller backbone or precision bf16 needs less")
    return TrialOutOfMemory(f"out of memory at batch size {batch_size} on {device}{' ' + where if where else ''} "
                            f"({first}); {hint}", batch_size=batch_size, device=str(device))


# -- peak memory ----------------------------------------------------------------------------------
class PeakMemory:
    """The CUDA high-water mark of a block, above what was allocated when it started (0 off CUDA).
    The counter is per process: the figure belongs to the block only when nothing else ran on the GPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.base = 0
        self.peak = 0

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = int(torch.cuda.memory_allocated(self.device))
        return self

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self.base)
        return self.peak

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.read()


def activation_bytes(backbone, example, start: int = 0) -> list[int]:
    """Bytes of the outputs of every leaf module, per stage from ``start``, for one example (run on the
    CPU in float32, no graph): roughly what backward keeps of a trainable stage, per example."""
    sizes: list[int] = []
    total = [0]

    def hook(_m, _inp, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total[0] += t.element_size() * t.nelement()

    handles = [m.register_forward_hook(hook) for st in backbone.stages[start:] for m in st.modules()
               if not list(m.children())]
    try:
        with torch.no_grad():
            state = example
            for st in backbone.stages[start:]:
                total[0] = 0
                state = st(state)
                sizes.append(total[0])
    finally:
        for h in handles:
            h.remove()
    return sizes


def estimate_trial_bytes(*, params: int, trainable: int, batch_size: int, activation_per_example: int,
                         precision: str = "fp32", optimizer: str = "adamw", input_per_example: int = 0,
                         overhead: int = 256 * MiB, margin: float = 1.3) -> int:
    """A trial's GPU memory, estimated: float32 weights, gradients and optimizer states of the trained
    parameters (AdamW keeps two, SGD one), the activations backward keeps for a batch (halved under
    bf16/fp16 autocast), the batch itself, plus the CUDA context's workspace and a safety margin."""
    weights = 4 * params
    grads = 4 * trainable
    states = (8 if optimizer == "adamw" else 4) * trainable
    act = batch_size * activation_per_example * (0.5 if precision in ("bf16", "fp16") else 1.0)
    data = 2 * batch_size * input_per_example
    return int(math.ceil((weights + grads + states + act + data) * margin + overhead))


def trial_memory_key(cfg) -> tuple:
    """What a trial's memory depends on (configurations with the same key need the same memory)."""
    return (cfg.backbone, int(cfg.unfreeze), int(cfg.batch_size), str(getattr(cfg, "precision", "fp32")),
            cfg.head, int(cfg.head_width), int(cfg.head_depth), cfg.optimizer)


# -- packing --------------------------------------------------------------------------------------
@dataclass
class _Slot:
    key: tuple
    need: int
    probing: bool = False


class GpuAdmission:
    """Admission control of trials sharing one GPU: start a trial only while its memory need plus the
    needs of the running trials fit in ``capacity`` bytes (the GPU's memory less a reserve).

    A trial's need is the measured peak of an earlier trial with the same memory key
    (:func:`trial_memory_key`) when there is one, else the estimate it was admitted with. A trial whose
    key was never measured is admitted alone and *probes*: no other trial starts until it reports its
    first steps' peak (:meth:`measured`), which then replaces its estimate; the figure is exact because
    nothing else ran. A trial that needs more than the whole capacity still runs, alone (it may then
    fail with out-of-memory and be retried at half the batch size). Thread-safe; ``clock`` and the
    numbers are plain so that the logic is tested without a GPU."""

    def __init__(self, capacity: int, *, max_trials: int | None = None, probe: bool = True,
                 margin: float = 1.1):
        self.capacity = int(capacity)
        self.max_trials = max_trials
        self.probe = probe
        self.margin = margin
        self.known: dict[tuple, int] = {}
        self.running: dict[int, _Slot] = {}
        self._cond = threading.Condition()
        self._next = 0
        self.waited_seconds = 0.0

    @classmethod
    def for_device(cls, device: torch.device | str, *, reserve_fraction: float = 0.1,
                   max_trials: int | None = None) -> "GpuAdmission":
        """For a CUDA device: its total memory less ``reserve_fraction`` (other processes, fragmentation)."""
        dev = torch.device(device)
        total = torch.cuda.get_device_properties(dev).total_memory
        return cls(int(total * (1 - reserve_fraction)), max_trials=max_trials)

    def in_use(self) -> int:
        return sum(s.need for s in self.running.values())

    def need(self, key: tuple, estimate: int) -> int:
        return self.known.get(key, int(estimate))

    def _fits(self, key: tuple, need: int) -> bool:
        if not self.running:
            return True
        if self.max_trials is not None and len(self.running) >= self.max_trials:
            return False
        if any(s.probing for s in self.running.values()):
            return False
        if self.probe and key not in self.known:
            return False  # an unmeasured configuration probes alone
        return self.in_use() + need <= self.capacity

    def try_acquire(self, key: tuple, estimate: int) -> int | None:
        """A ticket when the trial may start now, else None (never waits)."""
        with self._cond:
            need = self.need(key, estimate)
            if not self._fits(key, need):
                return None
            return self._admit(key, need)

    def acquire(self, key: tuple, estimate: int, timeout: float | None = None) -> int | None:
        """Wait until the trial fits, then return its ticket (None after ``timeout`` seconds)."""
        t0 = time.monotonic()
        with self._cond:
            while True:
                need = self.need(key, estimate)
                if self._fits(key, need):
                    self.waited_seconds += time.monotonic() - t0
                    return self._admit(key, need)
                left = None if timeout is None else timeout - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def _admit(self, key: tuple, need: int) -> int:
        ticket = self._next
        self._next += 1
        probing = self.probe and key not in self.known
        self.running[ticket] = _Slot(key, need, probing)
        return ticket

    def measured(self, ticket: int, peak_bytes: int) -> None:
        """The trial's peak (its first steps, measured alone): remembered for its key, and its reservation
        becomes that figure (with a margin); waiting trials are reconsidered."""
        with self._cond:
            slot = self.running.get(ticket)
            if slot is None:
                return
            if slot.probing and peak_bytes > 0:
                self.known[slot.key] = int(peak_bytes * self.margin)
                slot.need = self.known[slot.key]
            slot.probing = False
            self._cond.notify_all()

    def release(self, ticket: int) -> None:
        with self._cond:
            self.running.pop(ticket, None)
            self._cond.notify_all()

    @contextmanager
    def admitted(self, key: tuple, estimate: int):
        ticket = self.acquire(key, estimate)
        try:
            yield ticket
        finally:
            self.release(ticket)


# -- the trial guard ------------------------------------------------------------------------------
PROBE_STEPS = 3  # optimizer steps after which a trial's peak memory is read (reporter.on_first_steps)


def _clear_frames(exc: BaseException | None) -> None:
    """Drop the local variables of the finished frames an exception (and its chain) refers to: a failed
    trial's traceback otherwise keeps its model, optimizer and batches (GPU memory) alive for as long as
    the exception is kept. The traceback's file names and line numbers remain."""
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _batch_size_of(config) -> int:
    bs = config.get("batch_size", 64) if isinstance(config, dict) else getattr(config, "batch_size", 64)
    try:
        return int(bs)
    except (TypeError, ValueError):
        return 0


def _device_of(task) -> torch.device:
    spec = getattr(task, "device", "cpu") or "cpu"
    try:
        from autoft.core.device import resolve_device

        return torch.device(resolve_device(spec))
    except Exception:  # noqa: BLE001 - the trial itself reports a bad device
        return torch.device("cpu")


def oom_guard(fn):
    """Decorates the core's trial function ``fn(config, task, ...)``: an out-of-memory error anywhere in
    the trial (prefix, training, evaluation) becomes :class:`TrialOutOfMemory`; a failed trial's frames
    are cleared so nothing it allocated outlives it; on a GPU, memory is released after every trial."""
    import functools

    @functools.wraps(fn)
    def trial(config, task, *args, **kwargs):
        device = _device_of(task)
        failure = None
        try:
            return fn(config, task, *args, **kwargs)
        except BaseException as exc:
            _clear_frames(exc)
            if isinstance(exc, TrialOutOfMemory):
                failure = exc
            elif is_oom(exc):
                failure = oom_failure(exc, _batch_size_of(config), device)
            else:
                raise
        finally:
            if device.type != "cpu":  # the CPU frees on the spot: no collection pass added to CPU trials
                release_memory(device)
        log.info("trial out of memory: %s", failure)
        raise failure

    return trial


# -- what the Optuna engine uses --------------------------------------------------------------------
def estimate_for(cfg, cache, data, precision: str = "fp32") -> int:
    """:func:`estimate_trial_bytes` of a trial configuration: parameter counts of its backbone, the
    activation sizes of its unfrozen stages for one example of ``data`` (run once on the CPU)."""
    bb = cache.backbone(cfg.backbone).set_unfreeze(cfg.unfreeze)
    encoded, _ = cache.encoded(data, bb.preprocessing)
    example = tuple(t[:1] for t in encoded) if isinstance(encoded, tuple) else encoded[:1]
    try:
        per_stage = activation_bytes(bb.eval(), example)
    except Exception:  # noqa: BLE001 - an estimate only: fall back to the input's size per stage
        per_stage = [sum(t[0].nelement() * 4 for t in (example if isinstance(example, tuple) else (example,)))] \
            * bb.num_stages
    act = 2 * sum(per_stage[bb.split:])  # outputs and the inputs backward keeps
    inp = sum(t.element_size() * t.nelement() for t in (example if isinstance(example, tuple) else (example,)))
    return estimate_trial_bytes(params=sum(p.numel() for p in bb.parameters()),
                                trainable=sum(p.numel() for p in bb.trainable_parameters()),
                                batch_size=cfg.batch_size, activation_per_example=act, precision=precision,
                                optimizer=cfg.optimizer, input_per_example=inp)


class PackedTrials:
    """Trials of one process sharing a CUDA GPU (the Optuna engine with ``n_jobs > 1``): each waits for
    admission (:class:`GpuAdmission`), a trial that probes has its first steps' peak measured and
    remembered, and the reservation ends with the trial."""

    def __init__(self, admission: GpuAdmission, device: torch.device | str):
        self.admission = admission
        self.device = torch.device(device)
        self._estimates: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def estimate(self, cfg, cache, data) -> int:
        from autoft.core.precision import resolve_precision

        key = trial_memory_key(cfg)
        with self._lock:
            if key not in self._estimates:
                self._estimates[key] = estimate_for(cfg, cache, data, resolve_precision(cfg.precision, self.device))
            return self._estimates[key]

    @contextmanager
    def run(self, cfg, cache, data, reporter=None):
        key = trial_memory_key(cfg)
        need = self.admission.need(key, self.estimate(cfg, cache, data))
        ticket = self.admission.acquire(key, need)
        probe = self.admission.running.get(ticket)
        peak = PeakMemory(self.device).start() if probe is not None and probe.probing else None
        if reporter is not None:
            reporter.on_first_steps = lambda: self.admission.measured(ticket, peak.read() if peak else 0)
        try:
            yield ticket
        finally:
            if peak is not None:
                self.admission.measured(ticket, peak.read())
            self.admission.release(ticket)
