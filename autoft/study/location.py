"""Where a study lives: its results folder, its storage URL, and the one function that loads it.

``results/<task>/<study>/`` holds the report files; the study itself is in ``--storage`` (any Optuna
storage URL) or, by default, in SQLite at ``results/<task>/optuna.db``. The CLI's ``report``/``show``,
``export`` and the Python API load a study only through :meth:`StudyLocation.load`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import optuna

from autoft.errors import ConfigError, did_you_mean
from autoft.study.names import ensure_inside, validate_name
from autoft.study.storage import open_storage, redact_url


@dataclass(frozen=True)
class StudyLocation:
    task: str
    study: str = "default"
    results_dir: Path = Path("results")
    storage: str | None = field(default=None, repr=False)  # may hold a password: shown only redacted
    task_file: Path | None = None

    def __post_init__(self) -> None:
        # both become folders under results_dir: no '..', no absolute path, no separator
        validate_name(self.task, "name", file=self.task_file)
        validate_name(self.study, "study_name")
        object.__setattr__(self, "results_dir", Path(self.results_dir))

    def __repr__(self) -> str:
        return (f"StudyLocation(task={self.task!r}, study={self.study!r}, results_dir={str(self.results_dir)!r}, "
                f"storage={self.shown_storage!r})")

    @property
    def study_dir(self) -> Path:
        """``<results_dir>/<task>/<study>``; a :class:`ConfigError` if it resolves outside ``results_dir``."""
        return ensure_inside(self.results_dir / self.task / self.study, self.results_dir, "--study-name")

    @property
    def default_db(self) -> Path:
        return ensure_inside(self.results_dir / self.task / "optuna.db", self.results_dir, "--storage")

    @property
    def storage_url(self) -> str:
        """The storage URL (the default SQLite file's folder is created)."""
        if self.storage:
            return self.storage
        path = self.default_db.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    @property
    def shown_storage(self) -> str:
        """The storage URL as it may be printed or written: password hidden."""
        return redact_url(self.storage) if self.storage else f"sqlite:///{self.default_db.resolve()}"

    def load(self) -> optuna.Study:
        """The study a search left; a :class:`ConfigError` that says how to make one when there is none."""
        if self.storage is None and not self.default_db.is_file():
            raise ConfigError(f"no search results for task '{self.task}': {self.default_db} does not exist. Run "
                              f"'autoft search --task {self.task} --results-dir {self.results_dir}' first "
                              "(or pass --results-dir / --storage)")
        store = open_storage(self.storage_url)  # StorageError naming the URL, password hidden
        try:
            return optuna.load_study(study_name=self.study, storage=store)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
            raise ConfigError(f"no study '{self.study}'{did_you_mean(self.study, names)} for task '{self.task}' in "
                              f"{self.shown_storage}; studies there: {', '.join(names) or 'none'}. Run "
                              f"'autoft search --task {self.task}' first (or pass --study-name / --storage)") from None
