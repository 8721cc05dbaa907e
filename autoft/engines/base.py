"""The engine contract: a search request goes in, trials are left in the study.

An engine (:class:`Engine`) receives a :class:`SearchRequest` (task, search space, budget, one pruner
spec, execution settings with the device resolved once) and the search's events
(:class:`autoft.events.Events`); it runs trials of the core (``fine_tune_and_score``) and leaves every
one in the Optuna study named by the request, through the one record writer
(:mod:`autoft.study.record`). The Optuna engine runs them in this process (threads for ``n_jobs``),
the Ray engine on a Ray cluster; both translate the same :class:`~autoft.engines.pruners.PrunerSpec`.
"""
from __future__ import annotations

import math
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import optuna

from autoft.engines.pruners import PrunerSpec
from autoft.space import SearchSpace, load_space
from autoft.study.location import StudyLocation
from autoft.study.storage import redact_url
from autoft.task import Task


@dataclass(frozen=True)
class Execution:
    """How trials run: the device (resolved once, :func:`autoft.core.device.resolve_device`),
    parallelism and, for Ray, the resources of one trial."""

    device: str = "cpu"
    n_jobs: int = 1  # Optuna: trials side by side in this process (threads)
    shared: bool = False  # other processes run trials of the same study (autoft worker)
    address: str | None = None  # Ray: cluster address; None starts a local Ray
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None


TIMEOUT_MODES = ("command", "trials")
# --objectives: the task's metric first (named "accuracy" whatever the metric is, or by its own name), then
# optionally one latency figure of the trial's model to minimise (autoft.core.latency), by its user attribute
METRIC_OBJECTIVE = "accuracy"
LATENCY_OBJECTIVES = {"latency": "latency_cpu_b1_ms", "latency_cpu_b1": "latency_cpu_b1_ms",
                      "latency_cpu_b64": "latency_cpu_b64_ms", "latency_gpu_b1": "latency_gpu_b1_ms",
                      "latency_gpu_b64": "latency_gpu_b64_ms"}


def parse_objectives(value, task: Task, field: str = "--objectives") -> tuple[str, ...] | None:
    """``"accuracy,latency"`` (or a list) → ``(task.metric, "latency_cpu_b1_ms")``: the task's metric,
    then the latency attribute to minimise; ``"accuracy"`` alone → ``(task.metric,)``; None/empty → None.
    ``latency`` is the CPU latency at batch 1; ``latency_cpu_b64``, ``latency_gpu_b1``, ``latency_gpu_b64``
    name the others. A :class:`~autoft.errors.ConfigError` names ``field`` (and the task file for its field)."""
    from autoft.errors import ConfigError, did_you_mean

    if value is None:
        return None
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if not names:
        return None
    file = task.file if field == "objectives" else None
    known = [METRIC_OBJECTIVE, task.metric, *LATENCY_OBJECTIVES]
    for n in names:
        if n not in known:
            raise ConfigError(f"unknown objective '{n}'{did_you_mean(n, known)}; expected '{METRIC_OBJECTIVE}' "
                              f"(the task's metric, {task.metric}), optionally followed by one of "
                              f"{', '.join(LATENCY_OBJECTIVES)} (e.g. accuracy,latency)", file=file, field=field)
    if names[0] not in (METRIC_OBJECTIVE, task.metric) or len(names) > 2 or \
            (len(names) == 2 and names[1] not in LATENCY_OBJECTIVES):
        raise ConfigError(f"expected the task's metric ('{METRIC_OBJECTIVE}' or '{task.metric}') first, then at "
                          f"most one latency objective, e.g. accuracy,latency; got {','.join(names)}",
                          file=file, field=field)
    return (task.metric,) if len(names) == 1 else (task.metric, LATENCY_OBJECTIVES[names[1]])
STOPPED_BY_BUDGET = "time budget"  # the ``stopped_by`` attribute of a trial the deadline stopped


