"""Streaming images through DataLoader worker processes: decode, transform, batch.

A :class:`StreamDataset` is indexed by ``(example, seed)`` keys: the worker that gets a key decodes that
example (:class:`autoft.data.images.ImageFiles` decodes on indexing) and applies the transform with the
random number generator seeded from the key, so an augmented epoch is the same whatever the number of
workers and whichever worker gets which batch.  Batches are lists of keys made by the training loop
(``batch_sampler``), so the loop decides the order (seeded) and the loader only does the work.

Transforms (:func:`eval_transform`, :func:`train_transform`): evaluation is the backbone's own preset
(:func:`autoft.export.runtime.preset_image`: shorter side resized, centre crop, normalised), exactly what
an exported model serves with.  Training augmentation (``augment``): ``light`` =
``RandomResizedCrop`` to the input size + horizontal flip; ``strong`` = light + ``TrivialAugmentWide``
(torchvision.transforms.v2), then the preset's normalisation.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
import torch

from autoft.zoo.base import Preprocessing

AUGMENTS = ("none", "light", "strong")


def default_workers() -> int:
    """DataLoader worker processes: ``AUTOFT_NUM_WORKERS``, else one per CPU core but one (the core that
    trains), at least 1 and at most 8."""
    env = os.environ.get("AUTOFT_NUM_WORKERS")
    if env and env.strip().isdigit():
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def _pre_dict(pre: Preprocessing | dict) -> dict:
    return pre if isinstance(pre, dict) else pre.to_dict()


class EvalTransform:
    """uint8 HxWxC → (C, S, S) float: the backbone's evaluation preprocessing (picklable)."""

    def __init__(self, pre: Preprocessing | dict):
        self.pre = _pre_dict(pre)

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        from autoft.export.runtime import encode_images, preset_image

        if self.pre.get("resize_size"):
            return preset_image(arr, self.pre)
        return encode_images([arr], self.pre)[0]


class TrainTransform:
    """uint8 HxWxC → (C, S, S) float with random augmentation (``light`` or ``strong``), picklable."""

    def __init__(self, pre: Preprocessing | dict, augment: str):
        if augment not in ("light", "strong"):
            raise ValueError(f"augment must be light or strong here, got {augment!r}")
        self.pre, self.augment = _pre_dict(pre), augment
        self._pipeline = None

    def _build(self):
        from torchvision.transforms import InterpolationMode, v2

        p = self.pre
        mode = InterpolationMode(p.get("interpolation") or "bilinear")
        size = int(p["input_size"])
        steps = [v2.RandomResizedCrop(size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
        if self.augment == "strong":
            steps.append(v2.TrivialAugmentWide(interpolation=mode))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(p["mean"]), list(p["std"]))]
        return v2.Compose(steps)

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        if self._pipeline is None:
            self._pipeline = self._build()
        t = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1)
        if t.shape[0] == 1 and self.pre.get("channels", 3) == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 4:
            t = t[:3]
        from torchvision import tv_tensors

        return self._pipeline(tv_tensors.Image(t.contiguous())).as_subclass(torch.Tensor).contiguous()

    def __getstate__(self):
        return {"pre": self.pre, "augment": self.augment, "_pipeline": None}


def eval_transform(pre: Preprocessing | dict) -> EvalTransform:
    return EvalTransform(pre)


def train_transform(pre: Preprocessing | dict, augment: str) -> Callable:
    return eval_transform(pre) if augment == "none" else TrainTransform(pre, augment)


class StreamDataset(torch.utils.data.Dataset):
    """``dataset[(i, seed)]`` → (transformed example i, its label); ``seed`` None: no randomness drawn."""

    def __init__(self, inputs, labels: np.ndarray, transform: Callable):
        self.inputs, self.labels, self.transform = inputs, np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        x = self.inputs[int(i)]
        if seed is None:
            t = self.transform(x)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                t = self.transform(x)
        return t, int(self.labels[int(i)])


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of example ``i``'s augmentation in ``epoch`` (independent of workers and batch order)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(i) * 104_729) % (2**63 - 1)


def eval_keys(idx, batch_size: int = 64) -> list[list[tuple[int, None]]]:
    """Batches of ``(example, None)`` keys (no randomness) over the examples ``idx``, in that order."""
    idx = idx.tolist() if hasattr(idx, "tolist") else list(idx)
    return [[(i, None) for i in idx[j:j + batch_size]] for j in range(0, len(idx), batch_size)]


def loader(dataset: StreamDataset, batches: Iterable[list], num_workers: int | None = None,
           prefetch: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader that produces ``batches`` (lists of keys) in order, in ``num_workers`` processes."""
    workers = default_workers() if num_workers is None else int(num_workers)
    kw = {"prefetch_factor": prefetch, "persistent_workers": False} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=list(batches), num_workers=workers, **kw)


class WaitClock:
    """Time spent waiting for the next batch vs. the whole step (the loader's share of step time)."""

    def __init__(self):
        self.wait = self.total = 0.0
        self.steps = 0

    def share(self) -> float:
        return self.wait / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"loader_wait_s": round(self.wait, 3), "step_s": round(self.total, 3), "steps": self.steps,
                "loader_wait_share": round(self.share(), 4)}
