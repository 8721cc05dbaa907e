"""Finalists: re-run the best configurations before choosing the winner, and choose by the mean.

A winner chosen by one run on a small validation set overstates itself: of many configurations, the
one whose single seed scored highest is partly the luckiest. After the search (Optuna or Ray: the
trials live in the Optuna study either way) the top ``k`` *distinct* completed configurations are
re-run with more seeds (``mode="seeds"``: the trial's own seed plus ``seeds - 1`` more) or on
stratified cross-validation folds of train+validation at the search's split sizes (``mode="cv"``, the
default, :func:`cv_folds`), scored on validation, and the winner is the configuration with the
best **mean** (in the task's direction). Each finalist gets its mean, standard deviation (``ddof=1``),
a 95 % **t-interval** of the mean (``mean ± t(0.975, n-1) · std / sqrt(n)``) and its per-fold (or
per-seed) scores.

* In ``seeds`` mode the trial's own seed is not re-run: its score is the trial's recorded value (the
  core is deterministic for a seed; the tests check a re-run reproduces it). Seeds are ``s, s+1, ...``
  with ``s`` the trial's seed.
* In ``cv`` mode every finalist is trained once per fold with its own seed: fold ``i`` validates on
  the ``i``-th stratified part of train+validation, as large per class as the search's validation
  split, and trains on the rest (as large as the search's training split; the test split is never
  touched). Its mean then comes from models trained on other draws of the data, scored on held-out
  parts of which only a share is the validation split it was selected on. Every fold touches the same
  examples as the search, so the frozen-prefix cache is reused.
* The winner keeps **its trial's configuration and seed**: the final check, the export and
  ``best.yaml`` are that recorded trial (``autoft train --config best.yaml`` re-runs it exactly). The
  seed does not change the expected test score; the mean only decides *which* configuration.
* A re-run that fails (NaN loss, out of memory) leaves its finalist out of the choice (its mean
  would be over fewer runs); fewer than two distinct completed configurations: nothing to choose,
  nothing runs.
* Command-mode time budget: the re-runs are planned from the finalists' own trial times, together
  with the final check of the most expensive finalist; when they do not fit, fewer finalists are
  tried (down to 2), else they are skipped with a message and the single-seed best stays the winner.

The outcome is recorded on the study (user attribute ``finalists``, :data:`ATTR_FINALISTS`), from
which :func:`chosen_trial` reads the winner (valid while the study's top-``k`` distinct configurations
are still the recorded finalists) and :mod:`autoft.results.finalists` writes ``finalists.csv``.
Nothing here imports an engine.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from autoft.study.record import ATTR_CONFIG, ATTR_FINALISTS, ATTR_SECONDS

log = logging.getLogger(__name__)

MODES = ("seeds", "cv")
# the scheme of cv_folds: recorded with the folds' seed, so that a resumed study reuses a recorded fold score
# only when the folds are the same ones (an older scheme or another seed draws other folds)
FOLD_SCHEME = "stratified, search split sizes, v2"
INTERVAL = "95 % t-interval of the mean"
RERUN_EXTRA = 0.5  # seconds per re-run beyond its trial's own time (building the model, scoring)


@dataclass(frozen=True)
class FinalistsSpec:
    """How many configurations to re-run (``k``), with how many seeds or folds, and how."""

    k: int = 3
    seeds: int = 3  # cv mode: the number of folds; seeds mode: the trial's own seed + (seeds - 1) more
    mode: str = "cv"

    def __post_init__(self):
        from autoft.errors import ConfigError

        if self.mode not in MODES:
            raise ConfigError(f"unknown finalist mode '{self.mode}'; expected one of {', '.join(MODES)}",
                              field="--finalist-mode")
        for name, v in (("--finalists", self.k), ("--finalist-seeds", self.seeds)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"expected a whole number of at least 0, got {v!r}", field=name)

    @property
    def enabled(self) -> bool:
        """Re-runs can change the choice: at least 2 finalists and (seeds) 2 seeds or (cv) 2 folds."""
        return self.k >= 2 and self.seeds >= 2

    @property
    def runs_per_finalist(self) -> int:
        """Fine-tunes per finalist (seeds mode reuses the trial's own run)."""
        return self.seeds - 1 if self.mode == "seeds" else self.seeds

    def describe(self) -> str:
        return (f"mean of {self.seeds} seeds" if self.mode == "seeds"
                else f"mean of {self.seeds} cross-validation folds of train+validation")


@dataclass(frozen=True)
class FinalistRun:
    """Progress of the finalists: one re-run started (``score`` None) or ended (``score`` or ``error``).

    Delivered to every search callback that has an ``on_finalist(event)`` method."""

    index: int  # 1-based, over all planned re-runs
    total: int
    trial: int
    backbone: str
    unfreeze: int | None
    seed: int
    fold: int | None = None
    score: float | None = None
    error: str | None = None
    seconds: float = 0.0
    metric: str = "score"

    def line(self) -> str:
        what = f"fold {self.fold + 1}" if self.fold is not None else f"seed {self.seed}"
        head = (f"finalists {self.index}/{self.total}: trial #{self.trial} ({self.backbone}, unfreeze "
                f"{self.unfreeze}) {what}")
        if self.error:
            return f"{head} failed: {self.error[:200]}"
        if self.score is None:
            return f"{head} ..."
        return f"{head}: {self.metric} {self.score:.4f} ({self.seconds:.1f} s)"


@dataclass
class FinalistsOutcome:
    chosen: FrozenTrial  # the winner (the single-seed best when nothing ran)
    single: FrozenTrial  # the single-seed best trial
    record: dict | None = None  # what was recorded on the study (None: nothing ran)
    skipped: str | None = None  # why the re-runs did not run (time budget), or None
    seconds: float = 0.0
    events: list[FinalistRun] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.chosen.number != self.single.number


# -- choosing --------------------------------------------------------------------------------------
def config_key(cfg: dict) -> str:
    """Two trials with the same key are the same configuration (the seed is not part of it)."""
    return json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True, default=str)


