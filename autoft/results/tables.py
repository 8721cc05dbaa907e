"""Trials as a pandas table, the per-backbone leaderboard, and ``best.yaml``."""
from __future__ import annotations

import os
import secrets
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from autoft.study.record import (ATTR_CONFIG, ATTR_EPOCHS, ATTR_FAIL, ATTR_METRICS, ATTR_RANKING,  # noqa: F401
                                 ATTR_SECONDS, ATTR_SURPLUS, LATENCY_ATTRS, metric_value, trial_origin)
from autoft.study.storage import warn_malformed

# the documented columns of trials.csv, in order (config and metric columns follow)
BASE_COLUMNS = ["number", "state", "score", "backbone", "unfreeze", "epochs_run", "seconds", "fail_reason",
                "datetime_start", "origin"]
# then a completed trial's model (autoft.core.latency): CPU latency at batch 1 and 64 (ms), parameters, MB;
# the GPU latencies follow them when a trial has one
LATENCY_COLUMNS = ["latency_cpu_b1_ms", "latency_cpu_b64_ms", "n_params", "size_mb"]
GPU_LATENCY_COLUMNS = ["latency_gpu_b1_ms", "latency_gpu_b64_ms"]


def mapping_attr(t: FrozenTrial, name: str) -> dict:
    """The trial's user attribute ``name`` if it is a mapping; {} (and a warning) if it is something else."""
    value = t.user_attrs.get(name)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    warn_malformed(t.number, name, value, "left out of the tables")
    return {}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def clean_ranking(recorded) -> list[dict] | None:
    """The study's ``ranking`` attribute if it is a list of backbone scores; None (and a warning) if it is
    malformed (written by another process of a shared study): the ranking is then not used."""
    from dataclasses import fields

    from autoft.rank import BackboneScore

    names = {f.name for f in fields(BackboneScore)}

    def ok(d) -> bool:
        return (isinstance(d, dict) and set(d) <= names and isinstance(d.get("backbone"), str)
                and all(d.get(k) is None or _number(d[k]) for k in ("logme", "knn"))
                and all(_number(d[k]) for k in ("seconds", "feature_seconds", "examples", "feature_dim") if k in d)
                and (d.get("error") is None or isinstance(d["error"], str)))

    if isinstance(recorded, list) and all(ok(d) for d in recorded):
        return recorded
    warn_malformed(None, ATTR_RANKING, recorded, "the ranking is not used")
    return None


def trial_row(t: FrozenTrial) -> dict:
    cfg = mapping_attr(t, ATTR_CONFIG)
    metrics = mapping_attr(t, ATTR_METRICS)
    row = {
        "number": t.number,
        "state": t.state.name.lower(),
        "score": metric_value(t) if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
        "backbone": cfg.get("backbone", t.params.get("backbone")),
        "unfreeze": cfg.get("unfreeze", t.params.get("unfreeze")),
        "epochs_run": t.user_attrs.get(ATTR_EPOCHS, len(t.intermediate_values)),
        "seconds": t.user_attrs.get(ATTR_SECONDS, t.duration.total_seconds() if t.duration else None),
        "fail_reason": t.user_attrs.get(ATTR_FAIL, "") if t.state == TrialState.FAIL else "",
        "datetime_start": t.datetime_start,
        "origin": trial_origin(t),
    }
    for k in LATENCY_ATTRS:
        v = t.user_attrs.get(k)
        row[k] = v if _number(v) else None
    for k, v in cfg.items():
        if k not in ("backbone", "unfreeze"):
            row[f"cfg_{k}"] = v
    for k, v in metrics.items():
        row[f"val_{k}"] = v
    return row


def trials_table(trials: list[FrozenTrial]) -> pd.DataFrame:
    rows = [trial_row(t) for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get(ATTR_SURPLUS)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=BASE_COLUMNS + LATENCY_COLUMNS)
    df["n_params"] = pd.array([None if pd.isna(v) else int(v) for v in df["n_params"]], dtype="Int64")
    gpu = [c for c in GPU_LATENCY_COLUMNS if df[c].notna().any()]
    df = df.drop(columns=[c for c in GPU_LATENCY_COLUMNS if c not in gpu])
    first = BASE_COLUMNS + LATENCY_COLUMNS + gpu
    return df[first + [c for c in df.columns if c not in first]]


