"""What every search engine shares: the search request, study locations, trial bookkeeping."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoft.space import SearchSpace, load_space
from autoft.study.names import ensure_inside, validate_name
from autoft.study.storage import redact_url
from autoft.task import Task

# user attributes every finished trial carries (both engines write them)
ATTR_CONFIG = "config"
ATTR_METRICS = "metrics"
ATTR_HISTORY = "history"
ATTR_EPOCHS = "epochs_run"
ATTR_SECONDS = "seconds"
ATTR_FAIL = "fail_reason"
ATTR_FIRST_TRIAL = "first_trial"  # True on a trial the search started with (a recipe of the space's first_trials)
ATTR_RETRY_OF = "retry_of"  # number of the interrupted trial this one runs again
ATTR_RANKING = "ranking"  # study user attribute: the backbone ranking made before the search


@dataclass
class SearchRequest:
    """One search: the task, its space (after overrides) and how to run it."""

    task: Task
    space: SearchSpace
    study_name: str = "default"
    results_dir: Path = Path("results")
    storage: str | None = field(default=None, repr=False)  # may hold a password: shown only through redact_url
    n_trials: int | None = None
    timeout: float | None = None
    n_jobs: int = 1
    shared: bool = False  # other processes run trials of the same study (autoft worker)
    pruner: str | None = None
    extend: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)  # values every trial gets (epochs, seed)

    def __post_init__(self) -> None:
        # both become folders under results_dir: no '..', no absolute path, no separator
        validate_name(self.task.name, "name", file=self.task.file)
        validate_name(self.study_name, "study_name")
        self.results_dir = Path(self.results_dir)

    def __repr__(self) -> str:
        return (f"SearchRequest(task={self.task.name!r}, study_name={self.study_name!r}, "
                f"results_dir={str(self.results_dir)!r}, storage={redact_url(self.storage)!r})")

    @property
    def study_dir(self) -> Path:
        """``<results_dir>/<task>/<study>``; a :class:`ConfigError` if it resolves outside ``results_dir``."""
        return ensure_inside(self.results_dir / self.task.name / self.study_name, self.results_dir, "study_name")

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        path = ensure_inside(self.results_dir / self.task.name / "optuna.db", self.results_dir, "storage").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    @property
    def shown_storage(self) -> str:
        """The storage URL as it may be printed or written: password hidden."""
        return redact_url(self.storage) if self.storage else self.storage_url

    @property
    def budget(self) -> int:
        return self.n_trials if self.n_trials is not None else self.task.budget.n_trials


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


MIN_EXAMPLES_BEFORE_PRUNING = 1000


def first_rung(n_train: int, max_epochs: int) -> int:
    """The first epoch after which a trial may be pruned: once it has trained on about
    ``MIN_EXAMPLES_BEFORE_PRUNING`` examples, and at most half-way through its epochs.

    One epoch for most tasks. On a few-shot task an epoch is a handful of optimizer steps (200
    examples: 2-7 steps, still inside the warm-up), and the score after it ranks configurations at
    random; pruning on it throws away good ones (digits-fewshot: 5 epochs of 10)."""
    need = math.ceil(MIN_EXAMPLES_BEFORE_PRUNING / max(1, n_train))
    return max(1, min(need, max_epochs // 2))


def max_epochs(space: SearchSpace, task: Task) -> int:
    p = space.get("epochs")
    if p is None:
        return task.budget.max_epochs
    if p.kind == "fixed":
        return int(p.value)
    if p.kind == "categorical":
        return int(max(p.choices))
    return int(p.high)
