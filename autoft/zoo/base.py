"""The one shape every backbone in the zoo has.

A :class:`Backbone` is an ordered list of *stages* (input → output; the stem is stage 0), a
parameter-free ``pool`` that turns the last stage's output into a feature vector of width
``feature_dim``, and the :class:`Preprocessing` its inputs need.  ``set_unfreeze(k)`` trains the
last ``k`` stages and freezes the rest; frozen stages always run in eval mode (batch-norm
statistics and dropout frozen), whatever ``train()`` says.

A stage takes one *state* and returns the next one.  For images the state is a tensor
``(N, C, H, W)`` (``(N, D)`` once a network has pooled); for text it is a tuple
``(hidden_states, attention_mask)``.

Every parameter belongs to exactly one stage.  A parameter that several stages use (DeBERTa's
relative position embeddings) belongs to the earliest of them, so that a frozen stage never
depends on a trained parameter (the frozen prefix can be cached).  ``freeze_norm_stats`` keeps
every batch-norm layer in eval mode, trained or not (checkpoints whose batch norm was folded into
the convolutions, or very small batches).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

State = Any  # torch.Tensor or tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Preprocessing:
    """How raw inputs become the first stage's input. Serialisable (goes into exports).

    Images: ``input_size`` is the side of the square the network sees (the preset's crop size);
    ``resize_size`` and ``interpolation`` complete the weights' preset (resize the shorter side,
    then centre-crop ``input_size``; ``None``: resize straight to ``input_size``).  See
    :meth:`image_preset` and :class:`autoft.zoo.ImagePreset`."""

    modality: str  # "image" | "text"
    input_size: int | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels: int = 3
    tokenizer: str | None = None  # folder or hub name of the tokenizer (text)
    max_length: int = 128
    resize_size: int | None = None
    interpolation: str = "bilinear"

    @classmethod
    def from_preset(cls, preset) -> "Preprocessing":
        """From an :class:`ImagePreset` or a :class:`TextPreset`."""
        from autoft.zoo._api import ImagePreset

        if isinstance(preset, ImagePreset):
            return cls(modality="image", input_size=preset.crop_size, mean=preset.mean, std=preset.std,
                       resize_size=preset.resize_size, interpolation=preset.interpolation)
        return cls(modality="text", tokenizer=preset.tokenizer, max_length=preset.max_length)

    def image_preset(self):
        """The image preset (:class:`autoft.zoo.ImagePreset`: resize_size, crop_size, interpolation,
        mean, std) these settings describe."""
        from autoft.zoo._api import ImagePreset

        if self.modality != "image":
            raise ValueError("a text backbone has no image preset")
        return ImagePreset(crop_size=int(self.input_size), resize_size=self.resize_size,
                           interpolation=self.interpolation, mean=self.mean, std=self.std)

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
                 preprocessing: Preprocessing, meta: dict | None = None, freeze_norm_stats: bool = False):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing
        self.meta: dict = dict(meta or {})
        self.freeze_norm_stats = bool(freeze_norm_stats)
        if self.freeze_norm_stats:
            self.meta["batchnorm"] = "frozen"
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
        if self.freeze_norm_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward_stages(self, state: State, start: int = 0, end: int | None = None) -> State:
        for stage in self.stages[start:end]:
            state = stage(state)
        return state

    def forward(self, state: State) -> torch.Tensor:
        return self.pool(self.forward_stages(state))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def __getattr__(name: str):
    if name == "BackboneSpec":  # the record replaced it; kept importable for old code
        from autoft.zoo._api import BackboneRecord

        return BackboneRecord
    raise AttributeError(name)