def leaderboard(df: pd.DataFrame, direction: str = "maximize", ranking: list[dict] | None = None) -> pd.DataFrame:
    """One row per backbone: trials by state, best and median score of completed trials.

    ``ranking`` (the study's user attribute ``ranking``: the LogME ranking made before the search)
    adds the columns ``logme`` and ``logme_rank`` (1 = ranked best), to set the advisory verdict
    beside what fine-tuning found."""
    if df.empty:
        return pd.DataFrame(columns=["backbone", "trials", "complete", "pruned", "fail", "best_score",
                                     "median_score", "best_trial"])
    rows = []
    for bb, g in df.groupby("backbone", dropna=False):
        done = g[g.state == "complete"]
        best = None
        if not done.empty:
            best = done.loc[done.score.idxmax() if direction == "maximize" else done.score.idxmin()]
        rows.append({"backbone": bb, "trials": len(g), "complete": len(done),
                     "pruned": int((g.state == "pruned").sum()), "fail": int((g.state == "fail").sum()),
                     "best_score": None if best is None else best.score,
                     "median_score": None if done.empty else done.score.median(),
                     "best_trial": None if best is None else int(best.number),
                     "best_unfreeze": None if best is None else best.unfreeze})
    lb = pd.DataFrame(rows)
    ranking = clean_ranking(ranking) if ranking else None
    for col in ("best_trial", "best_unfreeze"):  # integers, blank for a backbone with no completed trial
        lb[col] = pd.array([None if pd.isna(v) else int(v) for v in lb[col]], dtype="Int64")
    if ranking:
        scored = sorted((r for r in ranking if r.get("logme") is not None), key=lambda r: -r["logme"])
        logme = {r["backbone"]: r["logme"] for r in scored}
        place = {r["backbone"]: i + 1 for i, r in enumerate(scored)}
        lb["logme"] = [logme.get(b) for b in lb.backbone]
        lb["logme_rank"] = pd.array([place.get(b) for b in lb.backbone], dtype="Int64")
    return lb.sort_values("best_score", ascending=direction != "maximize", na_position="last").reset_index(drop=True)


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    c = Counter(t.state.name.lower() for t in trials if not t.user_attrs.get(ATTR_SURPLUS))
    return {s: c.get(s, 0) for s in ("complete", "pruned", "fail", "running")}


def most_common_failure(trials: list[FrozenTrial]) -> tuple[str, int] | None:
    reasons = Counter(_short_reason(t.user_attrs.get(ATTR_FAIL, "unknown reason"))
                      for t in trials if t.state == TrialState.FAIL)
    return reasons.most_common(1)[0] if reasons else None


def _short_reason(reason: str, limit: int = 300) -> str:
    """The first line of a failure reason, at most ``limit`` characters, cut at a word boundary ("…" marks a cut)."""
    line = reason.split("\n")[0]
    if len(line) <= limit:
        return line
    head = line[:limit - 2]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + " …"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's winner, or None: the finalists' choice when one is recorded and still stands
    (:func:`autoft.study.finalists.chosen_trial`), else the best completed trial. In a multi-objective
    study (the metric and a latency, ``--objectives``) where Optuna has no single best trial: the most accurate member of the Pareto set
    (ties: the faster one, then the earlier one), which the final check and the export use by default."""
    if len(study.directions) > 1:
        front = study.best_trials  # the non-dominated completed trials
        if not front:
            return None
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        return min(front, key=lambda t: (sign * t.values[0], t.values[1], t.number))
    from autoft.study.finalists import chosen_trial

    # the finalists' choice (re-run on folds or seeds, chosen by mean) when the study records one that still stands
    return chosen_trial(study)


def best_document(study: optuna.Study, task, trial: FrozenTrial | None = None, test_metrics: dict | None = None,
                  space_file: str | None = None) -> dict:
    t = trial or study.best_trial
    counts = state_counts(study.get_trials(deepcopy=False))
    doc = {
        "task": task.name,
        "task_file": str(task.file) if task.file else None,
        "study": study.study_name,
        "trial": t.number,
        "metric": task.metric,
        "direction": task.direction,
        "validation_score": metric_value(t),
        "config": t.user_attrs.get(ATTR_CONFIG),
        "validation_metrics": t.user_attrs.get(ATTR_METRICS),
        "epochs_run": t.user_attrs.get(ATTR_EPOCHS),
        "seconds": t.user_attrs.get(ATTR_SECONDS),
        "search": {"trials": sum(counts.values()), **counts, "search_space": space_file},
    }
    model = {k: t.user_attrs[k] for k in LATENCY_ATTRS if _number(t.user_attrs.get(k))}
    if model:  # the model's latency (ms) and size (autoft.core.latency)
        doc["model"] = model
    if len(study.directions) > 1:  # chosen as the most accurate member of the Pareto set
        from autoft.study.record import ATTR_OBJECTIVES

        doc["objectives"] = study.user_attrs.get(ATTR_OBJECTIVES)
        doc["chosen_as"] = "the most accurate member of the Pareto set (pareto.csv)"
    if test_metrics is not None:
        doc["test_metrics"] = test_metrics
    return doc


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    The temporary name is unique (several workers may write the same file) and created here, new
    (``O_EXCL``): a link planted under a guessable name in a results folder from elsewhere is never
    written through; the rename replaces a link at ``path`` itself, not what it points to.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_yaml(path: Path, doc: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(_plain(doc), sort_keys=False), encoding="utf-8")


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x
