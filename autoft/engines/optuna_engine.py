"""The Optuna engine: one study, many trials, each running the core with an Optuna reporter.

Storage is SQLite under ``results/<task>/optuna.db`` by default (a study resumes with the same
command; ``optuna-dashboard`` opens it), or any Optuna storage URL.  ``n_trials`` is the study's
total budget: finished trials (complete, pruned, failed) count toward it, so an interrupted search
started again runs only what is missing.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.engines.common import (ATTR_CONFIG, ATTR_EPOCHS, ATTR_FAIL, ATTR_HISTORY, ATTR_METRICS, ATTR_SECONDS,
                                   SearchRequest, max_epochs)
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


def make_pruner(name: str, max_resource: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'; expected hyperband, median, successive_halving or none",
                      field="pruner")


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: RDB (sqlite://, postgresql://, ...) with heartbeats, or a journal file."""
    if url.startswith(("journal:", "file:")) or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        path = url.split(":", 1)[1] if url.startswith(("journal:", "file:")) else url
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=10, grace_period=30,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1), **kwargs)


def create_study(req: SearchRequest, storage=None) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=req.task.seed, n_startup_trials=8, multivariate=True,
                                         group=True, constant_liar=req.n_jobs > 1)
    pruner = make_pruner(req.pruner or req.task.pruner, max_epochs(req.space, req.task))
    return optuna.create_study(study_name=req.study_name, storage=storage or make_storage(req.storage_url),
                               sampler=sampler, pruner=pruner, direction=req.task.direction,
                               load_if_exists=True)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def make_objective(req: SearchRequest, task_data: TaskData, cache: FeatureCache) -> Callable:
    def objective(trial: optuna.Trial) -> float:
        cfg = req.space.sample(trial, req.fixed)
        trial.set_user_attr(ATTR_CONFIG, cfg.model_dump())
        reporter = OptunaReporter(trial)
        try:
            result = fine_tune_and_score(cfg, task_data, reporter, cache=cache)
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
              cache: FeatureCache | None = None) -> optuna.Study:
    """Run (or resume) the study until it has ``req.budget`` finished trials or the timeout passes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task_data = task_data or req.task.prepare()
    study = create_study(req)
    done = count_finished(study)
    budget = req.budget + (done if req.extend else 0)
    remaining = budget - done
    if remaining <= 0:
        log.info("study '%s' already has %d finished trials (budget %d)", req.study_name, done, budget)
        return study
    cache = cache or FeatureCache()
    # every worker stops once the study as a whole has its budget
    stop = optuna.study.MaxTrialsCallback(budget, states=FINISHED)
    study.optimize(make_objective(req, task_data, cache), n_trials=remaining, timeout=req.timeout,
                   n_jobs=req.n_jobs, catch=(Exception,), callbacks=[stop, *(callbacks or [])],
                   gc_after_trial=False, show_progress_bar=False)
    return study
