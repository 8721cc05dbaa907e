"""Heads, and the classifier that joins a backbone and a head."""
from __future__ import annotations

import torch
from torch import nn

from autoft.core.config import TrialConfig
from autoft.zoo.base import Backbone, State

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def build_head(in_dim: int, num_classes: int, cfg: TrialConfig) -> nn.Module:
    """Linear, or an MLP with ``head_depth`` hidden layers of ``head_width`` units."""
    if cfg.head == "linear":
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, num_classes)) if cfg.dropout \
            else nn.Linear(in_dim, num_classes)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(cfg.head_depth):
        layers += [nn.Linear(width, cfg.head_width), _ACTIVATIONS[cfg.activation]()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = cfg.head_width
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """backbone stages → pool → head.  ``forward`` runs the whole network from raw encoded input."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, state: State) -> torch.Tensor:
        return self.head(self.backbone(state))

    def forward_from(self, state: State, start: int) -> torch.Tensor:
        """Logits from the state entering stage ``start``.

        ``start == num_stages + 1`` means ``state`` is already the pooled feature vector.
        Frozen stages at or after ``start`` run without building a graph.
        """
        bb = self.backbone
        if start > bb.num_stages:
            return self.head(state)
        if start < bb.split:
            from autoft.core.precision import no_autocast

            # frozen stages in float32 under any autocast: the same numbers as the cached prefix
            with torch.no_grad(), no_autocast(_state_device(state)):
                state = bb.forward_stages(state, start, bb.split)
            start = bb.split
        return self.head(bb.pool(bb.forward_stages(state, start)))


def _state_device(state: State) -> torch.device:
    return (state[0] if isinstance(state, tuple) else state).device
