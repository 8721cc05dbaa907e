"""The trial record: what every finished trial of an autoft study carries, and the one writer of it.

The Optuna study (any Optuna storage) is autoft's system of record under both engines. Every key a
trial or a study carries is named here, and :func:`result_attrs` / :func:`failure_attrs` are the only
code that turns a core result into user attributes: the Optuna objective sets them on the live trial,
the Ray engine puts them into the :class:`~optuna.trial.FrozenTrial` it adds after the sweep.

Trial user attributes
---------------------
========================  ====================================================================
``config``                the complete :class:`~autoft.core.TrialConfig` (dict)
``metrics``               validation metrics of the last epoch
``history``               the task's metric after every epoch
``epochs_run``            epochs trained
``seconds``               wall time of the trial
``fail_reason``           ``ExceptionName: message`` of a failed trial
``first_trial``           True on a recipe of the space's ``first_trials``
``retry_of``              number of the interrupted trial this one runs again
``oom_retry``             number of the trial that ran out of memory and this one runs again, once,
                          at half its batch size (``oom_batch_size``; autoft.core.gpu)
``worker``                ``host:pid`` of the process running the trial (Optuna engine)
``interrupted``           the trial was cut short (Ctrl-C, dead worker) and is retried
``surplus``               started after other workers had taken the budget; never ran
``stopped_by``            ``time budget``: the command's deadline stopped the trial (recorded PRUNED,
                          with the epochs it reported)
``ray_trial_id``          the Ray Tune trial it came from (Ray engine)
``latency_cpu_b1_ms``     CPU forward latency (ms) of a completed trial's model (backbone + head), batch 1
``latency_cpu_b64_ms``    the same at batch 64 (``latency_gpu_b1_ms``, ``..._b64_ms``: on the task's GPU)
``n_params``, ``size_mb`` parameters of that model, and MB of its parameters and buffers
``latency``               how they were measured (threads, input, cost: :mod:`autoft.core.latency`)
========================  ====================================================================

Study user attributes: ``ranking`` (the backbone ranking before the search), ``first_trials`` (the
configurations a Ray sweep started with), ``engine`` (``ray`` when Ray ran the trials), ``objectives``
(a multi-objective study's objectives: the task's metric, then the latency attribute minimised), ``finalists``
(the top configurations re-run over several seeds or folds, their per-seed scores, means and 95 %
t-intervals, and the winner chosen by the mean: :mod:`autoft.study.finalists`).
"""
from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial

from autoft.study.optuna_internals import FAILED_TRIAL_SYSTEM_ATTR

ATTR_CONFIG = "config"
ATTR_METRICS = "metrics"
ATTR_HISTORY = "history"
ATTR_EPOCHS = "epochs_run"
ATTR_SECONDS = "seconds"
ATTR_FAIL = "fail_reason"
ATTR_FIRST_TRIAL = "first_trial"
ATTR_RETRY_OF = "retry_of"
ATTR_OOM_RETRY = "oom_retry"
ATTR_OOM_BATCH = "oom_batch_size"
ATTR_WORKER = "worker"
ATTR_INTERRUPTED = "interrupted"
ATTR_SURPLUS = "surplus"
ATTR_STOPPED_BY = "stopped_by"
ATTR_RAY_TRIAL = "ray_trial_id"
# a completed trial's inference latency and size (autoft.core.latency), and how they were measured
ATTR_LATENCY_CPU_B1 = "latency_cpu_b1_ms"
ATTR_LATENCY_CPU_B64 = "latency_cpu_b64_ms"
ATTR_LATENCY_GPU_B1 = "latency_gpu_b1_ms"
ATTR_LATENCY_GPU_B64 = "latency_gpu_b64_ms"
ATTR_PARAMS = "n_params"
ATTR_SIZE_MB = "size_mb"
ATTR_LATENCY = "latency"
LATENCY_ATTRS = (ATTR_LATENCY_CPU_B1, ATTR_LATENCY_CPU_B64, ATTR_LATENCY_GPU_B1, ATTR_LATENCY_GPU_B64, ATTR_PARAMS,
                 ATTR_SIZE_MB)
# study user attributes
ATTR_RANKING = "ranking"
ATTR_FIRST_TRIALS = "first_trials"
ATTR_ENGINE = "engine"
ATTR_OBJECTIVES = "objectives"  # [metric, latency attribute] of a multi-objective study
ATTR_FINALISTS = "finalists"  # the finalists' re-runs and the winner chosen by their mean (autoft.study.finalists)

