"""The Ray Tune engine: the same search on a Ray cluster (or a local Ray instance).

* search algorithm: ``OptunaSearch`` driven by the engine-neutral define-by-run space
  (:meth:`autoft.space.SearchSpace.sample`), with the same TPE settings as the Optuna engine;
* scheduler: ASHA by default (``--pruner hyperband`` = asynchronous Hyperband, i.e. ASHA with
  several brackets; ``median`` = median stopping; ``none`` = FIFO); epochs are the fidelity and the
  core reports every epoch with ``ray.tune.report``;
* resources: ``cpus_per_trial`` (also torch's thread count in the trial) and ``gpus_per_trial``
  (fractions allowed); a trial runs on the GPU Ray assigns it, else on the CPU;
* the task's data is put in Ray's object store once (``tune.with_parameters``), not pickled per trial;
  each worker process keeps one :class:`FeatureCache` (actors are reused), so frozen-prefix features
  are computed once per worker and backbone, not once per trial;
* the experiment lives in autoft's state folder (:func:`autoft.study.study_state_dir`:
  ``~/.local/state/autoft/ray/<task>-<study>-<hash of the results folder>/tune``), not in the results
  folder: ``Tuner.restore`` unpickles it, and a results folder may come from elsewhere.  Running the
  same command again resumes an interrupted sweep from there;
* joining a cluster (``--address``) without token authentication (``RAY_AUTH_MODE=token``) logs a
  warning: anyone who reaches such a cluster's ports runs code on it;
* at the end every finished Ray trial is written into an Optuna study in the normal storage
  (params, distributions, per-epoch values, the same user attributes as the Optuna engine;
  ASHA-stopped trials as PRUNED, errors as FAIL with their reason), so ``report``, ``show`` and
  ``export`` work unchanged;
* a time budget that bounds the command (``timeout_mode: command``, :class:`~autoft.engines.base.TimeBudget`)
  is applied on the driver by :class:`DeadlineStopper`: a trial whose next epoch would end after the
  trials' share of the deadline (the deadline less the winner's expected final check and the report)
  is stopped when it reports an epoch; at that point itself Ray stops every running trial at once,
  in the middle of an epoch (as Tune's ``time_budget_s``, which only counts the trials' time and is
  kept as a backstop): the epochs a stopped trial reported are kept, it is recorded PRUNED with
  ``stopped_by: time budget``, and a trial that never started is not recorded. With
  ``timeout_mode: trials`` the timeout is Tune's ``time_budget_s``, as before.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune

from autoft.core import FeatureCache, TaskData, TrialConfig, fine_tune_and_score
from autoft.engines.base import STOPPED_BY_BUDGET, SearchRequest, TimeBudget, search_started
from autoft.errors import ConfigError
from autoft.events import EpochReported, Events, TrialStarted
from autoft.study.record import (ATTR_CONFIG, ATTR_ENGINE, ATTR_EPOCHS, ATTR_FIRST_TRIAL, ATTR_FIRST_TRIALS,
                                 ATTR_RANKING, ATTR_RAY_TRIAL, ATTR_STOPPED_BY, failure_attrs, reported_attrs)
from autoft.study.storage import make_private_dir, study_state_dir, warn_malformed

log = logging.getLogger(__name__)

METRIC = "score"  # the key every report carries: the task's metric on the validation split
EXPERIMENT = "tune"  # experiment name under the study's state folder (and, before, results/<task>/<study>/ray/)
# environment passed on to the trials (weights and caches are looked up on the worker)
FORWARDED_ENV = ("AUTOFT_HOME", "AUTOFT_OFFLINE", "AUTOFT_CACHE_DIR", "AUTOFT_CACHE_MAX_GB", "AUTOFT_ZOO", "TORCH_HOME",
                 "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# folders among them: made absolute here, since a Ray worker runs in a working directory of its own
PATH_ENV = ("AUTOFT_HOME", "AUTOFT_CACHE_DIR", "AUTOFT_ZOO", "TORCH_HOME", "HF_HOME")

# the sampler's grouped/multivariate TPE is marked experimental; we rely on it knowingly (as the Optuna engine)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# a trial resumed by Tuner.restore reports its first epochs again to OptunaSearch's study
warnings.filterwarnings("ignore", message="The reported value is ignored because this")

_WORKER_CACHE: FeatureCache | None = None  # one per Ray worker process, kept across reused trials


def _worker_cache() -> FeatureCache:
    global _WORKER_CACHE
    if _WORKER_CACHE is None:
        _WORKER_CACHE = FeatureCache()
    return _WORKER_CACHE


class DefineByRun:
    """OptunaSearch's define-by-run function: asks the (captured) Optuna trial through the
    engine-neutral space and returns the complete config (fixed values included).

    A module-level class, so that Tune can pickle the searcher when it saves the experiment."""

    def __init__(self, space, fixed: dict[str, Any]):
        self.space, self.fixed = space, dict(fixed)

    def __call__(self, trial) -> dict[str, Any]:
        return self.space.sample(trial, self.fixed).model_dump()


class RayReporter:
    """Adapts Ray Tune to the core's Reporter protocol: one ``ray.tune.report`` per epoch.

    Ray's scheduler stops a trial by ending its worker; the core never has to be told."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.started = time.time()
        self._last = time.monotonic()

    def on_train_start(self) -> None:  # the core calls it before the first epoch
        self._last = time.monotonic()

    def report(self, step: int, value: float, metrics: dict[str, float]) -> bool:
        now = time.monotonic()
        epoch_seconds, self._last = now - self._last, now
        tune.report({METRIC: float(value), "epoch": int(step), "planned_epochs": self.epochs,
                     "started": self.started, "elapsed": round(time.time() - self.started, 3),
                     "epoch_seconds": round(epoch_seconds, 3), **{f"val_{k}": float(v) for k, v in metrics.items()}})
        return False


