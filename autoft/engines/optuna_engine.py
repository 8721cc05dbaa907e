"""The Optuna engine: one study, many trials, each running the core with an Optuna reporter.

Storage is SQLite under ``results/<task>/optuna.db`` by default (a study resumes with the same
command; ``optuna-dashboard`` opens it), or any Optuna storage URL.  ``n_trials`` is the study's
total budget: finished trials (complete, pruned, failed) count toward it, so an interrupted search
started again runs only what is missing.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
import zlib
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.engines.common import (ATTR_CONFIG, ATTR_EPOCHS, ATTR_FAIL, ATTR_HISTORY, ATTR_METRICS, ATTR_RANKING,
                                   ATTR_RETRY_OF, ATTR_SECONDS, SearchRequest, first_rung, max_epochs)
from autoft.errors import ConfigError
from autoft.study.storage import (RUN_ATTRS, RetryStaleTrial, _retrying, open_storage,  # noqa: F401 (re-exported)
                                  postgres_driver, warn_malformed)

log = logging.getLogger(__name__)
# heartbeats, grouped TPE and the retry callback are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class OptunaReporter:
    """Adapts an Optuna trial to the core's Reporter protocol."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.pruned_at: int | None = None

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


def make_pruner(name: str, max_resource: int, first: int = 1) -> optuna.pruners.BasePruner:
    """The study's pruner; ``first``: the first epoch after which it may prune (:func:`first_rung`)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max_resource, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=first)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'; expected hyperband, median, successive_halving or none",
                      field="pruner")


# the storage opener moved to autoft.study.storage; these names stay for existing callers
make_storage = open_storage


class TPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, reading the study's trials once per trial instead of once per suggestion.

    With the Hyperband pruner, Optuna gives the sampler a new per-bracket view of the study for every
    suggestion. TPE reads trials through ``Study._get_trials``, which that view does not filter by
    bracket, so the view only cost a fresh read of the whole study (~10 ms with SQLite, a dozen times
    per trial) for the same list. Given the study itself, TPE samples the same values from the copy
    Optuna keeps for the running trial (tests/test_search.py checks the two agree)."""

    @staticmethod
    def _study(study: optuna.Study) -> optuna.Study:
        return getattr(study, "_study", study)  # Hyperband's bracket view keeps the study as ``_study``

    def infer_relative_search_space(self, study, trial):
        return super().infer_relative_search_space(self._study(study), trial)

    def sample_relative(self, study, trial, search_space):
        return super().sample_relative(self._study(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return super().sample_independent(self._study(study), trial, param_name, param_distribution)


def create_study(req: SearchRequest, storage=None, n_train: int | None = None) -> optuna.Study:
    """Open (or create) the study of ``req``. ``n_train``: training examples of the task, which set the
    pruner's first decision (:func:`first_rung`); without it the pruner may act from epoch 1, which
    matters only if this study object runs trials (:func:`run_study` passes it)."""
    # constant liar (running trials count as bad ones) only when trials run side by side: it makes
    # every suggestion re-read the study from storage instead of using the trial's cached copy
    parallel = req.n_jobs > 1 or req.shared
    def sampler(seed: int) -> TPESampler:
        return TPESampler(seed=seed, n_startup_trials=8, multivariate=True, group=True, constant_liar=parallel)

    top = max_epochs(req.space, req.task)
    pruner = make_pruner(req.pruner or req.task.pruner, top, 1 if n_train is None else first_rung(n_train, top))
    storage = storage or open_storage(req.storage_url)
    study = _retrying(lambda: optuna.create_study(study_name=req.study_name, storage=storage,
                                                  sampler=sampler(req.task.seed), pruner=pruner,
                                                  direction=req.task.direction, load_if_exists=True))
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if finished:  # a resumed or extended study: a sampler seeded as the first run would propose its trials again
        study.sampler = sampler(sampler_seed(req.task.seed, finished))
    return study


def sampler_seed(task_seed: int, finished: int) -> int:
    """The sampler's seed for a study that already has ``finished`` trials: the task's seed for a new
    study (reproducible), mixed with the number of finished trials when it resumes."""
    if not finished:
        return task_seed
    return zlib.crc32(f"{task_seed}:{finished}".encode()) & 0x7FFFFFFF


ATTR_WORKER = "worker"  # "host:pid" of the process running the trial
ATTR_INTERRUPTED = "interrupted"  # the trial was cut short by Ctrl-C or a dead worker; it is retried
assert set(RUN_ATTRS) == {ATTR_WORKER, ATTR_FAIL, ATTR_INTERRUPTED}  # what a heartbeat retry drops
ATTR_SURPLUS = "surplus"  # started after the budget was already taken by other workers; never ran


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retried_numbers(trials) -> set[int]:
    """Numbers of trials that another trial retries (ours, or Optuna's heartbeat retry)."""
    out = set()
    for t in trials:
        for attrs, name in ((t.user_attrs, ATTR_RETRY_OF), (t.system_attrs, "failed_trial")):
            if name in attrs:
                number = _trial_number(attrs[name])
                if number is None:
                    warn_malformed(t.number, name, attrs[name], "the trial it names is not known as retried")
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
    retried = _retried_numbers(trials)
    return [t for t in trials if t.state in FINISHED and not t.user_attrs.get(ATTR_SURPLUS)
            and not (t.state == TrialState.FAIL and t.number in retried)]


def _snapshot(study: optuna.Study, trial_number: int) -> list:
    """The study's trials as read when trial ``trial_number`` was created (Optuna reads them once per
    trial for the sampler), or a fresh read when that copy is not there. Such a snapshot holds every
    trial created before ours (numbers are given in order), which is all :func:`claims_budget` needs."""
    get = getattr(study, "_get_trials", None)
    trials = get(deepcopy=False, use_cache=True) if get else None
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
    retried = _retried_numbers(trials)
    storage = study._storage
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
                storage.set_trial_user_attr(t._trial_id, ATTR_FAIL,
                                            f"WorkerDied: the process running this trial ({w}) ended "
                                            "without finishing it (killed or crashed); the trial is retried")
                storage.set_trial_user_attr(t._trial_id, ATTR_INTERRUPTED, True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
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


def usable_ranking(study: optuna.Study) -> bool:
    """False (with a warning) when the study's recorded ranking is malformed: the search then goes on
    without it (the ranking is advisory)."""
    from autoft.results.tables import clean_ranking

    recorded = study.user_attrs.get(ATTR_RANKING)
    return recorded is None or clean_ranking(recorded) is not None


def log_failures(study: optuna.Study, trial) -> None:
    if trial.state == TrialState.FAIL:
        log.warning("trial %d failed: %s", trial.number, str(trial.user_attrs.get(ATTR_FAIL, "unknown reason")).split("\n")[0])


class BudgetCallback:
    """Stops ``optimize`` in every process once the study has ``budget`` counted trials."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, study: optuna.Study, trial) -> None:
        if count_finished(study) >= self.budget:
            study.stop()


def make_objective(req: SearchRequest, task_data: TaskData, cache: FeatureCache, budget: int | None = None) -> Callable:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(ATTR_WORKER, worker_id())
        if budget is not None and not claims_budget(trial.study, trial.number, budget):
            trial.set_user_attr(ATTR_SURPLUS, True)
            trial.study.stop()
            raise optuna.TrialPruned("budget already taken by other workers")
        try:
            cfg = req.space.sample(trial, req.fixed)
            trial.set_user_attr(ATTR_CONFIG, cfg.model_dump())
            reporter = OptunaReporter(trial)
            result = fine_tune_and_score(cfg, task_data, reporter, cache=cache)
        except KeyboardInterrupt:
            trial.set_user_attr(ATTR_FAIL, "Interrupted: stopped by the user (Ctrl-C); retried on resume")
            trial.set_user_attr(ATTR_INTERRUPTED, True)
            raise
        except Exception as exc:
            trial.set_user_attr(ATTR_FAIL, f"{type(exc).__name__}: {exc}"[:2000])
            raise
        trial.set_user_attr(ATTR_METRICS, result.metrics)
        trial.set_user_attr(ATTR_HISTORY, [h[task_data.metric] for h in result.history])
        trial.set_user_attr(ATTR_EPOCHS, result.epochs_run)
        trial.set_user_attr(ATTR_SECONDS, round(result.seconds, 3))
        if reporter.pruned_at is not None and result.stopped_early:
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        return result.score

    return objective


def run_study(req: SearchRequest, *, task_data: TaskData | None = None, callbacks: list | None = None,
              cache: FeatureCache | None = None, rank=None, study: optuna.Study | None = None) -> optuna.Study:
    """Run (or resume) the study until it has ``req.budget`` finished trials or the timeout passes.

    ``rank``: how a new study uses the backbone ranking (:class:`autoft.rank.RankPolicy`; None = the
    default policy, False = no ranking). ``study``: the study of ``req`` if the caller already opened it
    (``create_study(req, n_train=...)``), saving a second connection to the storage."""
    # Optuna logs every failed trial with a traceback; we record the reason and log one line instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    task_data = task_data or req.task.prepare()
    study = study or create_study(req, n_train=len(task_data.splits.train))
    recover_interrupted(study)
    done = count_finished(study)
    budget = req.budget + (done if req.extend else 0)
    remaining = budget - done
    if remaining <= 0:
        log.info("study '%s' already has %d finished trials (budget %d)", req.study_name, done, budget)
        return study
    cache = cache or FeatureCache()
    if rank is not False and usable_ranking(study):  # rank the backbones on frozen features; try the best first
        from autoft.rank import RankPolicy, apply_ranking

        apply_ranking(study, req, task_data, cache, rank if isinstance(rank, RankPolicy) else RankPolicy())
    # with other workers, each one stops once the study as a whole has its budget (alone, n_trials
    # already stops it there, and the check would cost a read of the whole study after every trial)
    stop = [BudgetCallback(budget)] if req.n_jobs > 1 or req.shared else []
    study.optimize(make_objective(req, task_data, cache, budget), n_trials=remaining, timeout=req.timeout,
                   n_jobs=req.n_jobs, catch=(Exception,), callbacks=[*stop, log_failures, *(callbacks or [])],
                   gc_after_trial=False, show_progress_bar=False)
    return study
