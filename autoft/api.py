"""``autoft.search``: the whole use case of ``autoft search``, for Python.

Search (Optuna or Ray Tune) → final check of the winner on the untouched test split → report files
(and, when asked, the exported winner and an MLflow record). The CLI calls this function and only
parses arguments and prints; so a search from Python leaves exactly what the command leaves::

    import autoft
    r = autoft.search("digits", n_trials=2)
    print(r.best_value, r.test_metrics)
    r.leaderboard()            # pandas DataFrame, one row per backbone
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from autoft.errors import AutoftError, ConfigError
from autoft.events import Callback, Events, SearchEnded

log = logging.getLogger(__name__)
BACKENDS = ("optuna", "ray")


class NoTrialCompleted(AutoftError):
    """Every trial of the search failed (the study and its report are kept)."""

    def __init__(self, message: str, result: "SearchResult"):
        super().__init__(message)
        self.result = result


@dataclass
class SearchResult:
    """What a search leaves: the study, the winner, its test metrics and the files written."""

    study: optuna.Study
    task: Any  # autoft.task.Task
    results_dir: Path  # results/<task>/<study>/
    storage: str  # the study's storage URL, password redacted
    best_trial: FrozenTrial | None
    test_metrics: dict[str, float] | None
    counts: dict[str, int]
    files: list[Path] = field(default_factory=list)
    export_dir: Path | None = None
    interrupted: bool = False
    budget_taken: bool = False  # nothing ran here: other processes had already taken the budget
    seconds: float = 0.0
    # how the time was spent: seconds per phase (preparing, ranking, trials, final check, report) and total
    timings: dict[str, float] = field(default_factory=dict)
    timeout: float | None = None  # the time budget (seconds), from the call or the task's budget
    timeout_mode: str = "command"  # command: the timeout bounds the whole search; trials: no new trial after it
    stopped_by_deadline: list[int] = field(default_factory=list)  # trials of this run the deadline stopped
    final_check_skipped: str | None = None  # why the final check (or the export) did not run in the time budget
    # the finalists (autoft.study.finalists): the study's ``finalists`` record when they ran, else None;
    # best_trial is then the configuration with the best mean, and the single-seed best is recorded there
    finalists: dict | None = None
    finalists_skipped: str | None = None  # why the finalists' re-runs did not run in the time budget

    @property
    def best_value(self) -> float | None:
        from autoft.study.record import metric_value

        return None if self.best_trial is None else metric_value(self.best_trial)

    @property
    def best_config(self) -> dict[str, Any] | None:
        from autoft.study.record import config_of

        return None if self.best_trial is None else config_of(self.best_trial)

    def trials(self) -> pd.DataFrame:
        """One row per trial (the columns of ``trials.csv``)."""
        from autoft.results.tables import trials_table

        return trials_table(self.study.get_trials(deepcopy=False))

    def leaderboard(self) -> pd.DataFrame:
        """One row per backbone, best first (``leaderboard.csv``)."""
        from autoft.results.tables import leaderboard
        from autoft.study.record import ATTR_RANKING

        return leaderboard(self.trials(), self.task.direction, self.study.user_attrs.get(ATTR_RANKING))

    def pareto(self) -> pd.DataFrame:
        """The Pareto set of validation metric vs model latency, fastest first (``pareto.csv``)."""
        from autoft.results.pareto import latency_column, pareto_table

        return pareto_table(self.trials(), self.task.metric, self.task.direction, latency_column(self.study))


def validate_budget_options(*, n_trials=None, timeout=None, n_jobs=None, threads=None, timeout_mode=None) -> None:
    """The command-line budget as the task file checks its own (a :class:`ConfigError` naming the option)."""
    from autoft.engines.base import TIMEOUT_MODES

    if timeout_mode is not None and timeout_mode not in TIMEOUT_MODES:
        raise ConfigError(f"unknown timeout mode '{timeout_mode}'; expected one of {', '.join(TIMEOUT_MODES)}",
                          field="--timeout-mode")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ConfigError(f"the study's trial budget must be at least 1, got {n_trials}", field="--n-trials")
    if timeout is not None and not timeout > 0:  # also rejects nan
        raise ConfigError(f"expected a number of seconds above 0, got {timeout:g}", field="--timeout")
    if n_jobs is not None and n_jobs < 1:
        raise ConfigError(f"expected at least 1 parallel trial, got {n_jobs}", field="--n-jobs")
    if threads is not None and threads < 1:
        raise ConfigError(f"expected at least 1 torch thread, got {threads}", field="--threads")


def trial_config(trial, purpose: str):
    """The trial's configuration as a TrialConfig, or None (and a warning naming the trial) when its
    ``config`` attribute does not validate (a shared study may hold one written by another version)."""
    from autoft.core.config import TrialConfig
    from autoft.study.record import ATTR_CONFIG
    from autoft.study.storage import warn_malformed

    doc = trial.user_attrs.get(ATTR_CONFIG)
    try:
        return TrialConfig(**doc)
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warn_malformed(trial.number, ATTR_CONFIG, doc, f"it does not validate ({reason[:200]}): {purpose}")
        return None


class _Ran(Callback):
    """Counts the trials that ended in this search (to tell 'nothing ran here' from 'all failed')."""

    def __init__(self):
        self.n = 0

    def on_trial_end(self, e) -> None:
        self.n += 1


def _final_check_skipped(clock, bt, task, req, export) -> str | None:
    """Why the final check (or the export) of ``bt`` does not fit in the command's time budget, or None."""
    if not clock.limited:
        return None
    fits, cost = clock.final_check_fits(bt)
    if fits:
        return None
    from autoft.study.record import ATTR_SECONDS

    what = "export" if export is not None else "final check"
    where = (f" --study-name {req.study_name}" + ("" if str(req.results_dir) == "results" else
                                                   f" --results-dir {req.results_dir}")
             + (" --storage URL" if req.storage else ""))
    later = (f"autoft export --task {task.name}{where} --trial {bt.number} --out {export}" if export is not None
             else f"autoft evaluate --task {task.name}{where} --trial {bt.number}")
    took = bt.user_attrs.get(ATTR_SECONDS)
    took = f" (the trial took {took:.0f} s)" if isinstance(took, (int, float)) and not isinstance(took, bool) else ""
    return (f"the {what} of trial #{bt.number} was skipped to keep the {clock.timeout:g} s time budget: it needs "
            f"about {cost:.0f} s{took} and {max(0.0, clock.left()):.0f} s are left. Run it later with "
            f"'{later}', or give the search more time")