class TimeBudget:
    """The clock of one search command, and (``timeout_mode`` ``command``) its deadline.

    ``command`` (default): ``timeout`` seconds bound the whole command, counted from ``started``:
    preparing the data, the ranking, the trials, the final check of the winner and the report are
    planned inside it. Trials get the time up to :meth:`trials_end`: the deadline less the expected
    cost of the final check (:meth:`reserve_final_check`, from the winner's own trial time) and
    :attr:`TAIL_SECONDS` for the report. A trial is stopped at the last epoch boundary where its next
    epoch would end after that point (:meth:`next_epoch_fits`), and a new trial starts only while a
    trial as long as the longest one so far would still end by then (:meth:`may_start_trial`): a trial
    cut short by the deadline is no candidate for the winner.

    ``trials``: the old meaning, "no new trial starts after ``timeout`` seconds of trials" (a running
    trial runs to its end, and the final check follows); the engines pass ``timeout`` to Optuna /
    Ray Tune as before. Either way the phases are timed (:meth:`phase`, :attr:`phases`).
    """

    TAIL_SECONDS = 4.0  # the report files, the summary, and the end of the process (Python's own shutdown
    #                     after torch takes 1-2 s on 2 CPU cores)
    FINAL_CHECK_FACTOR = 1.15  # the refit also prepares the test split's features and scores it
    FINAL_CHECK_EXTRA = 1.0  # seconds: loading the winner's configuration, scoring the test split
    EXPORT_EXTRA = 15.0  # seconds: writing and checking the export's formats (pt2, ONNX)
    GRACE = 0.05  # of the budget: how far past the deadline an expected final check may end

    def __init__(self, timeout: float | None = None, mode: str = "command", *, started: float | None = None,
                 final_check: bool = True, export: bool = False, clock=time.monotonic):
        if mode not in TIMEOUT_MODES:
            from autoft.errors import ConfigError

            raise ConfigError(f"unknown timeout mode '{mode}'; expected one of {', '.join(TIMEOUT_MODES)}",
                              field="--timeout-mode")
        self.timeout, self.mode, self.final_check, self.export = timeout, mode, final_check, export
        self.clock = clock
        self.started = clock() if started is None else started
        self.phases: dict[str, float] = {}  # name -> seconds, in the order the phases ran
        self.reserved = 0.0  # seconds kept for the final check of the current winner
        self.longest_trial = 0.0  # seconds of the longest trial so far (projected to all its epochs)
        self.stopped: list = []  # keys (Optuna: trial numbers) of the trials the deadline stopped
        self._lock = threading.Lock()

    # -- the deadline ------------------------------------------------------------------------------
    @property
    def limited(self) -> bool:
        """True when the timeout bounds the whole command (``command`` mode with a timeout)."""
        return self.mode == "command" and self.timeout is not None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout if self.limited else math.inf

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds to the deadline (``inf`` without one; negative once passed)."""
        return self.deadline - self.clock()

    def trials_end(self) -> float:
        """When trials must have ended for the final check and the report to fit before the deadline."""
        return self.deadline - self.reserved - self.TAIL_SECONDS

    def refit_cost(self, seconds) -> float | None:
        """Expected seconds of the final check of a trial that took ``seconds`` (None: not a duration)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            return None
        cost = self.FINAL_CHECK_FACTOR * max(0.0, float(seconds)) + self.FINAL_CHECK_EXTRA
        return cost + (self.EXPORT_EXTRA if self.export else 0.0)

    def final_check_cost(self, trial) -> float | None:
        """Expected seconds of the final check of ``trial`` (a refit, from its own ``seconds``), or None
        when the trial does not say how long it took."""
        from autoft.study.record import ATTR_SECONDS

        return self.refit_cost(trial.user_attrs.get(ATTR_SECONDS)) if trial is not None else None

    def reserve_final_check(self, winner) -> None:
        """Keep the expected final check of ``winner`` (the best trial so far, or None) out of the trials' time."""
        from autoft.study.record import ATTR_SECONDS

        self.reserve(winner.user_attrs.get(ATTR_SECONDS) if winner is not None else None)

    def reserve(self, winner_seconds) -> None:
        """As :meth:`reserve_final_check`, from the winner's trial time (None: no winner yet)."""
        cost = self.refit_cost(winner_seconds) if self.final_check or self.export else None
        self.reserved = cost or 0.0

    def final_check_fits(self, winner) -> tuple[bool, float]:
        """Whether the final check of ``winner`` is expected to end by the deadline, and its expected
        seconds. The estimate has its own margin (:attr:`FINAL_CHECK_FACTOR`), so an expected end up to
        :attr:`GRACE` of the budget past the deadline (a last epoch that ran long) still counts as fitting."""
        cost = self.final_check_cost(winner) or 0.0
        return self.clock() + cost + self.TAIL_SECONDS <= self.deadline + self.GRACE * (self.timeout or 0.0), cost

    # -- trials ------------------------------------------------------------------------------------
    def next_epoch_fits(self, epoch_seconds: float) -> bool:
        """Whether another epoch as long as the last one ends before :meth:`trials_end`."""
        return not self.limited or self.clock() + max(0.0, epoch_seconds) <= self.trials_end()

    def trials_over(self) -> bool:
        """Whether :meth:`trials_end` has passed."""
        return self.limited and self.clock() >= self.trials_end()

    def note_trial(self, seconds, epochs_run, planned_epochs) -> None:
        """A trial ran ``epochs_run`` of its ``planned_epochs`` in ``seconds`` (so far, or in all)."""
        try:
            seconds, epochs_run, planned = float(seconds), int(epochs_run), int(planned_epochs)
        except (TypeError, ValueError):
            return
        if epochs_run < 1 or planned < 1 or not math.isfinite(seconds):
            return
        with self._lock:
            self.longest_trial = max(self.longest_trial, seconds * max(1.0, planned / epochs_run))

    def may_start_trial(self) -> bool:
        """Whether a new trial as long as the longest one so far (all its epochs) ends by :meth:`trials_end`
        (the first trial starts whenever there is time left for trials)."""
        return not self.limited or self.clock() + self.longest_trial < self.trials_end()

    def trial_stopped(self, key) -> None:
        with self._lock:
            self.stopped.append(key)

    # -- timings -----------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name`` (added up when a phase runs more than once)."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def timings(self) -> dict[str, float]:
        """Seconds per phase, in order, and ``total`` (seconds since the command started)."""
        return {**{k: round(v, 3) for k, v in self.phases.items()}, "total": round(self.elapsed(), 3)}