def trial_device(wants_gpu: bool) -> str:
    """The device of this trial: the GPU Ray assigned to it (Ray sets CUDA_VISIBLE_DEVICES) when the search
    asked for GPUs (``--gpus-per-trial`` above 0), else the CPU. A trial given no GPU it asked for fails
    with that reason instead of running on the CPU unnoticed."""
    if not wants_gpu:
        return "cpu"
    import ray
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    raise RuntimeError(f"this trial was to run on a GPU (--gpus-per-trial), but Ray assigned it none "
                       f"(ray.get_gpu_ids()={ray.get_gpu_ids()}, torch.cuda.is_available()={torch.cuda.is_available()})")


def trainable(config: dict, task_data: TaskData | None = None, threads: int = 1, gpu: bool = False) -> None:
    """One Ray Tune trial: fine-tune ``config`` and report the validation metric every epoch."""
    import torch

    # arrays from Ray's object store are read-only views (zero-copy); the core never writes to them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(max(1, threads))
    cfg = TrialConfig(**{k: v for k, v in config.items() if k in TrialConfig.model_fields})
    data = dataclasses.replace(task_data, device=trial_device(gpu))
    fine_tune_and_score(cfg, data, RayReporter(cfg.epochs), cache=_worker_cache())


class TrialEvents(tune.Callback):
    """Ray Tune's driver callbacks → the engine-neutral events (trial start, every epoch) and log lines.

    The ``trial_end`` events follow once the sweep's trials are in the study (:func:`to_optuna`): then
    each carries its number, its state as recorded (complete / pruned / fail) and its reason."""

    def __init__(self, events: Events | None = None):
        self.events = events if events is not None else Events()
        self.started: set[str] = set()  # trials that started on a worker (in this driver's run)
        self.running: set[str] = set()

    # Tune saves its callbacks with the experiment; the events (locks, clients) live on this driver only
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(str(trial.trial_id))
        self.running.add(str(trial.trial_id))
        cfg = {k: v for k, v in dict(trial.config).items() if k in TrialConfig.model_fields}
        self.events.emit(TrialStarted(str(trial.trial_id), cfg))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if METRIC in result and "epoch" in result:
            metrics = {k[4:]: float(v) for k, v in result.items() if k.startswith("val_")}
            self.events.emit(EpochReported(str(trial.trial_id), int(result["epoch"]), float(result[METRIC]), metrics))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(str(trial.trial_id))
        r = trial.last_result or {}
        log.info("ray trial %s finished after %s epoch(s): %s %.4f", trial.trial_id, r.get("epoch", "?"), METRIC,
                 r.get(METRIC, float("nan")))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(str(trial.trial_id))
        log.info("ray trial %s failed", trial.trial_id)


