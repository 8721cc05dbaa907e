"""Lazy sequences of examples: a view of some rows, and two sequences end to end.

The lazy sources (:class:`~autoft.data.images.ImageFiles`, :class:`~autoft.data.npz.NpzImages`) decode an
example only when it is indexed; these wrappers keep that property, so taking the test rows of 60,000 photos,
or appending a fixed test set, holds indices, not pixels.  Both pickle as their parts (DataLoader workers).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Rows(Sequence):
    """``Rows(seq, rows)[j]`` is ``seq[rows[j]]``, read when indexed."""

    def __init__(self, seq, rows):
        self.seq = seq
        self.rows = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return Rows(self.seq, self.rows[j])
        return self.seq[int(self.rows[j])]


class Chain(Sequence):
    """The examples of ``first`` then those of ``second``, read when indexed."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self, np.arange(len(self))[i])
        n = len(self.first)
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        return self.first[i] if i < n else self.second[i - n]

    def __add__(self, other) -> "Chain":
        return Chain(self, other)

    def digest(self) -> str:
        """The parts' digests (when both have one: lazy sources are fingerprinted without decoding)."""
        import hashlib

        return hashlib.sha256(f"{self.first.digest()}+{self.second.digest()}".encode()).hexdigest()
