"""Budget accounting and recovery of interrupted trials: how many trials a study has spent.

``n_trials`` is a study's total budget. Finished trials (complete, pruned, failed) count toward it,
except a failed trial that was retried (it is counted once, through its retry) and a *surplus*
trial (started after other workers had taken the budget; it never ran). Several processes on one
storage agree through :func:`claims_budget` on who runs the last slots, so a study ends with exactly
its budget. Used by both engines, the CLI and the worker; nothing here imports an engine.
"""
from __future__ import annotations

import logging
import os
import socket

import optuna
from optuna.trial import TrialState

from autoft.study.record import (ATTR_FAIL, ATTR_INTERRUPTED, ATTR_OOM_RETRY, ATTR_RETRY_OF, ATTR_SURPLUS,
                                 ATTR_WORKER, heartbeat_retry_of)
from autoft.study.optuna_internals import cached_trials, storage_of, trial_id
from autoft.study.storage import warn_malformed

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def retried_numbers(trials) -> set[int]:
    """Numbers of trials that another trial retries (ours, or Optuna's heartbeat retry)."""
    out = set()
    for t in trials:
        if heartbeat_retry_of(t) is not None:  # Optuna's own retry (an Optuna-written integer)
            out.add(heartbeat_retry_of(t))
        for attr in (ATTR_RETRY_OF, ATTR_OOM_RETRY):  # an out-of-memory retry too: counted once
            if attr not in t.user_attrs:
                continue
            number = _trial_number(t.user_attrs[attr])
            if number is None:
                warn_malformed(t.number, attr, t.user_attrs[attr], "the trial it names is not known as retried")
            else:
                out.add(number)
    return out


def _trial_number(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def parse_worker(value) -> tuple[str, int] | None:
    """``(host, pid)`` of a ``worker`` attribute ("host:pid"), or None when it is not one."""
    if not isinstance(value, str):
        return None
    host, sep, pid = value.rpartition(":")
    if not sep or not host or not pid.isdigit():
        return None
    return host, int(pid)


def counted_trials(study: optuna.Study, trials: list | None = None) -> list:
    """Finished trials that count toward the budget: interrupted trials that were retried do not."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    retried = retried_numbers(trials)
    return [t for t in trials if t.state in FINISHED and not t.user_attrs.get(ATTR_SURPLUS)
            and not (t.state == TrialState.FAIL and t.number in retried)]


def _snapshot(study: optuna.Study, trial_number: int) -> list:
    """The study's trials as read when trial ``trial_number`` was created (Optuna reads them once per
    trial for the sampler), or a fresh read when that copy is not there. Such a snapshot holds every
    trial created before ours (numbers are given in order), which is all :func:`claims_budget` needs."""
    trials = cached_trials(study)
    if not trials or not any(t.number == trial_number for t in trials):
        trials = study.get_trials(deepcopy=False)
    return trials


def claims_budget(study: optuna.Study, trial_number: int, budget: int) -> bool:
    """Whether a just-started trial fits in the budget.

    Finished trials that count take the first slots; running trials take the next ones in order of
    their number.  Workers racing for the last slot thus agree on who runs it, and the study ends
    with exactly ``budget`` counted trials.
    """
    trials = _snapshot(study, trial_number)
    running = sorted(t.number for t in trials if t.state == TrialState.RUNNING and not t.user_attrs.get(ATTR_SURPLUS))
    slot = len(counted_trials(study, trials)) + (running.index(trial_number) if trial_number in running else len(running))
    return slot < budget


def count_finished(study: optuna.Study) -> int:
    return len(counted_trials(study))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail trials left RUNNING by a dead process of this host, and retry every interrupted trial.

    A trial whose worker process (recorded as ``host:pid``) no longer exists is marked failed with
    that reason; it and every trial stopped by Ctrl-C is enqueued again with the same parameters
    (once).  Trials of live or remote workers are left to the storage heartbeat.  Returns the
    numbers of the trials that were retried.
    """
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    storage = storage_of(study)
    out = []
    for t in trials:
        w = t.user_attrs.get(ATTR_WORKER)
        if t.state == TrialState.RUNNING and w is not None:
            parsed = parse_worker(w)
            if parsed is None:
                warn_malformed(t.number, ATTR_WORKER, w, "not recovered here (the storage heartbeat fails it "
                                                        "if its worker is gone)")
                continue
            if parsed[0] != host:
                continue
            pid = parsed[1]
            if pid == os.getpid() or _pid_alive(pid):
                continue
            try:
                storage.set_trial_user_attr(trial_id(t), ATTR_FAIL,
                                            f"WorkerDied: the process running this trial ({w}) ended "
                                            "without finishing it (killed or crashed); the trial is retried")
                storage.set_trial_user_attr(trial_id(t), ATTR_INTERRUPTED, True)
                storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another process got there first
        elif not (t.state == TrialState.FAIL and t.user_attrs.get(ATTR_INTERRUPTED)):
            continue
        if t.number in retried:
            continue
        study.enqueue_trial(t.params, user_attrs={ATTR_RETRY_OF: t.number}, skip_if_exists=False)
        retried.add(t.number)
        out.append(t.number)
        log.warning("trial %d was interrupted; its configuration is queued again", t.number)
    return out


class BudgetCallback:
    """Stops ``optimize`` in every process once the study has ``budget`` counted trials."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, study: optuna.Study, trial) -> None:
        if count_finished(study) >= self.budget:
            study.stop()
