"""The Optuna engine: one study, many trials, each running the core with an Optuna reporter.

Storage is SQLite under ``results/<task>/optuna.db`` by default (a study resumes with the same
command; ``optuna-dashboard`` opens it), or any Optuna storage URL.  ``n_trials`` is the study's
total budget: finished trials (complete, pruned, failed) count toward it, so an interrupted search
started again runs only what is missing.
"""
from __future__ import annotations

import logging
import time
import warnings
import zlib
from collections.abc import Callable
from contextlib import nullcontext

import optuna
from optuna.trial import TrialState

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.engines.base import STOPPED_BY_BUDGET, SearchRequest, TimeBudget, search_started
from autoft.events import EpochReported, Events, TrialEnded, TrialStarted
from autoft.study.budget import (FINISHED, BudgetCallback, claims_budget, count_finished, counted_trials,  # noqa: F401
                                 parse_worker, recover_interrupted, worker_id)
from autoft.study.optuna_internals import bracket_study, live_system_attrs
from autoft.study.record import (ATTR_CONFIG, ATTR_FAIL, ATTR_INTERRUPTED, ATTR_RANKING, ATTR_RETRY_OF,  # noqa: F401
                                 ATTR_STOPPED_BY, ATTR_SURPLUS, ATTR_WORKER, config_of, failure_attrs, result_attrs,
                                 trial_origin)
from autoft.study.record import ATTR_OOM_BATCH, ATTR_OOM_RETRY
from autoft.study.storage import RetryStaleTrial, _retrying, open_storage, postgres_driver  # noqa: F401

log = logging.getLogger(__name__)
# heartbeats, grouped TPE and the retry callback are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

class OptunaReporter:
    """Adapts an Optuna trial to the core's Reporter protocol (and emits the ``epoch`` event).

    With a time budget that bounds the command (:class:`~autoft.engines.base.TimeBudget`), it also stops
    the trial at the epoch boundary where another epoch as long as the last one would end after the
    trials' share of the deadline (``stopped_by`` then says so)."""

    def __init__(self, trial: optuna.Trial, events: Events | None = None, budget: TimeBudget | None = None):
        self.trial = trial
        # a multi-objective study: Optuna refuses Trial.report and should_prune (NotImplementedError), so the
        # epochs are not reported to it (their scores stay in the ``history`` attribute) and nothing is pruned
        self.multi_objective = len(trial.study.directions) > 1
        self.events = events
        self.budget = budget if budget is not None and budget.limited else None
        self.pruned_at: int | None = None
        self.stopped_by: str | None = None
        self._last = time.monotonic()

    def on_train_start(self) -> None:  # the core calls it before the first epoch
        self._last = time.monotonic()

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        now = time.monotonic()
        epoch_seconds, self._last = now - self._last, now
        if not self.multi_objective:
            self.trial.report(value, step)
        if self.events:
            self.events.emit(EpochReported(str(self.trial.number), int(step), float(value), dict(metrics)))
        if not self.multi_objective and self.trial.should_prune():
            self.pruned_at = step
            return True
        if self.budget is not None and not self.budget.next_epoch_fits(epoch_seconds):
            self.pruned_at, self.stopped_by = step, STOPPED_BY_BUDGET
            return True
        return False


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
        return bracket_study(study)

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
    def sampler(seed: int) -> TPESampler:
        return TPESampler(seed=seed, n_startup_trials=8, multivariate=True, group=True, constant_liar=req.parallel)

    pruner = req.pruner_spec(n_train).optuna()
    storage = storage or open_storage(req.storage_url)
    # an existing study loads with the directions it was created with, whatever is passed here
    goal = {"directions": req.directions} if req.multi_objective else {"direction": req.task.direction}
    study = _retrying(lambda: optuna.create_study(study_name=req.study_name, storage=storage,
                                                  sampler=sampler(req.task.seed), pruner=pruner,
                                                  load_if_exists=True, **goal))
    resolve_objectives(req, study)
    if req.multi_objective:
        study.pruner = optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if finished:  # a resumed or extended study: a sampler seeded as the first run would propose its trials again
        study.sampler = sampler(sampler_seed(req.task.seed, finished))
    return study


