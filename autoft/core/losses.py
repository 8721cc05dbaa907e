"""Training losses of a trial: cross entropy, class-weighted cross entropy, focal loss.

:func:`build_criterion` turns a :class:`TrialConfig` and the labels of the rows a run trains on
into a function ``criterion(logits, targets) -> scalar loss``.  The loss is training-only: it changes
how the weights are fitted, never how a model predicts (export and ``predict`` do not see it).

* ``ce`` — ``F.cross_entropy(logits, y, label_smoothing=ε)``, exactly as before this option existed.
* ``weighted`` — cross entropy with a weight per class from the training rows' class counts ``n_c``
  (``C`` classes): ``w_c = C · (1/n_c) / Σ_k (1/n_k)`` (inverse frequency, mean over classes 1; a class
  absent from the training rows counts as ``n_c = 1``, and is never a target).  The batch loss is
  PyTorch's weighted mean ``Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i}``, so the weights' overall scale does not
  change the learning rate's meaning.
* ``focal`` — focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"):
  ``ℓ_i = (1 - p_{i,y_i})^γ · CE_ε(i)`` averaged over the batch, ``γ = focal_gamma``; ``p`` is the
  softmax probability of the true class and ``CE_ε`` the (label-smoothed when ε > 0) cross entropy of
  example ``i``.  With ``γ = 0`` it is ``ce``.  No class weights (alpha = 1): the paper's best alpha
  with γ = 2 down-weighted the *rare* class (0.25), i.e. the modulating factor already does the
  rebalancing, so inverse-frequency alpha is not its recommendation; ``weighted`` covers that need.

Label smoothing works with all three: ``weighted`` uses PyTorch's weighted smoothed cross entropy,
``focal`` modulates the smoothed per-example cross entropy.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from autoft.core.config import TrialConfig
from autoft.errors import ConfigError

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("ce", "weighted", "focal")


def class_weights(train_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``w_c = C · (1/n_c) / Σ_k (1/n_k)`` (mean 1 over classes) from
    the labels of the training rows only; a class with no training row counts as one row."""
    counts = torch.bincount(torch.as_tensor(train_labels).long().flatten(), minlength=num_classes)[:num_classes]
    inv = 1.0 / counts.clamp(min=1).double()
    return (num_classes * inv / inv.sum()).float()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean focal loss ``(1 - p_t)^γ · CE_ε`` of a batch (float32 whatever the logits' dtype)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    if gamma == 0:
        mod = torch.ones_like(ce)
    else:
        p_t = torch.softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        mod = (1.0 - p_t).clamp(min=0.0).pow(gamma)
    return (mod * ce).mean()


def build_criterion(cfg: TrialConfig, train_labels: torch.Tensor, num_classes: int,
                    device: torch.device | str = "cpu") -> Criterion:
    """The loss of ``cfg`` as ``criterion(logits, targets)``.  ``train_labels``: the labels of the rows the
    run trains on (the training split in a search; class weights never see validation or test rows)."""
    eps = cfg.label_smoothing
    if cfg.loss == "ce":
        def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets, label_smoothing=eps)
        return ce
    if cfg.loss == "weighted":
        weight = class_weights(train_labels, num_classes).to(device)

        def weighted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=eps)
        return weighted
    if cfg.loss == "focal":
        gamma = cfg.focal_gamma

        def focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return focal_loss(logits, targets, gamma, eps)
        return focal
    raise ConfigError(f"unknown loss '{cfg.loss}'; expected one of {', '.join(LOSSES)}", field="loss")