class DeadlineStopper(tune.Stopper):
    """The command's time budget on the driver (:class:`~autoft.engines.base.TimeBudget`, ``command`` mode).

    Each result is an epoch boundary: a trial whose next epoch (as long as its last one) would end
    after :meth:`TimeBudget.trials_end` is stopped there; a trial that completes its epochs and is the
    best so far sets the reserve for the final check. At ``trials_end`` (or when nothing runs and no
    new trial can report an epoch in time) :meth:`stop_all` ends the sweep: Ray stops the running
    trials at once, mid-epoch. ``stopped``: the trials this stopped (their ids)."""

    def __init__(self, clock: TimeBudget, direction: str, trial_events: TrialEvents):
        self.clock, self.sign, self.trial_events = clock, (-1.0 if direction == "minimize" else 1.0), trial_events
        self.best: float | None = None
        self.stopped: set[str] = set()
        self.fired = False

    # Tune saves the stopper with the experiment; the clock is this driver's (a restored sweep: inert)
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.clock, self.trial_events, self.stopped, self.fired, self.best = None, None, set(), False, None

    def __call__(self, trial_id, result) -> bool:
        if self.clock is None or "epoch" not in result:
            return False
        epoch, planned = int(result["epoch"]), int(result.get("planned_epochs") or 0)
        self.clock.note_trial(result.get("elapsed"), epoch, planned)
        if planned and epoch >= planned:  # complete: the best so far sets the final check's reserve
            score = result.get(METRIC)
            if score is not None and math.isfinite(score) and (self.best is None or
                                                               self.sign * score > self.sign * self.best):
                self.best = float(score)
                self.clock.reserve(float(result.get("elapsed", 0.0)))
            return False
        if not self.clock.next_epoch_fits(float(result.get("epoch_seconds", result.get("elapsed", 0.0)))):
            self.stopped.add(str(trial_id))
            log.info("ray trial %s stopped by the time budget after epoch %d", trial_id, epoch)
            return True
        return False

    def stop_all(self) -> bool:
        if self.clock is None or not self.clock.limited:
            return False
        if not self.fired:
            running = self.trial_events.running if self.trial_events is not None else set()
            if self.clock.trials_over() or (not running and not self.clock.may_start_trial()):
                self.fired = True
                self.stopped |= set(running)  # Ray stops them now, mid-epoch
                log.info("time budget: the Ray sweep ends (%d trial(s) running)", len(running))
        return self.fired


def experiment_path(req: SearchRequest) -> Path:
    """Where the Tune experiment of ``req`` is kept: autoft's per-user state folder, keyed by the resolved
    study folder, never the results folder (restoring an experiment unpickles its files)."""
    return study_state_dir(req.study_dir, "ray") / EXPERIMENT


def untrusted_experiment(req: SearchRequest) -> Path | None:
    """A Tune experiment inside the results folder (where earlier versions kept it), if there is one."""
    legacy = req.study_dir / "ray" / EXPERIMENT
    return legacy if legacy.is_dir() else None