def resolve_objectives(req: SearchRequest, study: optuna.Study) -> tuple[str, ...]:
    """The objectives ``study`` holds; a new multi-objective study records them (``objectives``). A request
    that names other objectives than an existing study's is a :class:`ConfigError` (a study keeps its
    objectives); one that names none takes the study's. Sets ``req.objectives``."""
    from autoft.errors import ConfigError
    from autoft.study.record import ATTR_LATENCY_CPU_B1, ATTR_OBJECTIVES

    metric = req.task.metric
    if len(study.directions) == 1:
        have: tuple[str, ...] = (metric,)
    else:
        recorded = study.user_attrs.get(ATTR_OBJECTIVES)
        if recorded is None and req.multi_objective:
            study.set_user_attr(ATTR_OBJECTIVES, list(req.objectives))  # new (or written by an older autoft)
            recorded = list(req.objectives)
        ok = isinstance(recorded, list) and len(recorded) == 2 and all(isinstance(v, str) for v in recorded)
        have = (metric, recorded[1]) if ok else (metric, ATTR_LATENCY_CPU_B1)
    if req.objectives is not None and tuple(req.objectives) != have:
        raise ConfigError(f"study '{req.study_name}' optimises {describe_objectives(have)}, not "
                          f"{describe_objectives(req.objectives)}: a study keeps the objectives it was created "
                          "with; use another --study-name", field="--objectives")
    req.objectives = have
    return have


def describe_objectives(objectives) -> str:
    """``("accuracy", "latency_cpu_b1_ms")`` → ``accuracy (maximised) and latency_cpu_b1_ms (minimised)``."""
    if len(objectives) == 1:
        return f"{objectives[0]} alone"
    return f"{objectives[0]} and {objectives[1]} (minimised)"


def sampler_seed(task_seed: int, finished: int) -> int:
    """The sampler's seed for a study that already has ``finished`` trials: the task's seed for a new
    study (reproducible), mixed with the number of finished trials when it resumes."""
    if not finished:
        return task_seed
    return zlib.crc32(f"{task_seed}:{finished}".encode()) & 0x7FFFFFFF


def usable_ranking(study: optuna.Study) -> bool:
    """False (with a warning) when the study's recorded ranking is malformed: the search then goes on
    without it (the ranking is advisory)."""
    from autoft.results.tables import clean_ranking

    recorded = study.user_attrs.get(ATTR_RANKING)
    return recorded is None or clean_ranking(recorded) is not None


def log_failures(study: optuna.Study, trial) -> None:
    if trial.state == TrialState.FAIL:
        log.warning("trial %d failed: %s", trial.number, str(trial.user_attrs.get(ATTR_FAIL, "unknown reason")).split("\n")[0])


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


def oom_retry_enabled() -> bool:
    """A trial that runs out of memory is run again once at half its batch size unless AUTOFT_OOM_RETRY=0."""
    from autoft.core.env import env_flag

    return env_flag("AUTOFT_OOM_RETRY", True)


def enqueue_oom_retry(trial: optuna.Trial, exc) -> int | None:
    """Queue the trial's configuration again at half the batch size (``oom_retry``, ``oom_batch_size``);
    None when it was itself such a retry or the batch cannot be halved."""
    half = exc.retry_batch_size
    if half is None or trial.user_attrs.get(ATTR_OOM_RETRY) is not None:
        return None
    params = dict(trial.params)
    dist = trial.distributions.get("batch_size")
    if dist is not None:
        try:
            if dist._contains(dist.to_internal_repr(half)):
                params["batch_size"] = half  # the sampler then learns from the batch size that really ran
        except Exception:  # noqa: BLE001 - the configuration's own batch size is forced below anyway
            pass
    trial.study.enqueue_trial(params, user_attrs={ATTR_OOM_RETRY: trial.number, ATTR_OOM_BATCH: half},
                              skip_if_exists=False)
    log.warning("trial %d ran out of memory at batch size %d; it runs again at batch size %d",
                trial.number, exc.batch_size, half)
    return half


