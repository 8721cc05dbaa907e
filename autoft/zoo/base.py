"""The one shape every backbone in the zoo has.

A :class:`Backbone` is an ordered list of *stages* (input → output; the stem is stage 0), a
parameter-free ``pool`` that turns the last stage's output into a feature vector of width
``feature_dim``, and the :class:`Preprocessing` its inputs need.  ``set_unfreeze(k)`` trains the
last ``k`` stages and freezes the rest; frozen stages always run in eval mode (batch-norm
statistics and dropout frozen), whatever ``train()`` says.

A stage takes one *state* and returns the next one.  For images the state is a tensor
``(N, C, H, W)``; for text it is a tuple ``(hidden_states, attention_mask)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

State = Any  # torch.Tensor or tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Preprocessing:
    """How raw inputs become the first stage's input. Serialisable (goes into exports)."""

    modality: str  # "image" | "text"
    input_size: int | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels: int = 3
    tokenizer: str | None = None  # folder or hub name of the tokenizer (text)
    max_length: int = 128

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def key(self) -> str:
        """A string that changes whenever the preprocessing would produce different tensors."""
        return repr(sorted(self.to_dict().items()))


def index_state(state: State, idx) -> State:
    if isinstance(state, tuple):
        return tuple(s[idx] for s in state)
    return state[idx]


def cat_states(states: list[State]) -> State:
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states))
    return torch.cat(states)


def text_mask(state: State) -> torch.Tensor | None:
    """The attention mask of a text state (``(ids or hidden states, mask)``), None for images."""
    if isinstance(state, tuple) and len(state) == 2 and state[1].dim() == 2:
        return state[1]
    return None


def state_to(state: State, device) -> State:
    if isinstance(state, tuple):
        return tuple(s.to(device) for s in state)
    return state.to(device)


class Backbone(nn.Module):
    def __init__(self, name: str, stages: list[nn.Module], pool: nn.Module, feature_dim: int,
                 preprocessing: Preprocessing, meta: dict | None = None):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing
        self.meta: dict = dict(meta or {})
        self.unfreeze = len(self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def split(self) -> int:
        """Index of the first trainable stage (stages before it are frozen)."""
        return self.num_stages - self.unfreeze

    def set_unfreeze(self, k: int) -> "Backbone":
        if not 0 <= int(k) <= self.num_stages:
            raise ValueError(f"unfreeze must be between 0 and {self.num_stages} for backbone "
                             f"'{self.name}' ({self.num_stages} stages), got {k}")
        self.unfreeze = int(k)
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= self.split)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for stage in self.stages[: self.split]:
            stage.eval()
        return self

    def forward_stages(self, state: State, start: int = 0, end: int | None = None) -> State:
        for stage in self.stages[start:end]:
            state = stage(state)
        return state

    def forward(self, state: State) -> torch.Tensor:
        return self.pool(self.forward_stages(state))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass
class BackboneSpec:
    """A zoo entry: how to build a backbone and whether its weights are on this machine."""

    name: str
    family: str
    modality: str
    builder: Any  # callable(pretrained: bool) -> Backbone
    available: Any  # callable() -> bool
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def build(self, pretrained: bool = True) -> Backbone:
        return self.builder(pretrained=pretrained)
