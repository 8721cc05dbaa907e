"""Every private Optuna attribute autoft reads (autoft/study/optuna_internals.py), checked on the installed
Optuna: an upgrade that renames or removes one fails here, naming the function, instead of deep in a search."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from autoft.study import optuna_internals as oi
from autoft.study.record import heartbeat_retry_of, trial_origin

optuna.logging.set_verbosity(optuna.logging.ERROR)


def test_optuna_major_version_is_the_pinned_one():
    assert optuna.__version__.split(".")[0] == "5", (
        f"autoft pins Optuna 5.x (pyproject.toml); found {optuna.__version__}: re-check autoft/study/optuna_internals.py")


def test_storage_and_trial_ids():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    storage = oi.storage_of(study)
    assert isinstance(storage, optuna.storages.BaseStorage), "storage_of: Study._storage is gone"
    t = study.trials[1]
    assert storage.get_trial(oi.trial_id(t)).number == 1, "trial_id: FrozenTrial._trial_id no longer names the trial"


def test_live_trial_attributes():
    study = optuna.create_study()
    seen = {}

    def objective(trial):
        seen["id"] = oi.live_trial_id(trial)
        seen["system"] = oi.live_system_attrs(trial)
        return 0.0

    study.optimize(objective, n_trials=1)
    assert seen["id"] == oi.trial_id(study.trials[0]), "live_trial_id: Trial._trial_id changed"
    assert isinstance(seen["system"], dict), "live_system_attrs: storage.get_trial_system_attrs changed"


def test_cached_trials_of_the_running_trial():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    got = {}
    study.optimize(lambda t: got.setdefault("trials", oi.cached_trials(t.study)) and 0.0, n_trials=1)
    assert got["trials"] is not None, "cached_trials: Study._get_trials(use_cache=...) is gone"
    assert {t.number for t in got["trials"]} >= {0, 1, 2}


def test_bracket_view_of_hyperband():
    study = optuna.create_study(pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3))
    views = []

    class Spy(optuna.samplers.RandomSampler):
        def sample_independent(self, st, trial, name, dist):
            views.append(st)
            return super().sample_independent(st, trial, name, dist)

    study.sampler = Spy(seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    bracketed = [v for v in views if v is not study]
    assert bracketed, "Hyperband no longer hands the sampler a bracket view: TPESampler's shortcut is moot"
    assert all(oi.bracket_study(v) is study for v in bracketed), "bracket_study: _BracketStudy._study changed"


def test_heartbeat_retry_marker(tmp_path):
    """Optuna's heartbeat retry names the stale trial in a system attribute; autoft reads it as the origin."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1,
                                         heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                             max_retry=1))
    study = optuna.create_study(storage=storage)
    stale = study.ask()
    stale.suggest_float("x", 0, 1)
    storage.record_heartbeat(oi.live_trial_id(stale))
    import time

    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    retry = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert retry, "Optuna's heartbeat no longer queues a retry of a stale trial"
    assert oi.FAILED_TRIAL_SYSTEM_ATTR in retry[0].system_attrs, \
        f"Optuna's retry marker '{oi.FAILED_TRIAL_SYSTEM_ATTR}' was renamed: {retry[0].system_attrs}"
    assert heartbeat_retry_of(retry[0]) == stale.number and trial_origin(retry[0]) == f"retry of #{stale.number}"


@pytest.mark.parametrize("value", ["3", None, True, [1]])
def test_malformed_marker_is_not_a_retry(value):
    ft = optuna.trial.create_trial(value=0.0, system_attrs={} if value is None else {oi.FAILED_TRIAL_SYSTEM_ATTR: value})
    assert heartbeat_retry_of(ft) is None