def gpu_packing(req: SearchRequest, task_data: TaskData):
    """Memory-aware packing of ``n_jobs`` trials on one CUDA GPU (autoft.core.gpu), else None."""
    import torch

    dev = torch.device(task_data.device)
    if req.n_jobs <= 1 or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    from autoft.core.gpu import GpuAdmission, PackedTrials

    return PackedTrials(GpuAdmission.for_device(dev, max_trials=req.n_jobs), dev)


def make_objective(req: SearchRequest, task_data: TaskData, cache: FeatureCache, budget: int | None = None,
                   events: Events | None = None) -> Callable:
    packing = gpu_packing(req, task_data)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(ATTR_WORKER, worker_id())
        if budget is not None and not claims_budget(trial.study, trial.number, budget):
            trial.set_user_attr(ATTR_SURPLUS, True)
            trial.study.stop()
            raise optuna.TrialPruned("budget already taken by other workers")
        try:
            cfg = req.space.sample(trial, req.fixed)
            if trial.user_attrs.get(ATTR_OOM_BATCH):  # an out-of-memory retry runs at half the batch size
                cfg = cfg.model_copy(update={"batch_size": int(trial.user_attrs[ATTR_OOM_BATCH])})
            trial.set_user_attr(ATTR_CONFIG, cfg.model_dump())
            if events:
                events.emit(TrialStarted(str(trial.number), cfg.model_dump(), _origin(trial)))
            reporter = OptunaReporter(trial, events, req.time_budget)
            with packing.run(cfg, cache, task_data.data, reporter) if packing is not None else nullcontext():
                result = fine_tune_and_score(cfg, task_data, reporter, cache=cache)
            stopped = reporter.pruned_at is not None and result.stopped_early
            # a completed trial's model: latency and size (once per architecture in this process)
            latency = None if stopped else trial_latency(cfg, task_data, cache, required=reporter.multi_objective)
        except KeyboardInterrupt:
            _set_attrs(trial, {**failure_attrs("Interrupted: stopped by the user (Ctrl-C); retried on resume"),
                               ATTR_INTERRUPTED: True})
            raise
        except Exception as exc:
            _set_attrs(trial, failure_attrs(exc))
            from autoft.core.gpu import TrialOutOfMemory

            if isinstance(exc, TrialOutOfMemory) and oom_retry_enabled():
                enqueue_oom_retry(trial, exc)
            raise
        _set_attrs(trial, result_attrs(result, task_data.metric, latency))
        if stopped:
            if reporter.stopped_by:  # the deadline, not the pruner: its reported epochs are kept
                trial.set_user_attr(ATTR_STOPPED_BY, reporter.stopped_by)
                req.time_budget.trial_stopped(trial.number)
                log.info("trial %d stopped by the time budget after epoch %d", trial.number, reporter.pruned_at)
                raise optuna.TrialPruned(f"stopped by the time budget after epoch {reporter.pruned_at}")
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        if reporter.multi_objective:  # the metric, then the latency figure minimised
            from autoft.study.record import ATTR_LATENCY_CPU_B1, latency_attrs

            return result.score, float(latency_attrs(latency)[req.latency_objective or ATTR_LATENCY_CPU_B1])
        return result.score

    return objective


def trial_latency(cfg, task_data: TaskData, cache: FeatureCache | None, required: bool = False):
    """The :class:`~autoft.core.latency.Latency` of a completed trial's model (the process's meter: once per
    architecture), or None when ``AUTOFT_LATENCY=0`` or the measurement failed (logged). ``required`` (a
    multi-objective study): always measured, and a failure fails the trial."""
    from autoft.core.latency import latency_enabled, measure_latency

    if not required and not latency_enabled():
        return None
    try:
        return measure_latency(cfg, task_data, cache)
    except Exception as exc:
        if required:
            from autoft.errors import TrialFailed

            raise TrialFailed(f"the model's latency could not be measured: {type(exc).__name__}: {exc}") from exc
        log.warning("the latency of %s could not be measured: %s: %s", cfg.backbone, type(exc).__name__, exc)
        return None


