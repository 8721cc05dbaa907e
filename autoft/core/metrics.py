"""Validation metrics, computed with torchmetrics.

Always: ``accuracy`` (micro), ``precision_macro``, ``recall_macro``, ``f1_macro``.  Binary tasks also:
``precision_pos``, ``recall_pos``, ``f1_pos`` (of the positive class) and ``auroc``.  Plus ``loss``
(mean cross-entropy, no smoothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (binary_auroc, binary_f1_score, binary_precision,
                                                    binary_recall, multiclass_accuracy, multiclass_f1_score,
                                                    multiclass_precision, multiclass_recall)

MAXIMIZE = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_pos", "recall_pos",
            "f1_pos", "auroc"}
MINIMIZE = {"loss"}
ALL = MAXIMIZE | MINIMIZE
BINARY_ONLY = {"precision_pos", "recall_pos", "f1_pos", "auroc"}


def compute_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                    positive_index: int | None = None) -> dict[str, float]:
    logits, target = logits.float(), target.long()
    preds = logits.argmax(1)
    c = num_classes
    out = {
        "accuracy": multiclass_accuracy(preds, target, c, average="micro"),
        "precision_macro": multiclass_precision(preds, target, c, average="macro", zero_division=0),
        "recall_macro": multiclass_recall(preds, target, c, average="macro", zero_division=0),
        "f1_macro": multiclass_f1_score(preds, target, c, average="macro", zero_division=0),
        "loss": F.cross_entropy(logits, target),
    }
    if c == 2:
        pos = 1 if positive_index is None else positive_index
        bp, bt = (preds == pos).long(), (target == pos).long()
        prob = logits.softmax(1)[:, pos]
        out |= {"precision_pos": binary_precision(bp, bt, zero_division=0),
                "recall_pos": binary_recall(bp, bt, zero_division=0),
                "f1_pos": binary_f1_score(bp, bt, zero_division=0),
                "auroc": binary_auroc(prob, bt) if 0 < int(bt.sum()) < len(bt) else torch.tensor(float("nan"))}
    return {k: float(v) for k, v in out.items()}
