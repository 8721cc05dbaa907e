"""Deterministic, stratified train / validation / test splits from a seed.

The test split is carved out first and never used during search.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoft.errors import DataError


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratified_split(labels: np.ndarray, *, val: float = 0.15, test: float = 0.15, seed: int = 0,
                     train_per_class: int | None = None, val_per_class: int | None = None,
                     source: str = "data", class_names: Sequence[str] | None = None) -> Splits:
    """Split indices per class.

    Fractional mode (default): in every class, ``test`` and ``val`` fractions (at least one example
    each) and the rest for training.  Few-shot mode (``train_per_class``): that many training and
    ``val_per_class`` (default the same) validation examples per class; everything else is test.
    ``class_names`` (label index → name) lets errors name a class by its label.
    """
    labels = np.asarray(labels)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"split fractions val={val}, test={test} must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    counts = Counter(labels.tolist())
    tr, va, te = [], [], []
    def name(cls) -> str:
        if class_names is not None and 0 <= int(cls) < len(class_names):
            return repr(str(class_names[int(cls)]))
        return str(cls)

    for cls in sorted(counts):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        if train_per_class is not None:
            nv = val_per_class if val_per_class is not None else train_per_class
            need = train_per_class + nv + 1
            if n < need:
                raise DataError(f"{source}: class {name(cls)} has {n} examples; few-shot splitting needs at least "
                                f"{need} ({train_per_class} train + {nv} validation + 1 test)")
            tr.append(idx[:train_per_class]); va.append(idx[train_per_class:train_per_class + nv])
            te.append(idx[train_per_class + nv:])
            continue
        n_te = max(1, int(round(n * test))) if test > 0 else 0
        n_va = max(1, int(round(n * val))) if val > 0 else 0
        if n - n_te - n_va < 1:
            raise DataError(f"{source}: class {name(cls)} has only {n} example(s); a stratified split with "
                            f"val={val} and test={test} needs at least {int(test > 0) + int(val > 0) + 1} per class")
        te.append(idx[:n_te]); va.append(idx[n_te:n_te + n_va]); tr.append(idx[n_te + n_va:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)  # noqa: E731
    return Splits(cat(tr), cat(va), cat(te))
