"""Per-class results, the confusion matrix, decision rules and bootstrap confidence intervals.

Every metric value comes from torchmetrics (the same library and definitions as the search's
:func:`autoft.core.metrics.compute_metrics`); this module only chooses the predictions (argmax, or a
tuned threshold on the positive class of a binary task) and resamples examples for the intervals.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (binary_auroc, binary_f1_score, binary_precision,
                                                    binary_recall, multiclass_accuracy, multiclass_confusion_matrix,
                                                    multiclass_f1_score, multiclass_precision, multiclass_recall)

# metrics a decision threshold changes (and which threshold tuning may target without degenerating:
# precision_pos is maximised by predicting almost nothing positive, recall_pos by predicting everything)
THRESHOLD_METRICS = ("f1_pos", "f1_macro", "accuracy", "recall_macro", "precision_macro")


def as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def predictions(probs, positive_index: int | None = None, threshold: float | None = None) -> torch.Tensor:
    """Predicted class per row of ``probs`` (N, C): the argmax, or for a binary task with a
    ``threshold``, the positive class when its probability is at least the threshold."""
    p = as_tensor(probs, torch.float32)
    if threshold is None or p.shape[1] != 2:
        return p.argmax(1)
    pos = 1 if positive_index is None else int(positive_index)
    return torch.where(p[:, pos] >= threshold, torch.tensor(pos), torch.tensor(1 - pos))


def metric_value(name: str, probs: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, num_classes: int,
                 positive_index: int | None = None) -> float:
    """One metric (a name of :mod:`autoft.core.metrics`) for given probabilities and predictions."""
    c, kw = num_classes, {"validate_args": False}
    if name == "accuracy":
        v = multiclass_accuracy(preds, target, c, average="micro", **kw)
    elif name.endswith("_macro"):
        fn = {"precision_macro": multiclass_precision, "recall_macro": multiclass_recall,
              "f1_macro": multiclass_f1_score}[name]
        v = fn(preds, target, c, average="macro", zero_division=0, **kw)
    elif name == "loss":
        v = F.nll_loss(probs.clamp_min(1e-12).log(), target)
    else:
        pos = 1 if positive_index is None else positive_index
        bt = (target == pos).long()
        if name == "auroc":
            if not 0 < int(bt.sum()) < len(bt):
                return float("nan")
            v = binary_auroc(probs[:, pos], bt, **kw)
        else:
            fn = {"precision_pos": binary_precision, "recall_pos": binary_recall, "f1_pos": binary_f1_score}[name]
            v = fn((preds == pos).long(), bt, zero_division=0, **kw)
    return float(v)


def all_metrics(probs, target, num_classes: int, positive_index: int | None = None,
                threshold: float | None = None) -> dict[str, float]:
    """The search's metrics (accuracy, *_macro, loss; binary: *_pos, auroc) for the decision rule
    given by ``threshold`` (None = argmax, which gives exactly ``compute_metrics`` of the logits)."""
    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)
    preds = predictions(p, positive_index, threshold)
    names = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "loss"]
    if num_classes == 2:
        names += ["precision_pos", "recall_pos", "f1_pos", "auroc"]
    return {n: metric_value(n, p, preds, t, num_classes, positive_index) for n in names}


def per_class_table(preds, target, class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, then macro and weighted averages (torchmetrics)."""
    p, t = as_tensor(preds, torch.long), as_tensor(target, torch.long)
    c = len(class_names)
    rows = {}
    for avg in ("none", "macro", "weighted"):
        rows[avg] = {
            "precision": multiclass_precision(p, t, c, average=avg, zero_division=0),
            "recall": multiclass_recall(p, t, c, average=avg, zero_division=0),
            "f1": multiclass_f1_score(p, t, c, average=avg, zero_division=0),
        }
    support = torch.bincount(t, minlength=c)
    predicted = torch.bincount(p, minlength=c)
    df = pd.DataFrame({"class": list(class_names),
                       **{k: v.numpy().astype(float) for k, v in rows["none"].items()},
                       "support": support.numpy().astype(int), "predicted": predicted.numpy().astype(int)})
    extra = pd.DataFrame([{"class": f"({avg} avg)", **{k: float(v) for k, v in rows[avg].items()},
                           "support": int(support.sum()), "predicted": int(predicted.sum())}
                          for avg in ("macro", "weighted")])
    return pd.concat([df, extra], ignore_index=True)


def confusion_matrix(preds, target, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class (torchmetrics)."""
    return multiclass_confusion_matrix(as_tensor(preds, torch.long), as_tensor(target, torch.long),
                                       num_classes).numpy().astype(int)


def most_confused(cm: np.ndarray, class_names: list[str], top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1]
    out = []
    for flat in order[:top]:
        i, j = np.unravel_index(flat, cm.shape)
        if off[i, j] == 0:
            break
        out.append({"true": class_names[i], "predicted": class_names[j], "true_index": int(i),
                    "predicted_index": int(j), "count": int(off[i, j]),
                    "share_of_true": float(off[i, j] / max(cm[i].sum(), 1))})
    return out


@dataclass
class Interval:
    """A metric's value on the evaluated examples and its bootstrap percentile interval."""

    metric: str
    value: float
    low: float
    high: float
    level: float = 0.95
    resamples: int = 1000
    method: str = "percentile bootstrap over examples"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(probs, target, metric: str, num_classes: int, positive_index: int | None = None,
                 threshold: float | None = None, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``metric``: ``n_boot`` resamples of the examples (with
    replacement, seeded), the metric recomputed on each with torchmetrics.  Resamples where the metric
    is undefined (AUROC of a resample with one class) are left out."""
    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)
    preds = predictions(p, positive_index, threshold)
    value = metric_value(metric, p, preds, t, num_classes, positive_index)
    n = len(t)
    if n == 0 or n_boot < 1:
        return Interval(metric, value, float("nan"), float("nan"), level, 0)
    gen = torch.Generator().manual_seed(seed)
    vals = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // n))  # resample indices drawn a chunk at a time: bounded memory
    for start in range(0, n_boot, chunk):
        idx = torch.randint(0, n, (min(chunk, n_boot - start), n), generator=gen)
        for k, i in enumerate(idx):
            vals[start + k] = metric_value(metric, p[i], preds[i], t[i], num_classes, positive_index)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return Interval(metric, value, float("nan"), float("nan"), level, 0)
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return Interval(metric, value, float(lo), float(hi), level, int(len(vals)))