def _valid(t: FrozenTrial) -> bool:
    """A completed single-objective trial with a finite value and a configuration that validates (a shared study
    may hold one written by another version or process: it is never re-run, and so never a finalist)."""
    from autoft.core.config import TrialConfig

    v = t.value if t.state == TrialState.COMPLETE and len(t.values or ()) == 1 else None
    cfg = t.user_attrs.get(ATTR_CONFIG)
    if v is None or not math.isfinite(v) or not isinstance(cfg, dict):
        return False
    try:
        TrialConfig(**cfg)
    except (TypeError, ValueError):
        return False
    return True


def select_finalists(trials: list[FrozenTrial], direction: str, k: int,
                     first: FrozenTrial | None = None) -> list[FrozenTrial]:
    """The best completed trial of each of the ``k`` best distinct configurations, best first.

    ``first`` (the study's best trial) is put first, so that ties resolve as Optuna's ``best_trial`` does."""
    done = [t for t in trials if _valid(t)]
    sign = -1.0 if direction == "maximize" else 1.0
    done.sort(key=lambda t: (sign * t.value, t.number))
    if first is not None and any(t.number == first.number for t in done):
        done = [first] + [t for t in done if t.number != first.number]
    out, seen = [], set()
    for t in done:
        key = config_key(t.user_attrs[ATTR_CONFIG])
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) >= k:
            break
    return out