def search(task, *, space: str | Path | None = None, overrides: dict[str, Any] | None = None,
           backbones: list[str] | None = None, study_name: str = "default", results_dir: str | Path = "results",
           storage: str | None = None, n_trials: int | None = None, timeout: float | None = None,
           timeout_mode: str | None = None, n_jobs: int = 1,
           pruner: str | None = None, extend: bool = False, backend: str = "optuna", address: str | None = None,
           cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, max_concurrent: int | None = None,
           device: str | None = None, rank: bool = True, final_check: bool = True,
           export: str | Path | None = None, track: str | None = None, objectives: str | list[str] | None = None,
           callbacks: list[Callback] | tuple[Callback, ...] = (), task_data=None,
           started: float | None = None, evaluate: bool = True, finalists: int | None = None,
           finalist_seeds: int | None = None, finalist_mode: str | None = None) -> SearchResult:
    """Run (or resume) a search on ``task`` (a name, a task file, or a :class:`~autoft.task.Task`).

    Mirrors ``autoft search``: ``overrides`` is ``--set`` (``{"lr": 1e-3}``), ``rank=False`` is
    ``--no-rank``, ``final_check=False`` is ``--no-final-check``; ``export`` is a folder to export the
    winner to (its refit is also the final check); ``track`` an MLflow tracking URI (default: the task
    file's ``track``); ``callbacks`` receive the search's events (:mod:`autoft.events`).

    ``timeout`` (default: the task's ``budget.timeout``) is a time budget in seconds. With
    ``timeout_mode="command"`` (default: the task's ``budget.timeout_mode``, ``command``) it bounds this
    whole call: the ranking, the trials and the final check are planned inside it; a trial still running
    near the deadline is stopped at an epoch boundary (recorded pruned, ``stopped_by: time budget``),
    the winner's final check is reserved from its own trial time, and skipped with a message
    (``final_check_skipped``) when it cannot fit. ``timeout_mode="trials"`` keeps the old meaning: no
    new trial starts after ``timeout`` seconds; a running trial and the final check run to their end.
    ``started``: the :func:`time.monotonic` at which the budget starts counting (the CLI passes the
    start of the command, so that its imports count too); default: this call.

    ``finalists`` (default: the task's ``budget.finalists``, 3; 0 turns them off): before the final check
    the best distinct completed configurations are re-run on ``finalist_seeds`` (default 3) stratified folds of
    train+validation (``finalist_mode``, default the task's ``budget.finalist_mode``: ``cv``) or, with
    ``finalist_mode="seeds"``, with that many seeds (the trial's own and more), and the winner is the one
    with the best mean (:mod:`autoft.study.finalists`; ``result.finalists``).

    ``objectives`` (default: the task's ``objectives``, else the metric alone): ``"accuracy,latency"`` runs a
    multi-objective study of the task's metric and the model's CPU latency at batch 1 (``latency_cpu_b64``,
    ``latency_gpu_b1``, ``latency_gpu_b64``: the others); its trials are not pruned (Optuna cannot), the
    final check and the export take the most accurate member of the Pareto set (``result.pareto()``).

    Raises :class:`NoTrialCompleted` when trials ran and every one failed; an interrupted search
    (Ctrl-C) returns with ``interrupted=True`` and what had finished.
    """
    t0 = time.monotonic() if started is None else started  # the time budget counts from here (imports included)
    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.core.device import resolve_device
    from autoft.engines import get_engine
    from autoft.engines.base import Execution, TimeBudget, build_request
    from autoft.results import write_report
    from autoft.results.tables import best_trial, most_common_failure, state_counts
    from autoft.study.record import ATTR_RANKING, ATTR_SURPLUS
    from autoft.study import open_storage
    from autoft.task import Task, load_task
    from autoft.tracking import make_tracker

    validate_budget_options(n_trials=n_trials, timeout=timeout, n_jobs=n_jobs, timeout_mode=timeout_mode)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}", field="--backend")
    task = task if isinstance(task, Task) else load_task(task)
    timeout = timeout if timeout is not None else task.budget.timeout
    from autoft.study.finalists import FinalistsSpec

    fspec = FinalistsSpec(task.budget.finalists if finalists is None else finalists,
                          task.budget.finalist_seeds if finalist_seeds is None else finalist_seeds,
                          finalist_mode or task.budget.finalist_mode)
    clock = (_budget_with_finalists(fspec) if fspec.enabled else TimeBudget)(
        timeout, timeout_mode or task.budget.timeout_mode, started=t0, final_check=final_check,
        export=export is not None)
    execution = Execution(device=resolve_device(device or task.device), n_jobs=n_jobs, address=address,
                          cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                          max_concurrent=max_concurrent)
    req = build_request(task, space_path=str(space) if space else None, overrides=overrides, backbones=backbones,
                        study_name=study_name, results_dir=Path(results_dir), storage=storage, n_trials=n_trials,
                        timeout=timeout, pruner=pruner, extend=extend, execution=execution, time_budget=clock,
                        objectives=objectives)
    if export is not None:  # refuse a bad target now, not after the search
        from autoft.export.export import _check_target

        _check_target(Path(export), True)
    open_storage(req.storage_url)  # a storage that cannot be opened fails now, not after the data is read
    engine = get_engine(backend)
    ran = _Ran()
    events = Events([ran, *callbacks])
    tracker = make_tracker(track or task.track, experiment=None)
    if tracker is not None:
        events.callbacks.append(tracker)
    task_data = task_data if task_data is not None else task.prepare(device=execution.device)
    clock.final_check = final_check and len(task_data.splits.test) > 0  # nothing to reserve without a test split
    cache = FeatureCache()

    interrupted = False
    clock.add("preparing", time.monotonic() - t0)
    try:
        study = engine.run(req, task_data=task_data, events=events, cache=cache, rank=None if rank else False)
    except KeyboardInterrupt:
        if backend == "ray":  # Ray Tune saved the experiment; nothing to report here
            raise
        interrupted = True
        study = engine.open(req, n_train=len(task_data.splits.train))
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    bt = best_trial(study)
    fin = None
    if bt is not None and not interrupted and fspec.enabled:
        from autoft.study.finalists import notifier, run_finalists

        t_fin = time.monotonic()  # re-run the best configurations; the winner is the best mean
        fin = run_finalists(study, task_data, fspec, cache=cache, clock=clock, single=bt,
                            notify=notifier(events.callbacks))
        if fin is not None:
            if not fin.skipped or fin.events:  # a phase of the time line only when something ran
                clock.add("finalists", time.monotonic() - t_fin)
            if fin.skipped:
                log.warning(fin.skipped)
            bt = fin.chosen
    test_metrics, export_dir, winner = None, None, None  # winner: the refit (FineTuneResult or ExportResult)
    cfg = trial_config(bt, "the final check is skipped") if bt is not None and not interrupted else None
    skipped = None
    if cfg is not None and (export is not None or (final_check and len(task_data.splits.test))):
        skipped = _final_check_skipped(clock, bt, task, req, export)
    if skipped:
        log.warning(skipped)
    elif cfg is not None:
        with clock.phase("final check"):
            if export is not None:
                from autoft.export import export_trial

                log.info("exporting trial #%d (its refit is the final check on the test split)", bt.number)
                ex = export_trial(task, export, study=study, trial=bt.number, task_data=task_data, cache=cache)
                test_metrics, export_dir, winner = ex.test_metrics or None, ex.folder, ex
            elif final_check and len(task_data.splits.test):
                log.info("final check: refitting trial #%d and scoring it once on the test split", bt.number)
                winner = fine_tune_and_score(cfg, task_data, cache=cache, test=True, return_model=True)
                test_metrics = winner.test_metrics
        if winner is not None and evaluate:
            with clock.phase("evaluation"):
                _evaluate_winner(winner, task, task_data, req.study_dir, cache, bt.number)
    with clock.phase("report"):
        rep = write_report(study, task, req.study_dir, test_metrics=test_metrics, space_file=req.space.file,
                           root=req.results_dir)
        if evaluate and winner is not None:
            try:
                from autoft.evaluation.report_html import write_study_report

                rep.files.append(write_study_report(req.study_dir, task=task))
            except Exception as exc:  # the report must never cost the user the search
                log.warning("report.html was not written: %s", exc)
    budget_taken = (bt is None and not interrupted and ran.n == 0 and counts.get("fail", 0) == 0
                    and (counts.get("running", 0) > 0 or any(t.user_attrs.get(ATTR_SURPLUS) for t in trials)))
    result = SearchResult(study=study, task=task, results_dir=req.study_dir, storage=req.shown_storage,
                          best_trial=bt, test_metrics=test_metrics, counts=counts, files=list(rep.files),
                          export_dir=export_dir, interrupted=interrupted,
                          budget_taken=budget_taken, seconds=clock.elapsed(), timings=clock.timings(),
                          timeout=timeout, timeout_mode=clock.mode,
                          stopped_by_deadline=sorted(int(k) for k in clock.stopped), final_check_skipped=skipped,
                          finalists=fin.record if fin is not None else None,
                          finalists_skipped=fin.skipped if fin is not None else None)
    events.emit(SearchEnded(task=task.name, study=req.study_name, best_number=None if bt is None else bt.number,
                            best_value=result.best_value, best_config=result.best_config,
                            counts=counts, test_metrics=test_metrics, results_dir=req.study_dir,
                            files=tuple(rep.files), ranking=tuple(study.user_attrs.get(ATTR_RANKING) or ()),
                            export_dir=export_dir, interrupted=interrupted, timings=dict(result.timings)))
    if bt is None and not interrupted and not result.budget_taken and counts.get("fail", 0):
        common = most_common_failure(trials)
        reason = f"; most common failure ({common[1]}x): {common[0]}" if common else ""
        raise NoTrialCompleted(f"every trial of study '{req.study_name}' failed{reason} (results: {req.study_dir})",
                               result)
    return result