@dataclass
class SearchRequest:
    """One search: the task, its space (after overrides), the budget, the pruner and how to run it."""

    task: Task
    space: SearchSpace
    study_name: str = "default"
    results_dir: Path = Path("results")
    storage: str | None = field(default=None, repr=False)  # may hold a password: shown only through redact_url
    n_trials: int | None = None
    timeout: float | None = None
    pruner: str | None = None  # None: the task file's
    extend: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)  # values every trial gets (epochs, seed)
    execution: Execution = field(default_factory=Execution)
    # the command's clock and deadline; None: ``timeout`` means "no new trial after" (as before)
    time_budget: TimeBudget | None = field(default=None, repr=False)
    # (metric,) or (metric, latency attribute) (parse_objectives); None: an existing study's own, else the
    # metric alone. The engine sets it to what the study holds once it is open.
    objectives: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.location = StudyLocation(self.task.name, self.study_name, self.results_dir, self.storage,
                                      task_file=self.task.file)  # validates both names

    def __repr__(self) -> str:
        return (f"SearchRequest(task={self.task.name!r}, study_name={self.study_name!r}, "
                f"results_dir={str(self.results_dir)!r}, storage={redact_url(self.storage)!r})")

    @property
    def n_jobs(self) -> int:
        return self.execution.n_jobs

    @property
    def parallel(self) -> bool:
        """Trials of this study run side by side (threads here, or other processes)."""
        return self.execution.n_jobs > 1 or self.execution.shared

    @property
    def study_dir(self) -> Path:
        return self.location.study_dir

    @property
    def storage_url(self) -> str:
        return self.location.storage_url

    @property
    def shown_storage(self) -> str:
        return self.location.shown_storage

    @property
    def trials_timeout(self) -> float | None:
        """What the engine passes on as "no new trial starts after this many seconds": ``timeout``,
        unless the request's time budget bounds the whole command (then its deadline rules)."""
        return None if self.time_budget is not None and self.time_budget.limited else self.timeout

    @property
    def budget(self) -> int:
        return self.n_trials if self.n_trials is not None else self.task.budget.n_trials

    @property
    def multi_objective(self) -> bool:
        """The metric and a latency figure: a multi-objective study (Optuna cannot prune its trials)."""
        return self.objectives is not None and len(self.objectives) > 1

    @property
    def latency_objective(self) -> str | None:
        """The latency attribute minimised as the second objective, or None."""
        return self.objectives[1] if self.multi_objective else None

    @property
    def directions(self) -> list[str]:
        return [self.task.direction, "minimize"] if self.multi_objective else [self.task.direction]

    @property
    def pruner_name(self) -> str:
        if self.multi_objective:  # Trial.report/should_prune raise in a multi-objective Optuna study
            return "none"
        return self.pruner or self.task.pruner

    def pruner_spec(self, n_train: int | None) -> PrunerSpec:
        """The one pruner spec both engines translate (epochs are the fidelity)."""
        return PrunerSpec.for_search(self.pruner_name, max_epochs(self.space, self.task), n_train)