def summarize(scores: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1) and the 95 % t-interval of the mean of ``scores``."""
    n = len(scores)
    mean = statistics.fmean(scores)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
    from scipy.stats import t as student_t

    std = statistics.stdev(scores)
    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def choose(finalists: list[dict], direction: str) -> dict | None:
    """The finalist with the best mean (ties: the better single-seed rank); finalists with a failed run
    are left out. None when none is left."""
    ok = [f for f in finalists if not f.get("failed") and f.get("mean") is not None]
    if not ok:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(ok, key=lambda f: (sign * f["mean"], f["single_seed_rank"]))


def best_single(study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except (ValueError, RuntimeError):  # no completed trial / a multi-objective study
        return None


def chosen_trial(study) -> FrozenTrial | None:
    """The study's winner: the finalists' choice when one is recorded and still stands (the study's
    top-``k`` distinct completed configurations are the recorded finalists), else the single-seed best."""
    single = best_single(study)
    rec = study.user_attrs.get(ATTR_FINALISTS)
    if single is None or not isinstance(rec, dict):
        return single
    try:
        chosen, names, k = int(rec["chosen_trial"]), [int(f["trial"]) for f in rec["finalists"]], int(rec["k"])
        direction = str(rec["direction"])
    except (KeyError, TypeError, ValueError):
        return single
    trials = study.get_trials(deepcopy=False)
    now = [t.number for t in select_finalists(trials, direction, k, first=single)]
    if now != names:
        return single  # the study has moved on since (resumed, extended): the record is stale
    return next((t for t in trials if t.number == chosen), single)


# -- cross-validation folds ------------------------------------------------------------------------
def cv_folds(splits, labels: np.ndarray, folds: int, seed: int) -> list:
    """``folds`` stratified folds of train+validation **at the search's own split sizes**.

    In every class, fold ``i`` validates on as many examples as the search's validation split holds of
    that class and trains on the rest of the class's train+validation pool, so every fold trains on as
    many examples per class as the search's trials did (a fold that trained on more would score a
    configuration above what its refit on the training split reaches: on a few-shot task, 3 plain folds of
    20 + 20 images per class train on 27). A class's pool of ``n`` with ``v`` validation examples gives
    ``m = n // v`` disjoint validation parts; folds beyond ``m`` start another shuffle of the pool
    (repeated stratified k-fold), so any number of folds is possible. The test split is kept as it is."""
    from autoft.data.splits import Splits

    train, val = np.asarray(splits.train), np.asarray(splits.val)
    pool = np.concatenate([train, val])
    rng = np.random.default_rng(seed)
    val_of = [[] for _ in range(folds)]
    for cls in np.unique(labels[pool]):
        members = pool[labels[pool] == cls]
        v = int(np.count_nonzero(labels[val] == cls))
        if v == 0:  # no validation example of this class in the search: none in a fold either
            continue
        per_cycle = max(1, len(members) // v)
        perms = {}
        for i in range(folds):
            cycle, part = divmod(i, per_cycle)
            if cycle not in perms:
                perms[cycle] = members[rng.permutation(len(members))]
            val_of[i].append(perms[cycle][part * v:(part + 1) * v])
    out = []
    for i in range(folds):
        fold_val = np.sort(np.concatenate(val_of[i])) if val_of[i] else np.empty(0, dtype=pool.dtype)
        out.append(Splits(np.sort(np.setdiff1d(pool, fold_val)), fold_val, splits.test))
    return out


# -- the time budget -------------------------------------------------------------------------------
def rerun_seconds(t: FrozenTrial) -> float:
    """Expected seconds of one re-run of ``t`` (its own trial time, plus a little)."""
    s = t.user_attrs.get(ATTR_SECONDS)
    ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
    return (max(0.0, float(s)) if ok else 0.0) + RERUN_EXTRA


def reserve_seconds(spec: FinalistsSpec, winner_seconds, timeout: float | None, share: float = 0.25) -> float:
    """What a command-mode search keeps out of its trials' time for the finalists, from the best trial
    so far (``k`` finalists as long as it), at most ``share`` of the budget (the trials come first)."""
    if not spec.enabled or timeout is None or isinstance(winner_seconds, bool) \
            or not isinstance(winner_seconds, (int, float)) or not math.isfinite(winner_seconds):
        return 0.0
    need = spec.k * spec.runs_per_finalist * (max(0.0, float(winner_seconds)) + RERUN_EXTRA)
    return min(need, share * timeout)


def _fits(clock, finalists: list[FrozenTrial], runs: int) -> tuple[bool, float, float]:
    """Whether ``runs`` re-runs of each finalist, then the final check of the costliest, end in time."""
    need = sum(runs * rerun_seconds(t) for t in finalists)
    if clock is None or not clock.limited:
        return True, need, 0.0
    after = 0.0
    if clock.final_check or clock.export:
        after = max((clock.final_check_cost(t) or 0.0) for t in finalists)
    ok = clock.clock() + need + after + clock.TAIL_SECONDS <= clock.deadline + clock.GRACE * (clock.timeout or 0.0)
    return ok, need, after


# -- running ---------------------------------------------------------------------------------------
def run_finalists(study, task_data, spec: FinalistsSpec, *, cache=None, clock=None, single: FrozenTrial | None = None,
                  notify: Callable[[FinalistRun], None] | None = None, record: bool = True) -> FinalistsOutcome | None:
    """Re-run the finalists of ``study`` on ``task_data`` and choose the winner by the mean.

    Returns None when there is nothing to do (disabled, no completed trial, a multi-objective study,
    fewer than two distinct completed configurations). ``clock``: the command's
    :class:`~autoft.engines.base.TimeBudget` (re-runs that would not fit are skipped with a message);
    ``notify`` receives a :class:`FinalistRun` before and after every re-run; ``record`` stores the
    outcome on the study (user attribute ``finalists``)."""
    from autoft.core import fine_tune_and_score
    from autoft.core.config import TrialConfig

    single = single if single is not None else best_single(study)
    if not spec.enabled or single is None or len(study.directions) != 1:
        return None
    direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
    trials = study.get_trials(deepcopy=False)
    finalists = select_finalists(trials, direction, spec.k, first=single)
    if len(finalists) < 2:
        log.info("finalists: fewer than 2 distinct completed configurations, nothing to choose between")
        return None
    runs = spec.runs_per_finalist
    fits, need, after = _fits(clock, finalists, runs)
    while not fits and len(finalists) > 2:
        finalists = finalists[:-1]
        fits, need, after = _fits(clock, finalists, runs)
    if not fits:
        left = max(0.0, clock.left())
        msg = (f"the finalists' re-runs ({runs} run{'s' if runs != 1 else ''} of each of trials "
               + ", ".join(f"#{t.number}" for t in finalists)
               + f") were skipped to keep the {clock.timeout:g} s time budget: they need about {need:.0f} s "
               f"(and the final check {after:.0f} s) and {left:.0f} s are left; the winner is the single-seed "
               "best. Give the search more time, or turn them off with --finalists 0")
        return FinalistsOutcome(chosen=single, single=single, skipped=msg)

    t_start = time.monotonic()
    previous = study.user_attrs.get(ATTR_FINALISTS)
    fold_seed = _seed_of(single) if spec.mode == "cv" else None
    reuse = _previous_scores(previous, spec, fold_seed)
    total = len(finalists) * runs
    metric = task_data.metric
    folds = cv_folds(task_data.splits, np.asarray(task_data.data.labels), spec.seeds, fold_seed) \
        if spec.mode == "cv" else None
    events, rows, index = [], [], 0
    for rank, t in enumerate(finalists, 1):
        cfg = TrialConfig(**t.user_attrs[ATTR_CONFIG])
        base = cfg.seed
        if spec.mode == "seeds":
            plan = [(base + i, None) for i in range(spec.seeds)]
        else:
            plan = [(base, i) for i in range(spec.seeds)]
        scores, source, failed = [], [], None
        for seed, fold in plan:
            if spec.mode == "seeds" and seed == base:
                scores.append(float(t.value))  # the trial itself: its recorded score
                source.append("trial")
                continue
            index += 1
            key = (t.number, seed, fold)
            info = {"index": index, "total": total, "trial": t.number, "backbone": cfg.backbone,
                    "unfreeze": cfg.unfreeze, "seed": seed, "fold": fold, "metric": metric}
            if key in reuse:
                scores.append(reuse[key])
                source.append("recorded")
                ev = FinalistRun(**info, score=reuse[key])
                events.append(ev)
                _emit(notify, ev)
                continue
            if clock is not None and clock.limited:  # what is left of the plan must still fit
                rest = [(r, tt) for r, tt in enumerate(finalists, 1) if r >= rank]
                left_runs = sum(rerun_seconds(tt) * (runs if r > rank else 1) for r, tt in rest)
                if clock.clock() + left_runs + after + clock.TAIL_SECONDS > \
                        clock.deadline + clock.GRACE * (clock.timeout or 0.0):
                    msg = (f"the finalists' re-runs stopped after {index - 1} of {total} to keep the "
                           f"{clock.timeout:g} s time budget (they ran longer than their trials); the winner "
                           "is the single-seed best")
                    return FinalistsOutcome(chosen=single, single=single, skipped=msg,
                                            seconds=time.monotonic() - t_start, events=events)
            _emit(notify, FinalistRun(**info))
            run_cfg = cfg.model_copy(update={"seed": seed})
            td = task_data if fold is None else replace(task_data, splits=folds[fold])
            t0 = time.monotonic()
            try:
                res = fine_tune_and_score(run_cfg, td, cache=cache)
                score, err = float(res.score), None
                if not math.isfinite(score):
                    err = f"non-finite score {score}"
            except Exception as exc:  # one finalist's failure leaves it out of the choice, nothing more
                score, err = None, f"{type(exc).__name__}: {exc}"
            ev = FinalistRun(**info, score=score if err is None else None, error=err,
                             seconds=time.monotonic() - t0)
            events.append(ev)
            _emit(notify, ev)
            log.info(ev.line())
            if err is not None:
                failed = failed or err[:500]
                continue
            scores.append(score)
            source.append("re-run")
        row = {"trial": t.number, "single_seed_rank": rank, "single_seed_score": float(t.value),
               "backbone": cfg.backbone, "unfreeze": cfg.unfreeze, "config_seed": base,
               "seeds": [s for s, _ in plan], "folds": None if spec.mode == "seeds" else [f for _, f in plan],
               "scores": scores, "source": source, "failed": failed}
        row.update(summarize(scores) if scores and not failed else
                   {"n": len(scores), "mean": None, "std": None, "ci95_low": None, "ci95_high": None})
        rows.append(row)
    best = choose(rows, direction)
    chosen_number = best["trial"] if best is not None else single.number
    chosen = next(t for t in finalists if t.number == chosen_number)
    seconds = time.monotonic() - t_start
    rec = {"mode": spec.mode, "k": spec.k, "seeds": spec.seeds, "chosen_by": spec.describe(),
           **({"fold_scheme": FOLD_SCHEME, "fold_seed": fold_seed} if spec.mode == "cv" else {}),
           "interval": INTERVAL, "metric": metric, "direction": direction,
           "single_seed_trial": single.number, "chosen_trial": chosen.number,
           "changed": chosen.number != single.number, "winner_seed": "the chosen trial's own seed",
           "seconds": round(seconds, 3), "finalists": rows}
    if best is None:
        rec["note"] = "every finalist had a failed re-run: the single-seed best stays the winner"
    if record:
        study.set_user_attr(ATTR_FINALISTS, rec)
    log.info("finalists: trial #%d chosen by the %s (single-seed best: #%d)%s", chosen.number,
             spec.describe(), single.number, " - the choice changed" if rec["changed"] else "")
    return FinalistsOutcome(chosen=chosen, single=single, record=rec, seconds=seconds, events=events)


def _seed_of(t: FrozenTrial) -> int:
    s = t.user_attrs[ATTR_CONFIG].get("seed", 0)
    return int(s) if isinstance(s, int) and not isinstance(s, bool) else 0


def _previous_scores(rec, spec: FinalistsSpec, fold_seed: int | None = None) -> dict:
    """Scores of re-runs recorded by an earlier run of the same finalists settings (a resumed study):
    ``(trial, seed, fold) -> score``; they are used instead of running again. Fold scores count only when
    the recorded folds are the same ones (:data:`FOLD_SCHEME` and the folds' seed)."""
    out = {}
    if not isinstance(rec, dict) or rec.get("mode") != spec.mode or rec.get("seeds") != spec.seeds:
        return out
    if spec.mode == "cv" and (rec.get("fold_scheme") != FOLD_SCHEME or rec.get("fold_seed") != fold_seed):
        return out
    for f in rec.get("finalists") or []:
        try:
            if f.get("failed"):
                continue
            folds = f.get("folds") or [None] * len(f["seeds"])
            if len(f["scores"]) != len(f["seeds"]):
                continue
            for seed, fold, score, src in zip(f["seeds"], folds, f["scores"], f["source"]):
                if src != "trial":  # the trial's own score is read from the trial, never from here
                    out[(int(f["trial"]), int(seed), fold)] = float(score)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _emit(notify, event: FinalistRun) -> None:
    if notify is None:
        return
    try:
        notify(event)
    except Exception as exc:  # progress must never cost the user the search
        log.debug("finalists progress callback failed: %s", exc)


def notifier(callbacks) -> Callable[[FinalistRun], None]:
    """Deliver a :class:`FinalistRun` to every callback with an ``on_finalist`` method."""

    def notify(event: FinalistRun) -> None:
        for cb in callbacks:
            fn = getattr(cb, "on_finalist", None)
            if fn is not None:
                try:
                    fn(event)
                except Exception as exc:
                    log.debug("callback %s.on_finalist failed: %s", type(cb).__name__, exc)

    return notify
