"""In-process caches that make repeated trials cheap, exactly.

* pristine backbones (weights read and verified once, then copied per trial);
* encoded inputs per (data, preprocessing);
* frozen-prefix outputs per (backbone weights, split point, data, preprocessing): the output of a
  frozen prefix in eval mode is the same in every epoch and every trial, so it is computed once.
  When every stage is frozen the pooled feature vector is kept instead (much smaller).

Entries are evicted least-recently-used once ``max_bytes`` is exceeded.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict

import torch

from autoft.data.datasets import LabelledData
from autoft.data.encode import encode
from autoft.zoo import get_backbone
from autoft.zoo.base import Backbone, Preprocessing, State, cat_states, index_state, state_to

log = logging.getLogger(__name__)


def state_nbytes(state: State) -> int:
    if isinstance(state, tuple):
        return sum(s.element_size() * s.nelement() for s in state)
    return state.element_size() * state.nelement()


def state_digest(state: State) -> str:
    h = hashlib.sha256()
    for t in (state if isinstance(state, tuple) else (state,)):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trim_text(state: State) -> State:
    """Drop padding columns that no example in this batch uses (exact under the attention mask)."""
    if isinstance(state, tuple) and len(state) == 2 and state[1].dim() == 2:
        longest = max(int(state[1].sum(1).max()), 1)
        if longest < state[1].shape[1]:
            return tuple(s[:, :longest] for s in state)
    return state


class FeatureCache:
    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._backbones: dict[str, Backbone] = {}
        self._encoded: dict[tuple, tuple[State, str]] = {}
        self._prefix: OrderedDict[tuple, State] = OrderedDict()
        self.hits = self.misses = 0

    # -- backbones -------------------------------------------------------------------------
    def backbone(self, name: str) -> Backbone:
        if name not in self._backbones:
            self._backbones[name] = get_backbone(name)
        return copy.deepcopy(self._backbones[name])

    # -- encoded inputs --------------------------------------------------------------------
    def encoded(self, data: LabelledData, pre: Preprocessing) -> tuple[State, str]:
        """The whole dataset encoded for ``pre``, and a digest of those tensors."""
        key = (data.fingerprint(), pre.key())
        if key not in self._encoded:
            state = encode(data.inputs, pre)
            self._encoded[key] = (state, state_digest(state))
        return self._encoded[key]

    # -- frozen prefix ---------------------------------------------------------------------
    def prefix(self, backbone: Backbone, state: State, digest: str, split: int,
               device: torch.device | str = "cpu", batch_size: int = 256) -> State:
        """Output of stages [0, split) for every example (pooled when split == num_stages)."""
        key = (backbone.name, repr(sorted(backbone.meta.items())), split, digest)
        if key in self._prefix:
            self.hits += 1
            self._prefix.move_to_end(key)
            return self._prefix[key]
        self.misses += 1
        out = compute_prefix(backbone, state, split, device, batch_size)
        self._prefix[key] = out
        self._evict()
        return out

    def _evict(self) -> None:
        total = sum(state_nbytes(s) for s in self._prefix.values())
        while total > self.max_bytes and len(self._prefix) > 1:
            _, old = self._prefix.popitem(last=False)
            total -= state_nbytes(old)


@torch.no_grad()
def compute_prefix(backbone: Backbone, state: State, split: int, device="cpu", batch_size: int = 256) -> State:
    was_training = backbone.training
    backbone.eval()
    n = len(state[0]) if isinstance(state, tuple) else len(state)
    parts = []
    for i in range(0, n, batch_size):
        xb = index_state(state, slice(i, i + batch_size))
        xb = state_to(trim_text(xb), device)
        out = backbone.forward_stages(xb, 0, split)
        if split == backbone.num_stages:
            out = backbone.pool(out)
        elif isinstance(out, tuple) and isinstance(state, tuple):
            # keep the full padded width so that examples can be batched together later
            width = state[1].shape[1]
            out = tuple(_pad_to(o, width) for o in out)
        parts.append(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu())
    backbone.train(was_training)
    return cat_states(parts)


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.dim() >= 2 and t.shape[1] < width:
        pad = torch.zeros((t.shape[0], width - t.shape[1], *t.shape[2:]), dtype=t.dtype)
        return torch.cat([t, pad], 1)
    return t
