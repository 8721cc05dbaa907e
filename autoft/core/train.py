"""The core: fine-tune one configuration, then score it on validation data.

Knows nothing about Optuna or Ray: it gets a :class:`TrialConfig`, a :class:`TaskData` and a
:class:`Reporter`, reports the task's metric after every epoch, and stops when told to.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from autoft.core import gpu as _gpu
from autoft.core.cache import FeatureCache, trim_text
from autoft.core.config import TrialConfig
from autoft.core.losses import build_criterion
from autoft.core.metrics import MINIMIZE, compute_metrics
from autoft.core.model import Classifier, build_head
from autoft.core.precision import autocast, channels_last, configure_backends, grad_scaler, resolve_precision
from autoft.core.reporter import NullReporter, Reporter
from autoft.data.datasets import LabelledData
from autoft.data.splits import Splits
from autoft.errors import ConfigError, TrialFailed
from autoft.zoo.base import State, cat_states, index_state, text_mask

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """What the core needs of a task: data, splits, the metric to report, the device."""

    data: LabelledData
    splits: Splits
    metric: str = "accuracy"
    positive_index: int | None = None
    device: str = "cpu"
    name: str = "task"
    max_length: int | None = None  # text: tokens kept per example (overrides the backbone's default)
    num_workers: int | None = None  # DataLoader worker processes for streamed images (None: autoft.data.stream)
    memory_budget: int | None = None  # bytes: images whose encoded tensor would exceed it are streamed

    @property
    def direction(self) -> str:
        return "minimize" if self.metric in MINIMIZE else "maximize"


@dataclass
class FineTuneResult:
    score: float  # the metric after the last epoch run (the trial's objective)
    best_score: float
    best_epoch: int
    metrics: dict[str, float]  # all validation metrics after the last epoch
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, train_loss, metrics
    epochs_run: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    test_metrics: dict[str, float] | None = None
    data: dict[str, Any] = field(default_factory=dict)  # how the data was fed: mode, workers, loader wait
    model: Any = None  # the trained Classifier when asked for (return_model=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def use_task_inputs(backbone, task: "TaskData") -> None:
    """What the task changes in the backbone's preprocessing: a text task's ``max_length`` (tokens kept per
    example). Trials and the ranking both call this, so that they encode the same inputs (and share cache
    entries)."""
    if task.max_length and backbone.preprocessing.modality == "text" \
            and backbone.preprocessing.max_length != task.max_length:
        backbone.preprocessing = dataclasses.replace(backbone.preprocessing, max_length=task.max_length)


def resolve_device(device: str) -> torch.device:
    """The trial's torch device: the search resolves it once (:func:`autoft.core.device.resolve_device`,
    so the ranking, every trial and the final check agree); a direct caller may still pass ``auto``."""
    from autoft.core.device import resolve_device as resolve

    return torch.device(resolve(device))


def _lr_lambda(cfg: TrialConfig, total_steps: int):
    warm = int(round(cfg.warmup * total_steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "saved": None}


@contextmanager
def single_thread(enabled: bool = True):
    """Run the block with one intra-op thread (then restore), for tiny workloads such as a head trained
    on cached features, where thread start-up and synchronisation cost more than the work itself.
    Nested and concurrent uses (trials run as threads) are counted; the last one out restores it."""
    if not enabled:
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def token_lengths(state: State) -> torch.Tensor | None:
    """Tokens per example for text (``(ids, mask)`` inputs), None for images."""
    mask = text_mask(state)
    return None if mask is None else mask.sum(1)


def epoch_batches(perm: torch.Tensor, batch_size: int, lengths: torch.Tensor | None,
                  gen: torch.Generator, bucket: int = 32) -> list[torch.Tensor]:
    """Mini-batches of the shuffled examples ``perm`` for one epoch.

    Text (``lengths`` given): bucketed by length, as text training loops usually are: the shuffled
    examples are cut into chunks of ``bucket`` batches, each chunk is sorted by token count and cut
    into batches, and the batches are shuffled. A batch is then padded only to its own longest
    example, which on short texts (SMS) cuts the work of a trainable transformer layer several
    times. Deterministic for a seed, and the same whether or not the frozen prefix is cached."""
    if lengths is None:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    chunk = batch_size * bucket
    batches: list[torch.Tensor] = []
    for c in range(0, len(perm), chunk):
        part = perm[c:c + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


DEFAULT_MEMORY_BUDGET = 1 << 30


def memory_budget(task: TaskData) -> int:
    """Bytes the encoded images may take in memory: the task's ``data.memory_budget_mb``, else
    ``AUTOFT_MEMORY_BUDGET_MB``, else 1 GiB.  Above it (or with augmentation) images are streamed."""
    import os

    if task.memory_budget is not None:
        return int(task.memory_budget)
    env = os.environ.get("AUTOFT_MEMORY_BUDGET_MB")
    try:
        return int(float(env) * (1 << 20)) if env else DEFAULT_MEMORY_BUDGET
    except ValueError:
        return DEFAULT_MEMORY_BUDGET


class _DiskFeats:
    """Cached prefix outputs of some rows, in one or more feature files, read per batch."""

    def __init__(self, arrays: list, parts: list[torch.Tensor], n: int):
        self.arrays = arrays
        self.which = torch.full((n,), -1, dtype=torch.long)
        self.row = torch.full((n,), -1, dtype=torch.long)
        for k, rows in enumerate(parts):
            self.which[rows] = k
            self.row[rows] = torch.arange(len(rows))

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        which, row = self.which[idx], self.row[idx]
        if len(self.arrays) == 1:
            return self.arrays[0].read(row)
        out = None
        for k, arr in enumerate(self.arrays):
            sel = torch.nonzero(which == k).flatten()
            if len(sel):
                part = arr.read(row[sel])
                if out is None:
                    out = torch.empty((len(idx), *part.shape[1:]), dtype=part.dtype)
                out[sel] = part
        return out


def _timed(it, clock):
    """Yield from ``it``, adding the time spent waiting for each item to ``clock.wait``."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        clock.wait += time.perf_counter() - t0
        yield item