@runtime_checkable
class Engine(Protocol):
    """What the search needs of an engine (:func:`autoft.engines.get_engine`)."""

    name: str

    def open(self, request: SearchRequest, n_train: int | None = None) -> optuna.Study:
        """Open (or create) the request's study."""

    def run(self, request: SearchRequest, *, task_data, events, cache, rank=None) -> optuna.Study:
        """Run (or resume) the search; emit ``events``; return the study holding every trial."""


def build_request(task: Task, *, space_path: str | None = None, overrides: dict | None = None,
                  backbones: list[str] | None = None, **kwargs) -> SearchRequest:
    space = load_space(space_path or task.search_space_path())
    ov = dict(overrides or {})
    if backbones:
        ov["backbone"] = backbones
    if "epochs" not in space.names and "epochs" not in ov:
        ov["epochs"] = task.budget.max_epochs
    if ov:
        space = space.with_overrides(ov)
    fixed = {"seed": task.seed}
    given = kwargs.pop("objectives", None)
    objectives = parse_objectives(given, task) if given is not None else \
        parse_objectives(getattr(task, "objectives", None), task, field="objectives")
    return SearchRequest(task=task, space=space, fixed=fixed, objectives=objectives, **kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "head=mlp"]`` → ``{"lr": 0.001, "head": "mlp"}`` (values parsed as YAML)."""
    import yaml

    from autoft.errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects NAME=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        val = yaml.safe_load(v)
        if isinstance(val, str) and re.fullmatch(r"[-+]?\d*\.?\d+([eE][-+]?\d+)", val):
            val = float(val)
        out[k.strip()] = val
    return out


def max_epochs(space: SearchSpace, task: Task) -> int:
    p = space.get("epochs")
    if p is None:
        return task.budget.max_epochs
    if p.kind == "fixed":
        return int(p.value)
    if p.kind == "categorical":
        return int(max(p.choices))
    return int(p.high)


def search_started(req: SearchRequest, engine: str, task_data, resumed: int, n_train: int | None = None):
    """The ``search_start`` event of ``req`` (each engine emits it once its study is open)."""
    from autoft.events import SearchStarted

    return SearchStarted(task=req.task.name, study=req.study_name, engine=engine, budget=req.budget,
                         metric=req.task.metric, direction=req.task.direction, storage=req.shown_storage,
                         backbones=tuple(req.space.backbones), device=req.execution.device, resumed=resumed,
                         extend=req.extend, timeout=req.timeout,
                         pruner=req.pruner_spec(n_train).describe() + (
                             " (multi-objective: Optuna cannot prune its trials)" if req.multi_objective else ""),
                         examples=len(task_data.data), classes=task_data.data.num_classes,
                         sizes=task_data.splits.sizes())