def _budget_with_finalists(spec):
    """The command's :class:`~autoft.engines.base.TimeBudget` that also keeps the finalists' re-runs
    (estimated from the best trial so far, at most a quarter of the budget) out of the trials' time."""
    from autoft.engines.base import TimeBudget
    from autoft.study.finalists import reserve_seconds

    class FinalistsBudget(TimeBudget):
        def reserve(self, winner_seconds) -> None:
            super().reserve(winner_seconds)
            self.reserved += reserve_seconds(spec, winner_seconds, self.timeout)

    return FinalistsBudget


def _evaluate_winner(winner, task, task_data, study_dir: Path, cache, trial: int) -> None:
    """The refit winner's evaluation in ``results/<task>/<study>/evaluation/`` (per class, calibration,
    fairness by the task file's group attribute, explanations); a failure is logged, never raised."""
    try:
        from autoft.evaluation import evaluate_winner
        from autoft.evaluation.sources import task_groups

        groups, name = task_groups(task, task_data.data)  # the task file's fairness section, if any
        evaluate_winner(winner, task_data, study_dir / "evaluation", cache=cache, groups=groups,
                        group_name=name or "group", context={"study": study_dir.name, "trial": trial})
    except Exception as exc:
        log.warning("the winner's evaluation was not written: %s", exc)