# the attributes of one run of a trial; a retry starts without them (see RetryStaleTrial)
RUN_BOOKKEEPING = (ATTR_WORKER, ATTR_FAIL, ATTR_INTERRUPTED)

# where a trial's configuration came from (trials.csv ``origin``)
ORIGIN_SAMPLER = "sampler"
ORIGIN_FIRST_TRIAL = "first trial"
ORIGIN_RETRY = "retry of #{n}"
ORIGIN_OOM_RETRY = "out-of-memory retry of #{n} (batch {b})"



def heartbeat_retry_of(t: FrozenTrial) -> int | None:
    """The number of the stale trial Optuna's heartbeat retried as ``t``, or None."""
    v = t.system_attrs.get(FAILED_TRIAL_SYSTEM_ATTR)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def retry_of(t: FrozenTrial) -> int | None:
    """The trial ``t`` runs again (autoft's recovery or Optuna's heartbeat retry), or None."""
    v = t.user_attrs.get(ATTR_RETRY_OF)
    if v is not None:
        try:
            return int(v)
        except (TypeError, ValueError):
            return None
    return heartbeat_retry_of(t)


def trial_origin(t: FrozenTrial) -> str:
    """Where the trial's configuration came from: ``sampler``, ``first trial`` (a recipe of the search
    space's ``first_trials``, run before the sampler) or ``retry of #N`` (an interrupted trial run again)."""
    n = retry_of(t)
    if n is not None:
        return ORIGIN_RETRY.format(n=n)
    if t.user_attrs.get(ATTR_OOM_RETRY) is not None:
        return ORIGIN_OOM_RETRY.format(n=t.user_attrs[ATTR_OOM_RETRY], b=t.user_attrs.get(ATTR_OOM_BATCH, "?"))
    return ORIGIN_FIRST_TRIAL if t.user_attrs.get(ATTR_FIRST_TRIAL) else ORIGIN_SAMPLER


def result_attrs(result, metric: str, latency=None) -> dict[str, Any]:
    """The user attributes of a trial that ran: from a core :class:`~autoft.core.TrialResult` (and the
    :class:`~autoft.core.latency.Latency` of its model, when measured)."""
    return {ATTR_METRICS: dict(result.metrics), ATTR_HISTORY: [h[metric] for h in result.history],
            ATTR_EPOCHS: int(result.epochs_run), ATTR_SECONDS: round(float(result.seconds), 3),
            **latency_attrs(latency)}


def latency_attrs(latency) -> dict[str, Any]:
    """The user attributes of a model's :class:`~autoft.core.latency.Latency` ({} for None)."""
    if latency is None:
        return {}
    names = {"n_params": ATTR_PARAMS, "size_mb": ATTR_SIZE_MB}
    return {**{names.get(k, f"latency_{k}"): v for k, v in latency.figures().items()}, ATTR_LATENCY: latency.setup()}


def metric_value(t: FrozenTrial) -> float | None:
    """The task's metric of a finished trial: its value, the first of its values in a multi-objective
    study (``FrozenTrial.value`` raises there), None when it has none."""
    values = t.values
    return float(values[0]) if values else None


def reported_attrs(rows: list[dict], metric: str, seconds: float) -> dict[str, Any]:
    """The same attributes from per-epoch reports (``{"score": v, "val_<m>": ...}`` rows, as Ray keeps them)."""
    if not rows:
        return {ATTR_EPOCHS: 0}
    last = rows[-1]
    return {ATTR_METRICS: {k[4:]: float(v) for k, v in last.items() if k.startswith("val_")},
            ATTR_HISTORY: [float(r.get(f"val_{metric}", r["score"])) for r in rows],
            ATTR_EPOCHS: len(rows), ATTR_SECONDS: round(float(seconds), 3)}


def failure_attrs(exc: BaseException | str) -> dict[str, Any]:
    """The user attributes of a trial that failed with ``exc``."""
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {ATTR_FAIL: reason[:2000]}


def config_of(t: FrozenTrial) -> dict[str, Any]:
    """The trial's recorded configuration, or {} when it has none or it is malformed."""
    cfg = t.user_attrs.get(ATTR_CONFIG)
    return cfg if isinstance(cfg, dict) else {}