def token_auth_warning(address: str) -> str | None:
    """Why joining the cluster at ``address`` is unsafe, or None: Ray authenticates a client with a token
    only when ``RAY_AUTH_MODE=token`` (for an explicit address it never turns it on by itself)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "token":
        return None
    if address == "auto" and not mode and (os.environ.get("RAY_AUTH_TOKEN") or Path(
            os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser().is_file()):
        return None  # a local cluster found automatically with a token at hand: Ray enables token auth
    return (f"joining the Ray cluster at {address} without token authentication (RAY_AUTH_MODE is "
            f"{repr(mode) if mode else 'not set'}): anyone who can reach the cluster's ports can run code on its "
            "nodes and read the task's data. Start the cluster and this command with RAY_AUTH_MODE=token and the "
            "same RAY_AUTH_TOKEN (docs/scaling.md)")


def forwarded_env() -> dict[str, str]:
    """The environment the trials need, with folders made absolute (relative to this process's cwd)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if "AUTOFT_ZOO" not in env and Path("zoo.yaml").is_file():  # workers run elsewhere: point them at our zoo file
        env["AUTOFT_ZOO"] = "zoo.yaml"
    for k in PATH_ENV:
        if env.get(k) and env[k].strip().lower() not in ("off", "none", "0", "false", "no"):
            env[k] = str(Path(env[k]).expanduser().resolve())
    return env


def _init_ray(address: str | None, req: SearchRequest) -> bool:
    """Connect to ``address`` or start a local Ray sized to this machine. True if we started/connected."""
    import ray

    if ray.is_initialized():
        return False
    env = forwarded_env()
    kwargs: dict[str, Any] = {"log_to_driver": log.isEnabledFor(logging.INFO), "configure_logging": True,
                              "logging_level": logging.WARNING}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        warning = token_auth_warning(address)
        if warning:
            log.warning(warning)
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        import torch

        n_cpus = os.cpu_count() or 1
        log.info("starting a local Ray instance (%d CPUs)", n_cpus)
        ray.init(num_cpus=n_cpus, num_gpus=torch.cuda.device_count(), include_dashboard=False, **kwargs)
    return True


def run_ray(req: SearchRequest, *, task_data: TaskData | None = None, enqueue: list[dict] | None = None,
            rank=None, events: Events | None = None) -> optuna.Study:
    """Run (or resume) the search on Ray Tune and return it as an Optuna study in ``req.storage_url``.

    ``enqueue``: configurations (parameter name → value) to evaluate first, before the sampler; by
    default a new experiment ranks the backbones on the driver and starts with the search space's
    first trials, as the Optuna engine does (``rank``: a :class:`~autoft.rank.RankPolicy`, None for
    the default, False for neither; ``drop_below`` is not applied here). Resources and the cluster
    address come from ``req.execution``.
    """
    ex = req.execution
    address, cpus_per_trial, gpus_per_trial, max_concurrent = (ex.address, ex.cpus_per_trial, ex.gpus_per_trial,
                                                               ex.max_concurrent)
    events = events if events is not None else Events()
    if cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be above 0, got {cpus_per_trial}")
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be 0 or more, got {gpus_per_trial}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    if req.extend:
        raise ConfigError("--extend is not supported with --backend ray; use a new --study-name")
    task = req.task
    if ex.device.startswith("cuda") and gpus_per_trial == 0:
        raise ConfigError(f"task '{task.name}' runs on device {ex.device}: pass --gpus-per-trial "
                          "(a fraction such as 0.5 shares a GPU between trials)", field="device")
    path = experiment_path(req)
    legacy = untrusted_experiment(req)
    if legacy is not None and not tune.Tuner.can_restore(path):
        raise ConfigError(f"the results folder holds a Ray Tune experiment ({legacy}), written by an earlier autoft "
                          "or copied from elsewhere; it is not resumed: resuming unpickles its files, which can run "
                          f"code. autoft now keeps experiments in {path}. If you trust this results folder, move "
                          f"{legacy} to {path} and run the same command again; otherwise delete it, or start a new "
                          "sweep with another --study-name")
    refuse_multi_objective(req)  # after the check above: it opens the study, which must not touch an untrusted folder
    task_data = task_data or task.prepare(device=ex.device)

    import ray
    from contextlib import nullcontext

    clock = req.time_budget

    def phase(name):
        return clock.phase(name) if clock is not None else nullcontext()

    with phase("starting Ray"):
        started = _init_ray(address, req)
    try:
        _check_resources(cpus_per_trial, gpus_per_trial, local=not address)
        mode = "min" if task.direction == "minimize" else "max"
        make_private_dir(path.parent)  # this user's only: Tuner.restore reads it back
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        fn = tune.with_resources(
            tune.with_parameters(trainable, task_data=task_data, threads=max(1, int(round(cpus_per_trial))),
                                 gpu=gpus_per_trial > 0),
            resources)
        events.emit(search_started(req, "ray", task_data, 0, len(task_data.splits.train)))
        trial_events = TrialEvents(events)
        deadline = DeadlineStopper(clock, task.direction, trial_events) if clock is not None and clock.limited \
            else None
        if tune.Tuner.can_restore(path):
            log.info("resuming the Ray Tune experiment in %s", path)
            if deadline is not None:
                log.warning("a resumed Ray sweep keeps the settings it started with: the time budget of this "
                            "command applies to the final check only")
                deadline = None
            tuner = tune.Tuner.restore(str(path), trainable=fn, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            scores = []
            if enqueue is None and rank is not False:
                from autoft.core import FeatureCache
                from autoft.rank import RankPolicy, plan_first_trials

                policy = rank if isinstance(rank, RankPolicy) else RankPolicy()
                if policy.enabled:
                    with phase("ranking"):
                        scores, enqueue = plan_first_trials(req, task_data, FeatureCache(), policy)
                    log.info("first trials: %s", enqueue)
            _record_plan(req, scores, enqueue)
            tuner = tune.Tuner(fn, tune_config=_tune_config(req, mode, max_concurrent, enqueue,
                                                            len(task_data.splits.train)),
                               run_config=_run_config(path, events, trial_events, deadline))
        with phase("trials"):
            if deadline is not None and not clock.may_start_trial():
                log.warning("time budget: no time left for trials (%.0f s to the deadline)", clock.left())
            else:
                tuner.fit()
            study = to_optuna(req, path, events, trial_events=trial_events, deadline=deadline, task_data=task_data)
    finally:
        if started:
            ray.shutdown()
    return study


def refuse_multi_objective(req: SearchRequest) -> None:
    """A multi-objective search (``--objectives accuracy,latency``, or an existing study that has two
    objectives) runs with the Optuna engine only: Ray Tune's schedulers (ASHA, median stopping) stop
    trials on one metric, and the sweep's trials land in the study with one value."""
    if req.objectives is None:
        from autoft.engines.optuna_engine import create_study

        create_study(req)  # an existing study's objectives (sets req.objectives)
    if req.multi_objective:
        raise ConfigError("a multi-objective search (accuracy and latency) runs with --backend optuna only: Ray "
                          "Tune's schedulers stop trials on one metric; drop --objectives (or the task's "
                          "objectives) or use --backend optuna", field="--objectives")


def _record_plan(req: SearchRequest, scores: list, enqueue: list[dict] | None) -> None:
    """Keep the ranking and the first trials of a new sweep in its Optuna study, as the Optuna engine
    does: the report shows the ranking, and :func:`to_optuna` marks the trials that ran a recipe."""
    if not scores and not enqueue:
        return
    from autoft.engines.optuna_engine import create_study

    study = create_study(req)
    if scores:
        study.set_user_attr(ATTR_RANKING, [s.to_dict() for s in scores])
    if enqueue:
        study.set_user_attr(ATTR_FIRST_TRIALS, [dict(e) for e in enqueue])


def _check_resources(cpus: float, gpus: float, local: bool) -> None:
    """Fail fast when no node can ever hold one trial (Tune would wait for it forever)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no node"
    msg = (f"no Ray node has {cpus:g} CPU(s) and {gpus:g} GPU(s) for one trial (nodes: {have}); "
           "lower --cpus-per-trial / --gpus-per-trial")
    if local:
        raise ConfigError(msg)
    log.warning("%s, or add such nodes: trials wait until one joins", msg)


def _tune_config(req: SearchRequest, mode: str, max_concurrent: int | None, enqueue: list[dict] | None,
                 n_train: int):
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=req.task.seed, n_startup_trials=8, multivariate=True, group=True,
                                         constant_liar=True)
    search = OptunaSearch(space=DefineByRun(req.space, req.fixed), metric=METRIC, mode=mode, sampler=sampler,
                          points_to_evaluate=list(enqueue or []) or None)
    scheduler = req.pruner_spec(n_train).ray(METRIC, mode)  # the task's pruner, as the Optuna engine reads it
    return tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=req.budget,
                           max_concurrent_trials=max_concurrent, time_budget_s=_time_budget_s(req),
                           reuse_actors=True)


def _time_budget_s(req: SearchRequest) -> float | None:
    """Tune's ``time_budget_s``: the trials' timeout (``trials`` mode), or, when the budget bounds the
    command, the time left for trials (a backstop: :class:`DeadlineStopper` applies the deadline)."""
    clock = req.time_budget
    if clock is None or not clock.limited:
        return req.trials_timeout
    return max(1.0, clock.left() - clock.TAIL_SECONDS)


def _run_config(path: Path, events: Events | None = None, trial_events: TrialEvents | None = None,
                deadline: DeadlineStopper | None = None):
    return tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0, stop=deadline,
                          failure_config=tune.FailureConfig(max_failures=0),
                          callbacks=[trial_events if trial_events is not None else TrialEvents(events)])


# --------------------------------------------------------------------------------------------
# Ray results → Optuna study
def to_optuna(req: SearchRequest, path: Path, events: Events | None = None, *, trial_events: TrialEvents | None = None,
              deadline: DeadlineStopper | None = None, task_data: TaskData | None = None) -> optuna.Study:
    """Write every finished trial of the Ray experiment at ``path`` into the Optuna study of ``req``
    (trials already there are skipped, so this is safe to repeat), and emit each one's ``trial_end``.

    ``trial_events``/``deadline``: this driver's view of the sweep that just ran: a trial that never
    started (stopped while pending) is not recorded, and the trials the time budget stopped carry
    ``stopped_by``. ``task_data``: the task the sweep ran on; given, every completed trial's model has its
    latency and size measured here on the driver, one architecture at a time (:mod:`autoft.core.latency`;
    on the workers the trials ran side by side and would have disturbed each other's timings)."""
    from autoft.engines.optuna_engine import create_study, trial_ended

    study = create_study(req)
    study.set_user_attr(ATTR_ENGINE, "ray")  # the sampler/pruner objects of this study did not run the search
    have = {t.user_attrs.get(ATTR_RAY_TRIAL) for t in study.get_trials(deepcopy=False)}
    analysis = tune.ExperimentAnalysis(str(path))
    frames = analysis.trial_dataframes
    first = study.user_attrs.get(ATTR_FIRST_TRIALS) or []
    if not isinstance(first, list) or not all(isinstance(e, dict) for e in first):
        warn_malformed(None, ATTR_FIRST_TRIALS, first, "no trial is marked as a first trial")
        first = []
    never_ran = set()
    if trial_events is not None:  # pending when the sweep ended (time budget): nothing ran, nothing to record
        never_ran = {t.trial_id for t in analysis.trials if t.trial_id not in trial_events.started
                     and t.status == "TERMINATED" and (frames.get(t.trial_id) is None or frames[t.trial_id].empty)}
    stopped = deadline.stopped if deadline is not None else set()
    frozen = [_frozen_trial(req, t, frames.get(t.trial_id), first, stopped=t.trial_id in stopped)
              for t in analysis.trials if t.trial_id not in have and t.trial_id not in never_ran]
    unfinished = [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        log.warning("the Ray sweep was interrupted with %d trial(s) unfinished; run the same command again "
                    "to resume it (%s)", len(unfinished), path)
    elif len(analysis.trials) != req.budget and req.timeout is None and not never_ran:
        log.warning("the Ray experiment in %s was created with a budget of %d trials (not %d); to run more, "
                    "start a new sweep with another --study-name", path, len(analysis.trials), req.budget)
    frozen = sorted((f for f in frozen if f is not None), key=lambda f: f.datetime_start)
    if task_data is not None:
        _add_latency(frozen, task_data)
    for f in frozen:  # in the order the trials started
        study.add_trial(f)
    added_ids = {f.user_attrs[ATTR_RAY_TRIAL] for f in frozen}
    for t in study.get_trials(deepcopy=False) if frozen else ():  # numbered now
        if t.user_attrs.get(ATTR_RAY_TRIAL) in added_ids:
            if t.user_attrs.get(ATTR_STOPPED_BY) and req.time_budget is not None:
                req.time_budget.trial_stopped(t.number)
            if events:
                events.emit(dataclasses.replace(trial_ended(t), key=str(t.user_attrs[ATTR_RAY_TRIAL])))
    added = len(frozen)
    log.info("added %d Ray trial(s) to study '%s'", added, req.study_name)
    return study


def _add_latency(frozen: list, task_data: TaskData) -> None:
    """Measure the latency and size of every completed trial's model (the one record writer's attributes)."""
    from autoft.engines.optuna_engine import trial_latency
    from autoft.study.record import latency_attrs

    cache = None
    for f in frozen:
        if f.state != TrialState.COMPLETE:
            continue
        try:
            cfg = TrialConfig(**f.user_attrs[ATTR_CONFIG])
        except Exception:  # noqa: BLE001 - a configuration outside today's model: nothing to measure
            continue
        if cache is None:
            cache = FeatureCache()
        for k, v in latency_attrs(trial_latency(cfg, task_data, cache)).items():
            f.set_user_attr(k, v)


def _frozen_trial(req: SearchRequest, trial, df, first: list[dict] = (), stopped: bool = False
                  ) -> optuna.trial.FrozenTrial | None:
    """The Optuna record of a finished Ray trial (None: not finished). ``stopped``: the time budget stopped it."""
    status = trial.status
    if status not in ("TERMINATED", "ERROR"):
        return None  # pending or interrupted: Tuner.restore runs it when the sweep resumes
    config = dict(trial.config)
    cfg_doc = {k: v for k, v in config.items() if k in TrialConfig.model_fields}
    try:
        cfg_doc = TrialConfig(**cfg_doc).model_dump()  # canonical field order, as the Optuna engine writes it
    except Exception:  # keep what Ray has; the trial failed on it anyway
        pass
    params, dists = _params_and_distributions(req, config)
    rows = [] if df is None or df.empty or METRIC not in df.columns else \
        df.dropna(subset=[METRIC]).to_dict("records")
    intermediate = {int(r.get("epoch", r.get("training_iteration", i + 1))): float(r[METRIC])
                    for i, r in enumerate(rows) if math.isfinite(float(r[METRIC]))}
    last = rows[-1] if rows else {}
    metric = req.task.metric
    attrs = {ATTR_CONFIG: cfg_doc, ATTR_RAY_TRIAL: trial.trial_id, ATTR_EPOCHS: len(rows)}
    if any(all(config.get(k) == v for k, v in e.items()) for e in first):
        attrs[ATTR_FIRST_TRIAL] = True  # one of the configurations the sweep started with
    if last:
        attrs.update(reported_attrs(rows, metric, float(last.get("elapsed", 0.0))))  # the one record writer
    started = dt.datetime.fromtimestamp(float(rows[0]["started"])) if rows and "started" in rows[0] else None
    completed = started + dt.timedelta(seconds=float(last.get("elapsed", 0.0))) if started else None
    value = None
    if status == "ERROR":
        state = TrialState.FAIL
        attrs.update(failure_attrs(_error_reason(trial)))
    elif stopped and int(last.get("epoch", 0)) < int(cfg_doc.get("epochs", last.get("planned_epochs", 0))):
        state = TrialState.PRUNED  # the time budget stopped it (maybe before its first epoch ended)
        attrs[ATTR_STOPPED_BY] = STOPPED_BY_BUDGET
    elif not rows:
        state = TrialState.FAIL
        attrs.update(failure_attrs("the trial ended without reporting a result"))
    elif int(last.get("epoch", 0)) < int(cfg_doc.get("epochs", last.get("planned_epochs", 0))):
        state = TrialState.PRUNED  # the scheduler stopped it before its last epoch
    else:
        state = TrialState.COMPLETE
        value = float(last[METRIC])
    now = dt.datetime.now()
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=value, values=None,
        datetime_start=started or now, datetime_complete=completed or now,
        params=params, distributions=dists, user_attrs=attrs, system_attrs={},
        intermediate_values=intermediate)


def _params_and_distributions(req: SearchRequest, config: dict) -> tuple[dict, dict]:
    """Replay the define-by-run space on the trial's values to recover Optuna params + distributions."""
    fixed = optuna.trial.FixedTrial(config)
    try:
        req.space.sample(fixed, req.fixed)
    except Exception as exc:  # a config outside today's space (edited space file): keep no params
        log.warning("could not replay the search space on %s: %s", config, exc)
        return {}, {}
    return dict(fixed.params), dict(fixed.distributions)


def _error_reason(trial) -> str:
    err = None
    try:
        err = trial.get_pickled_error()
    except Exception:  # unpicklable error: fall back to the text trace
        pass
    if err is not None:
        cause = getattr(err, "cause", None) or err
        return f"{type(cause).__name__}: {cause}"[:2000]
    try:
        text = trial.get_error() or ""
    except Exception:
        text = ""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "the trial raised an error (no trace saved)")[:2000]


class RayEngine:
    """The Ray Tune adapter of the engine contract: trials run on a Ray cluster (``req.execution``:
    address, CPUs and GPUs per trial, concurrency); they land in the study when the sweep ends."""

    name = "ray"

    def open(self, request: SearchRequest, n_train: int | None = None) -> optuna.Study:
        from autoft.engines.optuna_engine import create_study

        return create_study(request, n_train=n_train)

    def run(self, request: SearchRequest, *, task_data, events: Events, cache=None, rank=None) -> optuna.Study:
        return run_ray(request, task_data=task_data, rank=rank, events=events)