def _origin(trial: optuna.Trial) -> str:
    """The origin of a live trial (its attributes as set when it was enqueued)."""
    from types import SimpleNamespace

    return trial_origin(SimpleNamespace(user_attrs=trial.user_attrs, system_attrs=live_system_attrs(trial)))


def trial_ended(t) -> TrialEnded:
    """The ``trial_end`` event of a finished trial of the study (under either engine)."""
    from autoft.study.record import ATTR_EPOCHS, ATTR_METRICS, ATTR_SECONDS, ATTR_STOPPED_BY, metric_value

    metrics = t.user_attrs.get(ATTR_METRICS)
    seconds = t.user_attrs.get(ATTR_SECONDS)
    return TrialEnded(key=str(t.number), state=t.state.name.lower(), value=metric_value(t), config=config_of(t),
                      metrics=dict(metrics) if isinstance(metrics, dict) else {},
                      epochs=int(t.user_attrs.get(ATTR_EPOCHS, len(t.intermediate_values)) or 0),
                      seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
                      fail_reason=str(t.user_attrs.get(ATTR_FAIL, "")) if t.state == TrialState.FAIL else "",
                      number=t.number, origin=trial_origin(t), stopped_by=str(t.user_attrs.get(ATTR_STOPPED_BY, "")))


class _Deadline:
    """Study callback (a time budget bounding the command): after each trial, keep the final check of
    the best trial so far out of the trials' time, and start no trial that is not expected to end in time."""

    def __init__(self, budget: TimeBudget):
        self.budget = budget

    def __call__(self, study: optuna.Study, trial) -> None:
        from autoft.results.tables import best_trial
        from autoft.study.record import ATTR_EPOCHS, ATTR_SECONDS

        self.budget.note_trial(trial.user_attrs.get(ATTR_SECONDS), trial.user_attrs.get(ATTR_EPOCHS),
                               config_of(trial).get("epochs"))
        if trial.state == TrialState.COMPLETE:
            self.budget.reserve_final_check(best_trial(study))
        if not self.budget.may_start_trial():
            log.info("time budget: no new trial (%.0f s to the deadline, %.0f s of them kept for the final "
                     "check and the report)", self.budget.left(), self.budget.reserved + self.budget.TAIL_SECONDS)
            study.stop()


class _EmitTrialEnd:
    """Study callback: the ``trial_end`` event once Optuna has stored the finished trial."""

    def __init__(self, events: Events):
        self.events = events

    def __call__(self, study: optuna.Study, trial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS) or trial.state not in FINISHED:
            return  # a surplus trial never ran
        self.events.emit(trial_ended(trial))


