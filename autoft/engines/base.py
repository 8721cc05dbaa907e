"""The engine contract: a search request goes in, trials are left in the study.

An engine (:class:`Engine`) receives a :class:`SearchRequest` (task, search space, budget, one pruner
spec, execution settings with the device resolved once) and the search's events
(:class:`autoft.events.Events`); it runs trials of the core (``fine_tune_and_score``) and leaves every
one in the Optuna study named by the request, through the one record writer
(:mod:`autoft.study.record`). The Optuna engine runs them in this process (threads for ``n_jobs``),
the Ray engine on a Ray cluster; both translate the same :class:`~autoft.engines.pruners.PrunerSpec`.
"""
from __future__ import annotations

import re
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
    def budget(self) -> int:
        return self.n_trials if self.n_trials is not None else self.task.budget.n_trials

    @property
    def pruner_name(self) -> str:
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
    return SearchRequest(task=task, space=space, fixed=fixed, **kwargs)


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
                         extend=req.extend, timeout=req.timeout, pruner=req.pruner_spec(n_train).describe(),
                         examples=len(task_data.data), classes=task_data.data.num_classes,
                         sizes=task_data.splits.sizes())
