"""Every private Optuna attribute autoft relies on, each behind one function.

Optuna is pinned to one major version (pyproject.toml); ``tests/test_optuna_internals.py`` checks
each of these on the installed Optuna and fails loudly, naming the function, when an upgrade
renames or removes what it reads. Nothing else in autoft touches a private Optuna attribute.
"""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

# RetryFailedTrialCallback / RetryHeartbeatStaleTrialCallback mark the trial they enqueue with this
# system attribute (the number of the stale trial); read through autoft.study.record.heartbeat_retry_of
FAILED_TRIAL_SYSTEM_ATTR = "failed_trial"


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: recovery writes a dead worker's trial through it (the public API cannot
    finish a trial that another process started)."""
    return study._storage


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of a trial (public: only its study-local ``number``)."""
    return trial._trial_id


def cached_trials(study: optuna.Study) -> list[FrozenTrial] | None:
    """The trials Optuna read for the sampler when the current trial was created (no storage read),
    or None when this Optuna keeps no such copy."""
    get = getattr(study, "_get_trials", None)
    return get(deepcopy=False, use_cache=True) if get else None


def bracket_study(study) -> optuna.Study:
    """The study behind Hyperband's per-bracket view (``_BracketStudy._study``), or ``study`` itself."""
    return getattr(study, "_study", study)


def live_trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a running trial (``optuna.Trial._trial_id``)."""
    return trial._trial_id


def live_system_attrs(trial: optuna.Trial) -> dict:
    """System attributes of a running trial (Optuna 5's ``Trial`` no longer exposes them; its heartbeat
    retry marks the retried trial there): read from the storage."""
    return storage_of(trial.study).get_trial_system_attrs(live_trial_id(trial))