def run_study(req: SearchRequest, *, task_data: TaskData | None = None, callbacks: list | None = None,
              cache: FeatureCache | None = None, rank=None, study: optuna.Study | None = None,
              events: Events | None = None) -> optuna.Study:
    """Run (or resume) the study until it has ``req.budget`` finished trials or the time is up: with
    ``req.time_budget`` bounding the command, trials stop at epoch boundaries before its deadline (less
    the winner's final check) and no trial starts that is not expected to end in time; otherwise no
    trial starts after ``req.timeout`` seconds.

    ``rank``: how a new study uses the backbone ranking (:class:`autoft.rank.RankPolicy`; None = the
    default policy, False = no ranking). ``study``: the study of ``req`` if the caller already opened it
    (``create_study(req, n_train=...)``), saving a second connection to the storage. ``callbacks``:
    Optuna study callbacks; ``events``: the engine-neutral events (:mod:`autoft.events`)."""
    # Optuna logs every failed trial with a traceback; we record the reason and log one line instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    events = events if events is not None else Events()
    task_data = task_data or req.task.prepare(device=req.execution.device)
    n_train = len(task_data.splits.train)
    study = study or create_study(req, n_train=n_train)
    resolve_objectives(req, study)  # a study opened by the caller: its objectives
    check_latency_objective(req, task_data)
    if req.multi_objective:
        log.info("multi-objective study (%s): trials are not pruned, Optuna cannot prune them (Trial.report and "
                 "should_prune raise); a time budget still stops a trial at an epoch boundary",
                 describe_objectives(req.objectives))
    recover_interrupted(study)
    done = count_finished(study)
    events.emit(search_started(req, "optuna", task_data, done, n_train))
    budget = req.budget + (done if req.extend else 0)
    remaining = budget - done
    if remaining <= 0:
        log.info("study '%s' already has %d finished trials (budget %d)", req.study_name, done, budget)
        return study
    cache = cache or FeatureCache()
    clock = req.time_budget
    if rank is not False and usable_ranking(study):  # rank the backbones on frozen features; try the best first
        from autoft.rank import RankPolicy, apply_ranking

        with clock.phase("ranking") if clock is not None else nullcontext():
            apply_ranking(study, req, task_data, cache, rank if isinstance(rank, RankPolicy) else RankPolicy())
    # with other workers, each one stops once the study as a whole has its budget (alone, n_trials
    # already stops it there, and the check would cost a read of the whole study after every trial)
    stop = [BudgetCallback(budget)] if req.parallel else []
    ended = [_EmitTrialEnd(events)] if events else []
    deadline = []
    if clock is not None and clock.limited:
        from autoft.results.tables import best_trial

        clock.reserve_final_check(best_trial(study))  # a resumed study may already have its winner
        if not clock.may_start_trial():
            log.warning("time budget: no time left for trials (%.0f s to the deadline, %.0f s of them kept for "
                        "the final check and the report)", clock.left(), clock.reserved + clock.TAIL_SECONDS)
            return study
        deadline = [_Deadline(clock)]
    with clock.phase("trials") if clock is not None else nullcontext():
        objective = make_objective(req, task_data, cache, budget, events)
        study.optimize(objective, n_trials=remaining,
                       timeout=req.trials_timeout, n_jobs=req.n_jobs, catch=(Exception,),
                       callbacks=[*stop, log_failures, *deadline, *ended, *(callbacks or [])],
                       gc_after_trial=False, show_progress_bar=False)
        # an out-of-memory retry queued by the last trials runs now, not on the next resume
        retries = waiting_oom_retries(study)
        if retries and (clock is None or not clock.limited or clock.may_start_trial()):
            study.optimize(objective, n_trials=retries, timeout=req.trials_timeout, n_jobs=min(req.n_jobs, retries),
                           catch=(Exception,), callbacks=[log_failures, *deadline, *ended, *(callbacks or [])],
                           gc_after_trial=False, show_progress_bar=False)
    return study


def check_latency_objective(req: SearchRequest, task_data: TaskData) -> None:
    """A GPU latency objective needs trials on a CUDA device (:class:`ConfigError` naming ``--objectives``)."""
    key = req.latency_objective
    if key and "_gpu_" in key:
        import torch

        if torch.device(task_data.device).type != "cuda" or not torch.cuda.is_available():
            from autoft.errors import ConfigError

            raise ConfigError(f"the objective {key} is measured on the task's CUDA GPU, but the trials run on "
                              f"{task_data.device}; use latency (CPU, batch 1) or latency_cpu_b64",
                              field="--objectives")


def waiting_oom_retries(study: optuna.Study) -> int:
    """Out-of-memory retries queued in the study and not started yet."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
               if t.user_attrs.get(ATTR_OOM_RETRY) is not None)


class OptunaEngine:
    """The Optuna adapter of the engine contract: trials run in this process (threads for ``n_jobs``)."""

    name = "optuna"

    def open(self, request: SearchRequest, n_train: int | None = None) -> optuna.Study:
        return create_study(request, n_train=n_train)

    def run(self, request: SearchRequest, *, task_data, events: Events, cache, rank=None) -> optuna.Study:
        study = self.open(request, n_train=len(task_data.splits.train))
        return run_study(request, task_data=task_data, cache=cache, rank=rank, study=study, events=events)
