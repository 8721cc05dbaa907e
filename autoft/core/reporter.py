"""The one thing the core knows about search engines: a reporter it calls after every epoch.

A reporter may also have an ``on_train_start()`` method (not part of the protocol, so existing
reporters need none): the core calls it once, just before the first epoch, when the model is built
and the frozen-prefix features are ready. Engines use it to time epochs apart from that set-up (a
time budget stops a trial at the epoch boundary where its next epoch would end too late)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Reporter(Protocol):
    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        """Record ``value`` (the task's metric) after epoch ``step``; return True to stop training."""


class NullReporter:
    """Never stops; keeps what it was told (handy in tests and for refits)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        self.history.append((step, value))
        return False


class StopAfter(NullReporter):
    """Asks to stop once ``n`` epochs have been reported."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        super().report(step, value, metrics)
        return len(self.history) >= self.n
