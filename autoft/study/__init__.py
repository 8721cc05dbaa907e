"""The study: the system of record of a search.

Every trial, its configuration, its scores and the ranking a search started with live in the study
(an Optuna storage: SQLite, PostgreSQL, MySQL or a journal file); result files and exports are
derived from it.  This package opens the storage (:func:`open_storage`), says where it is without
its secrets (:func:`redact_url`), checks the names that become folders (:func:`validate_name`)
and keeps what only autoft may read back (:func:`study_state_dir`). :mod:`autoft.study.record` names
every key a trial carries and writes it; :mod:`autoft.study.budget` counts the budget and recovers
interrupted trials; :mod:`autoft.study.location` finds and loads a study; every private Optuna
attribute autoft reads is in :mod:`autoft.study.optuna_internals`.

Nothing here imports :mod:`autoft.engines`: the engines build on the study, not the other way round.
"""
from autoft.study.location import StudyLocation
from autoft.study.names import ensure_inside, validate_name
from autoft.study.storage import StorageError, open_storage, redact_url, state_dir, study_state_dir

__all__ = ["StorageError", "StudyLocation", "ensure_inside", "open_storage", "redact_url", "state_dir",
           "study_state_dir", "validate_name"]
