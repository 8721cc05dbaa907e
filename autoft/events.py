"""Engine-neutral events of a search, and the callbacks that receive them.

Both engines emit the same five events, in the process that started the search (the Ray engine
translates Ray Tune's driver callbacks; the Optuna engine emits them around each trial):

=================  ==========================================================================
``search_start``   :class:`SearchStarted`: task, study, engine, budget, backbones
``trial_start``    :class:`TrialStarted`: a trial's key and configuration
``epoch``          :class:`EpochReported`: a trial's validation metrics after one epoch
``trial_end``      :class:`TrialEnded`: state (complete / pruned / fail), score, metrics
``search_end``     :class:`SearchEnded`: the winner, its test metrics, the result files
=================  ==========================================================================

A callback subclasses :class:`Callback` and overrides what it needs::

    class Printer(autoft.Callback):
        def on_trial_end(self, e):
            print(e.key, e.state, e.value)

    autoft.search("digits", n_trials=4, callbacks=[Printer()])

With ``n_jobs > 1`` the Optuna engine runs trials in threads, so a callback may be called from
several threads at once. An exception in a callback is logged and never stops the search.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchStarted:
    task: str
    study: str
    engine: str
    budget: int
    metric: str
    direction: str
    storage: str  # password redacted
    backbones: tuple[str, ...]
    device: str
    resumed: int = 0  # finished trials already in the study
    extend: bool = False  # the budget comes on top of the finished trials
    timeout: float | None = None
    pruner: str = ""
    examples: int = 0
    classes: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # train / val / test


@dataclass(frozen=True)
class TrialStarted:
    key: str  # the Optuna trial number (Optuna engine) or Ray Tune's trial id (Ray engine)
    config: dict[str, Any]
    origin: str = "sampler"


@dataclass(frozen=True)
class EpochReported:
    key: str
    epoch: int
    value: float  # the task's metric on the validation split
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialEnded:
    key: str
    state: str  # complete | pruned | fail
    value: float | None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    seconds: float | None = None
    fail_reason: str = ""
    number: int | None = None  # the trial's number in the study, when already known
    origin: str = "sampler"  # sampler | first trial | retry of #N
    stopped_by: str = ""  # "time budget" when the deadline stopped it (state pruned)


@dataclass(frozen=True)
class SearchEnded:
    task: str
    study: str
    best_number: int | None
    best_value: float | None
    best_config: dict[str, Any] | None
    counts: dict[str, int]
    test_metrics: dict[str, float] | None
    results_dir: Path
    files: tuple[Path, ...] = ()
    ranking: tuple[dict, ...] = ()  # the backbone ranking made before the search (LogME), if any
    export_dir: Path | None = None
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preparing, ranking, trials, final check, ...


class Callback:
    """Receives a search's events; every method is optional (the defaults do nothing)."""

    def on_search_start(self, event: SearchStarted) -> None: ...

    def on_trial_start(self, event: TrialStarted) -> None: ...

    def on_epoch(self, event: EpochReported) -> None: ...

    def on_trial_end(self, event: TrialEnded) -> None: ...

    def on_search_end(self, event: SearchEnded) -> None: ...


_METHOD = {SearchStarted: "on_search_start", TrialStarted: "on_trial_start", EpochReported: "on_epoch",
           TrialEnded: "on_trial_end", SearchEnded: "on_search_end"}


class Events:
    """The callbacks of one search; :meth:`emit` calls each in turn and logs (never raises) their errors."""

    def __init__(self, callbacks: list[Callback] | tuple[Callback, ...] | None = None):
        self.callbacks = list(callbacks or [])
        self._lock = threading.Lock()
        self._failed: set[tuple[int, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def emit(self, event) -> None:
        method = _METHOD[type(event)]
        for cb in self.callbacks:
            fn = getattr(cb, method, None)
            if fn is None:
                continue
            try:
                fn(event)
            except Exception as exc:  # a broken callback must not cost the user the search
                with self._lock:
                    first = (id(cb), method) not in self._failed
                    self._failed.add((id(cb), method))
                if first:
                    log.warning("callback %s.%s failed (the search goes on; further errors of it are logged at "
                                "debug level): %s: %s", type(cb).__name__, method, type(exc).__name__, exc)
                else:
                    log.debug("callback %s.%s failed again: %s", type(cb).__name__, method, exc)