def _indices(splits: Splits, names: tuple[str, ...] | str) -> torch.Tensor:
    names = (names,) if isinstance(names, str) else names
    return torch.from_numpy(np.sort(np.concatenate([getattr(splits, n) for n in names]))).long()


@torch.no_grad()
def predict_logits(model: Classifier, feats, idx: torch.Tensor, start: int, device, batch: int = 512,
                   precision: str = "fp32", nhwc: bool = False) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(idx), batch):
        xb = _gpu.to_device(trim_text(index_state(feats, idx[i:i + batch])), torch.device(device), nhwc)
        with autocast(device, precision):
            out.append(model.forward_from(xb, start).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _predict_batches(model: Classifier, batches, start: int, device, precision: str, nhwc: bool) -> torch.Tensor:
    model.eval()
    out = [model_forward(model, b[0], start, device, precision, nhwc) for b in batches]
    return torch.cat(out) if out else torch.empty(0)


def model_forward(model: Classifier, xb, start: int, device, precision: str, nhwc: bool) -> torch.Tensor:
    xb = _gpu.to_device(xb, torch.device(device), nhwc)
    with autocast(device, precision):
        return model.forward_from(xb, start).float().cpu()


def _loss_failure(value: float, epoch: int, step: int, cfg) -> TrialFailed:
    return TrialFailed(f"loss became {value} at epoch {epoch}, step {step + 1} (lr={cfg.lr:g}, head "
                       f"lr={cfg.head_lr:g}); the run was stopped. A lower learning rate usually avoids this.")


class _PhaseReporter:
    """The reporter of one phase of a ``head_first`` trial: its epochs are numbered after the ``offset`` epochs
    of the phases before it, so the engine sees one run of ``epochs`` epochs. ``on_first_steps`` (the GPU
    packing's memory probe) is passed on only in the phase that trains the configured depth."""

    def __init__(self, reporter: Reporter, offset: int, probe: bool):
        self.reporter, self.offset, self.stopped = reporter, offset, False
        if probe and hasattr(reporter, "on_first_steps"):
            self.on_first_steps = reporter.on_first_steps

    def on_train_start(self) -> None:  # each phase's set-up (its prefix features) is not timed as an epoch
        if callable(getattr(self.reporter, "on_train_start", None)):
            self.reporter.on_train_start()

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        self.stopped = bool(self.reporter.report(step + self.offset, value, metrics))
        return self.stopped


@_gpu.oom_guard
def fine_tune_and_score(config: TrialConfig | dict, task: TaskData, reporter: Reporter | None = None, *,
                        cache: FeatureCache | None = None, use_cache: bool = True,
                        train_on: tuple[str, ...] = ("train",), evaluate_on: str = "val",
                        test: bool = False, return_model: bool = False) -> FineTuneResult:
    """Fine-tune ``config`` on ``task`` and score it on the validation split after every epoch.

    ``use_cache`` computes the frozen prefix once (exact: same numbers as ``use_cache=False``).
    With ``head_first`` (and ``unfreeze`` > 0) the first ``head_first`` epochs train the head alone (as
    ``unfreeze=0``: on the cached pooled features), then the configured depth trains for the other epochs,
    starting from that head; epochs are numbered and reported across both phases.
    Raises :class:`TrialFailed` when the loss becomes NaN/inf or memory runs out.
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, TrialConfig) else TrialConfig(**config)
    reporter = reporter or NullReporter()
    cache = cache or FeatureCache()
    kw = dict(cache=cache, use_cache=use_cache, train_on=train_on, evaluate_on=evaluate_on)
    if not (cfg.head_first and cfg.unfreeze):
        return _fine_tune(cfg, task, reporter, test=test, return_model=return_model, **kw)
    if cfg.head_first >= cfg.epochs:
        raise ConfigError(f"head_first={cfg.head_first} must be below epochs={cfg.epochs}: the head-only epochs "
                          f"come first, then unfreeze={cfg.unfreeze} trains for the others", field="head_first")
    width = cache.backbone(cfg.backbone).feature_dim  # (a first build of the backbone draws random numbers)
    torch.manual_seed(cfg.seed)  # the same initial head as without head_first
    head = build_head(width, task.data.num_classes, cfg)
    k = cfg.head_first
    phase = _PhaseReporter(reporter, 0, probe=False)
    first = _fine_tune(cfg.model_copy(update={"unfreeze": 0, "epochs": k, "head_first": 0}), task, phase,
                       head=head, return_model=return_model, **kw)
    if phase.stopped or first.stopped_early:  # stopped while head-only
        first.stopped_early = first.epochs_run < cfg.epochs
        first.seconds = time.perf_counter() - t0
        return first
    res = _fine_tune(cfg.model_copy(update={"epochs": cfg.epochs - k, "head_first": 0}), task,
                     _PhaseReporter(reporter, k, probe=True), head=head, test=test, return_model=return_model, **kw)
    res.history = first.history + [{**h, "epoch": h["epoch"] + k} for h in res.history]
    res.epochs_run = len(res.history)
    sign = -1.0 if task.direction == "minimize" else 1.0
    if sign * first.best_score >= sign * res.best_score:
        res.best_score, res.best_epoch = first.best_score, first.best_epoch
    else:
        res.best_epoch += k
    res.data = {**res.data, "head_first_seconds": round(first.seconds, 3)}
    res.seconds = time.perf_counter() - t0
    return res


def _fine_tune(cfg: TrialConfig, task: TaskData, reporter: Reporter, *, cache: FeatureCache, use_cache: bool,
               train_on: tuple[str, ...], evaluate_on: str, test: bool = False, return_model: bool = False,
               head: torch.nn.Module | None = None) -> FineTuneResult:
    """One training run of ``cfg`` (:func:`fine_tune_and_score`); ``head``: a head to train on (warm start)
    instead of a new one."""
    t0 = time.perf_counter()
    device = resolve_device(task.device)
    precision = resolve_precision(cfg.precision, device)  # autoft.core.precision: fp32 on the CPU unless asked
    configure_backends(device)

    backbone = cache.backbone(cfg.backbone)
    if cfg.unfreeze > backbone.num_stages:
        raise ConfigError(f"unfreeze={cfg.unfreeze} but backbone '{cfg.backbone}' has only "
                          f"{backbone.num_stages} stages (allowed 0..{backbone.num_stages})", field="unfreeze")
    backbone.set_unfreeze(cfg.unfreeze)
    if cfg.bn == "frozen":  # batch-norm layers stay in eval mode (Backbone.train); folded checkpoints already are
        backbone.freeze_norm_stats = True
        backbone.train(backbone.training)
    if cfg.augment != "none" and backbone.preprocessing.modality != "image":
        raise ConfigError(f"augment={cfg.augment} is for images; backbone '{cfg.backbone}' takes text",
                          field="augment")
    use_task_inputs(backbone, task)
    split = backbone.split
    pre = backbone.preprocessing
    train_idx, eval_idx = _indices(task.splits, train_on), _indices(task.splits, evaluate_on)
    test_idx = _indices(task.splits, "test") if test else None
    pos = None  # dataset index -> row of ``feats`` (None: feats holds every example)
    # images are streamed (decoded and transformed per batch in DataLoader workers) when augmented, or when
    # the whole dataset encoded at the input size would not fit the memory budget; else encoded once
    from autoft.data.encode import image_nbytes

    stream = pre.modality == "image" and (cfg.augment != "none"
                                          or image_nbytes(len(task.data), pre) > memory_budget(task))
    disk_feats = None
    if stream:
        from autoft.data.stream import default_workers

        workers = default_workers() if task.num_workers is None else task.num_workers
        encoded = feats = None
        start = 0
        if cfg.augment == "none" and use_cache and split > 0:  # exact: the prefix sees the evaluation transform
            parts = [torch.unique(torch.cat([train_idx, eval_idx]))]
            if test:
                extra = test_idx[~torch.isin(test_idx, parts[0])]
                if len(extra):
                    parts.append(extra)
            arrays = [cache.stream_prefix(backbone, task.data, split, p, device, workers) for p in parts]
            disk_feats = _DiskFeats(arrays, parts, len(task.data))
            start = split + 1 if split == backbone.num_stages else split
        data_info = {"mode": "disk features" if disk_feats is not None else "streamed", "workers": workers}
    elif use_cache and split > 0:
        encoded, digest = cache.encoded(task.data, pre)
        data_info = {"mode": "in memory"}
        # the prefix is computed only for the examples this run touches (not a few-shot task's test
        # set), in separate cache entries for the search's rows and the test rows: the final check
        # on the test split then reuses what the search computed and adds only the test examples
        parts = [torch.unique(torch.cat([train_idx, eval_idx]))]
        if test:
            extra = test_idx[~torch.isin(test_idx, parts[0])]
            if len(extra):
                parts.append(extra)
        rows = torch.cat(parts)
        feats = [cache.prefix(backbone, encoded, digest, split, device, rows=p) for p in parts]
        feats = feats[0] if len(feats) == 1 else cat_states(feats)  # no copy of the cached entry in a search
        pos = torch.full((len(task.data),), -1, dtype=torch.long)
        pos[rows] = torch.arange(len(rows))
        start = split + 1 if split == backbone.num_stages else split
    else:
        encoded, digest = cache.encoded(task.data, pre)
        feats, start = encoded, 0
        data_info = {"mode": "in memory"}
    lengths = token_lengths(encoded) if encoded is not None else None
    if feats is not None and _gpu.fits_on_device(feats, device):
        # the whole training input on the GPU for this trial: a step indexes it there (no host gather, pinning
        # and copy per step); the cache's own entry stays on the host
        feats = _gpu.to_device(feats, device)
        pos = pos.to(device) if pos is not None else None
        data_info = {**data_info, "mode": "on the device"}

    def train_batches(epoch: int, batches: list[torch.Tensor]):
        """(batch indices, inputs on the CPU, labels) per step, in the order of ``batches``."""
        if disk_feats is not None:
            return ((b, disk_feats.read(b), labels[b]) for b in batches)
        if stream:
            from autoft.data.stream import StreamDataset, loader, sample_seed, train_transform

            ds = StreamDataset(task.data.inputs, task.data.labels, train_transform(pre, cfg.augment))
            keys = [[(i, None if cfg.augment == "none" else sample_seed(cfg.seed, epoch, i)) for i in b.tolist()]
                    for b in batches]
            return ((b, xb, yb) for b, (xb, yb) in zip(batches, loader(ds, keys, workers)))
        return ((b, index_state(feats, b if pos is None else pos[b]), labels[b]) for b in batches)

    def predict(idx: torch.Tensor) -> torch.Tensor:
        if disk_feats is not None:
            return _predict_batches(model, ((disk_feats.read(idx[i:i + 256]),) for i in range(0, len(idx), 256)),
                                    start, device, precision, nhwc)
        if stream:
            from autoft.data.stream import StreamDataset, eval_transform, loader

            ds = StreamDataset(task.data.inputs, task.data.labels, eval_transform(pre))
            keys = [[(i, None) for i in idx[j:j + 64].tolist()] for j in range(0, len(idx), 64)]
            return _predict_batches(model, loader(ds, keys, workers), 0, device, precision, nhwc)
        return predict_logits(model, feats, idx if pos is None else pos[idx], start, device,
                              precision=precision, nhwc=nhwc)

    torch.manual_seed(cfg.seed)
    if head is None:
        head = build_head(backbone.feature_dim, task.data.num_classes, cfg)
    model = Classifier(backbone, head).to(device)
    nhwc = channels_last(backbone, device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    scaler = grad_scaler(device, precision)  # fp16 only; disabled it passes backward and step through
    backbone_params = backbone.trainable_parameters()
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr})
    if cfg.optimizer == "adamw":  # fused on CUDA: one kernel for the whole update instead of several per tensor
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    else:
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    labels = torch.from_numpy(task.data.labels)
    criterion = build_criterion(cfg, labels[train_idx], task.data.num_classes, device)  # class weights: trained rows only
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch * cfg.epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    sign = -1.0 if task.direction == "minimize" else 1.0

    from autoft.data.stream import WaitClock

    clock = WaitClock()  # time the loop waits for its next batch, against the whole step
    history: list[dict[str, float]] = []
    best_score, best_epoch, stopped, metrics = -math.inf * sign, 0, False, {}
    if callable(getattr(reporter, "on_train_start", None)):  # epochs are timed from here (autoft.core.reporter)
        reporter.on_train_start()
    # a head on cached pooled features is tiny: per-op threading overhead would dominate it
    with single_thread(start > backbone.num_stages and device.type == "cpu"):
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
            loss_sum = 0.0
            # on CUDA the loss is not read every step (a read waits for the GPU, which then idles while the next
            # step is queued): each step's summed loss stays on the device and is checked once an epoch
            step_losses: list[torch.Tensor] | None = [] if device.type == "cuda" else None
            batches = epoch_batches(perm, cfg.batch_size, lengths, gen)
            t_step = time.perf_counter()
            for step, (b, xb, yb) in enumerate(_timed(train_batches(epoch, batches), clock)):
                xb = _gpu.to_device(trim_text(xb), device, nhwc)
                yb = _gpu.to_device(yb, device)
                try:
                    with autocast(device, precision):
                        logits = model.forward_from(xb, start)
                        loss = criterion(logits, yb)
                    if step_losses is None and not torch.isfinite(loss):
                        raise _loss_failure(loss.item(), epoch, step, cfg)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                except torch.OutOfMemoryError as exc:  # the trial fails with its reason; see autoft.core.gpu.oom_guard
                    raise _gpu.oom_failure(exc, cfg.batch_size, device, f"at epoch {epoch}, step {step + 1}") from exc
                scaler.step(opt)
                scaler.update()
                sched.step()
                if epoch == 1 and step + 1 == _gpu.PROBE_STEPS and hasattr(reporter, "on_first_steps"):
                    reporter.on_first_steps()  # peak memory of the first steps (GPU packing)
                if step_losses is None:
                    loss_sum += loss.detach().item() * len(b)
                else:
                    step_losses.append(loss.detach().float() * len(b))
                now = time.perf_counter()
                clock.total += now - t_step
                clock.steps += 1
                t_step = now
            if step_losses:
                per_step = torch.stack(step_losses).cpu()  # one wait for the GPU per epoch
                bad = torch.nonzero(~torch.isfinite(per_step)).flatten()
                if len(bad):
                    raise _loss_failure(per_step[bad[0]].item(), epoch, int(bad[0]), cfg)
                loss_sum = float(per_step.double().sum())
            logits = predict(eval_idx)
            metrics = compute_metrics(logits, labels[eval_idx], task.data.num_classes, task.positive_index)
            score = metrics[task.metric]
            if not math.isfinite(score):
                raise TrialFailed(f"validation {task.metric} is {score} at epoch {epoch}")
            history.append({"epoch": epoch, "train_loss": loss_sum / len(perm), **metrics})
            if sign * score > sign * best_score:
                best_score, best_epoch = score, epoch
            if reporter.report(epoch, score, metrics):
                stopped = epoch < cfg.epochs
                break

    result = FineTuneResult(score=metrics[task.metric], best_score=best_score, best_epoch=best_epoch,
                            metrics=metrics, history=history, epochs_run=len(history),
                            stopped_early=stopped, data={**data_info, **clock.to_dict()})
    if test:
        logits = predict(test_idx)
        result.test_metrics = compute_metrics(logits, labels[test_idx], task.data.num_classes, task.positive_index)
    if return_model:
        result.model = model.cpu().eval()
        if nhwc:
            result.model = result.model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - t0
    return result
