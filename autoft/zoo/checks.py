"""Checks for a backbone split: the stages run one after another give the network's own features,
and one fine-tuning step trains exactly the unfrozen stages.

Used by the tests of every family; useful when adding one (``register_backbone``)::

    from autoft.zoo.checks import finetune_step, staged_features
    feats = staged_features(backbone, x)          # stage by stage, then the pool
    assert torch.allclose(feats, reference, atol=1e-5)
    finetune_step(backbone, x, unfreeze=2)         # raises AssertionError when something is wrong
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoft.zoo.base import Backbone, State


@torch.no_grad()
def staged_features(backbone: Backbone, state: State) -> torch.Tensor:
    """Feed each stage's output to the next, by hand, then pool (eval mode)."""
    was = backbone.training
    backbone.eval()
    try:
        for stage in backbone.stages:
            state = stage(state)
        return backbone.pool(state)
    finally:
        backbone.train(was)


def _batch_size(state: State) -> int:
    return len(state[0]) if isinstance(state, tuple) else len(state)


def finetune_step(backbone: Backbone, state: State, unfreeze: int | None = None, num_classes: int = 3,
                  lr: float = 1e-3, seed: int = 0) -> float:
    """One AdamW step on the last ``unfreeze`` stages (all by default) and a linear head.

    Checks: the loss is finite; every trainable parameter with a gradient moved (a parameter
    unused by this input, like an unused embedding row, may keep its value); no frozen parameter
    or batch-norm statistic of a frozen stage changed; the trainable parameters are exactly those of
    the unfrozen stages.  Returns the loss."""
    torch.manual_seed(seed)
    k = backbone.num_stages if unfreeze is None else unfreeze
    backbone.set_unfreeze(k)
    head = nn.Linear(backbone.feature_dim, num_classes)
    model = nn.Sequential(backbone, head)
    model.train()
    trainable = {id(p) for s in backbone.stages[backbone.split:] for p in s.parameters()}
    assert {id(p) for p in backbone.trainable_parameters()} == trainable, "trainable != parameters of the unfrozen stages"
    frozen = {n: t.detach().clone() for n, t in backbone.state_dict(keep_vars=True).items()
              if not (isinstance(t, nn.Parameter) and id(t) in trainable) and n.startswith("stages.")
              and int(n.split(".")[1]) < backbone.split}
    before = {id(p): p.detach().clone() for p in backbone.trainable_parameters()}
    opt = torch.optim.AdamW([*head.parameters(), *backbone.trainable_parameters()], lr=lr)
    y = torch.arange(_batch_size(state)) % num_classes
    loss = F.cross_entropy(model(state), y)
    assert torch.isfinite(loss), f"loss {loss.item()}"
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = [not torch.equal(before[id(p)], p.detach()) for p in backbone.trainable_parameters()
             if p.grad is not None and p.grad.abs().sum() > 0]
    assert all(moved), f"{moved.count(False)} trainable parameters with a gradient did not change"
    if trainable:
        assert moved, "no trainable parameter got a gradient"
    after = backbone.state_dict(keep_vars=True)
    changed = [n for n, t in frozen.items() if not torch.equal(t, after[n].detach())]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    model.eval()
    return loss.item()
