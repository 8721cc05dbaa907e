"""The Optuna engine: one study, many trials, each running the core with an Optuna reporter.

Storage is SQLite under ``results/<task>/optuna.db`` by default (a study resumes with the same
command; ``optuna-dashboard`` opens it), or any Optuna storage URL.  ``n_trials`` is the study's
total budget: finished trials (complete, pruned, failed) count toward it, so an interrupted search
started again runs only what is missing.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.engines.common import (ATTR_CONFIG, ATTR_EPOCHS, ATTR_FAIL, ATTR_HISTORY, ATTR_METRICS, ATTR_RETRY_OF,
                                   ATTR_SECONDS, SearchRequest, first_rung, max_epochs)
from autoft.errors import ConfigError

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


def postgres_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3,
    earlier versions psycopg2; ``pip install autoft[postgres]`` brings psycopg2)."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's heartbeat retry, without the dead run's bookkeeping in the queued copy.

    Optuna copies every user attribute of the stale trial into its retry, including ``worker`` (the
    dead process): until the worker that picks the retry up records itself, another worker starting
    :func:`recover_interrupted` would take the retry for an orphan of that dead process and fail it."""

    def __call__(self, study: optuna.Study, trial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items()
                            if k not in (ATTR_WORKER, ATTR_FAIL, ATTR_INTERRUPTED)}
        super().__call__(study, trial)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: RDB (sqlite://, postgresql://, ...) with heartbeats, or a journal file."""
    if url.startswith(("journal:", "file:")) or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        path = url.split(":", 1)[1] if url.startswith(("journal:", "file:")) else url
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    kwargs = {}
    url = postgres_driver(url)
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    storage = _retrying(lambda: optuna.storages.RDBStorage(
        url, heartbeat_interval=10, grace_period=30,
        heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=1), **kwargs))
    if url.startswith("sqlite") and ":memory:" not in url:
        _fast_sqlite(storage.engine)
    return storage


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; one fsync per checkpoint
    cur.execute("PRAGMA synchronous=NORMAL")  # safe in WAL: a crashed process loses nothing committed
    cur.close()


def _fast_sqlite(engine) -> None:
    """Write-ahead log for a SQLite study: every trial makes a few dozen small commits (parameters,
    attributes, one report per epoch), and with SQLite's default rollback journal each one waits for
    two fsyncs. WAL with synchronous=NORMAL keeps the database consistent when a process is killed
    (only an OS crash or power loss can drop the last commits) and lets workers on the same machine
    read while one writes. (WAL needs a local file system, as SQLite with several processes does anyway.)"""
    import sqlalchemy

    sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()  # connections opened while creating the schema are reopened with the pragmas


def _retrying(fn, attempts: int = 8):
    """Run ``fn``, retrying when several processes race to create the same schema or study."""
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts):
        try:
            return fn()
        except (IntegrityError, OperationalError, optuna.exceptions.DuplicatedStudyError):
            if i == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.5 * (i + 1))


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
    sampler = TPESampler(seed=req.task.seed, n_startup_trials=8, multivariate=True, group=True,
                         constant_liar=parallel)
    top = max_epochs(req.space, req.task)
    pruner = make_pruner(req.pruner or req.task.pruner, top, 1 if n_train is None else first_rung(n_train, top))
    storage = storage or make_storage(req.storage_url)
    return _retrying(lambda: optuna.create_study(study_name=req.study_name, storage=storage, sampler=sampler,
                                                 pruner=pruner, direction=req.task.direction, load_if_exists=True))


ATTR_WORKER = "worker"  # "host:pid" of the process running the trial
ATTR_INTERRUPTED = "interrupted"  # the trial was cut short by Ctrl-C or a dead worker; it is retried
ATTR_SURPLUS = "surplus"  # started after the budget was already taken by other workers; never ran


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retried_numbers(trials) -> set[int]:
    """Numbers of trials that another trial retries (ours, or Optuna's heartbeat retry)."""
    out = set()
    for t in trials:
        if ATTR_RETRY_OF in t.user_attrs:
            out.add(int(t.user_attrs[ATTR_RETRY_OF]))
        if "failed_trial" in t.system_attrs:
            out.add(int(t.system_attrs["failed_trial"]))
    return out


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
        w = str(t.user_attrs.get(ATTR_WORKER, ""))
        if t.state == TrialState.RUNNING and w.rsplit(":", 1)[0] == host:
            pid = int(w.rsplit(":", 1)[1])
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
    if rank is not False:  # rank the backbones on frozen features; try the best first (advisory)
        from autoft.rank import RankPolicy, apply_ranking

        apply_ranking(study, req, task_data, cache, rank if isinstance(rank, RankPolicy) else RankPolicy())
    # with other workers, each one stops once the study as a whole has its budget (alone, n_trials
    # already stops it there, and the check would cost a read of the whole study after every trial)
    stop = [BudgetCallback(budget)] if req.n_jobs > 1 or req.shared else []
    study.optimize(make_objective(req, task_data, cache, budget), n_trials=remaining, timeout=req.timeout,
                   n_jobs=req.n_jobs, catch=(Exception,), callbacks=[*stop, log_failures, *(callbacks or [])],
                   gc_after_trial=False, show_progress_bar=False)
    return study
