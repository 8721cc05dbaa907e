"""Write everything a finished (or interrupted) study leaves in ``results/<task>/<study>/``.

* ``trials.csv`` — one row per trial: number, state, score, backbone, unfreeze, epochs_run,
  seconds, fail_reason, datetime_start, origin, then ``cfg_*`` (the full config) and ``val_*`` (metrics);
* ``leaderboard.csv`` — one row per backbone (with its LogME score and rank when the study was ranked);
* ``best.yaml`` — the winning configuration, its validation metrics and (after the final check)
  its test metrics; with finalists, the winner is the configuration with the best mean and its
  ``finalists`` section says by how much;
* ``finalists.csv`` — the finalists' per-seed scores, means and 95 % t-intervals (autoft.results.finalists);
* ``plots/*.png`` — optimisation history, best score per backbone, learning curves, importances;
* ``pareto.csv`` and ``plots/pareto.png`` — the Pareto set of validation metric vs model latency
  (:mod:`autoft.results.pareto`), when completed trials have a recorded latency;
* ``report.md`` — the winner, the leaderboard and the Pareto set, in Markdown.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autoft.study.record import ATTR_RANKING
from autoft.results.finalists import current_record, finalists_section, write_finalists
from autoft.results.pareto import latency_column, markdown_table, pareto_plot, pareto_section, pareto_table
from autoft.results.plots import write_plots
from autoft.results.tables import (atomic_path, best_document, best_trial, leaderboard, trials_table,
                                   write_yaml)
from autoft.study.finalists import chosen_trial

log = logging.getLogger(__name__)


@dataclass
class Report:
    folder: Path
    files: list[Path] = field(default_factory=list)
    best: dict | None = None
    pareto: Any = None  # the Pareto set (pandas DataFrame, pareto.csv), None when no trial has a latency


def write_report(study: optuna.Study, task, folder: Path, *, test_metrics: dict | None = None,
                 space_file: str | None = None, plots: bool = True, root: Path | None = None) -> Report:
    """Write the result files of ``study`` to ``folder``.  ``root``: the results folder; the resolved
    ``folder`` and ``folder/plots`` must lie under it (a symbolic link in a results folder received from
    elsewhere never leads the writes out of it)."""
    if root is not None:
        from autoft.study import ensure_inside

        for path in (folder, folder / "plots"):
            ensure_inside(path, root, "--study-name")
    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    df = trials_table(trials)
    rep = Report(folder)
    _write_csv(df, folder / "trials.csv")
    lb = leaderboard(df, task.direction, study.user_attrs.get(ATTR_RANKING))
    _write_csv(lb, folder / "leaderboard.csv")
    rep.files += [folder / "trials.csv", folder / "leaderboard.csv"]
    # the finalists' choice (best mean) when it stands, else the single-seed best; a multi-objective study
    # (no finalists): the most accurate member of its Pareto set
    bt = chosen_trial(study) or best_trial(study)
    if bt is not None:
        if test_metrics is None and (folder / "best.yaml").is_file():
            test_metrics = _previous_test_metrics(folder / "best.yaml", bt.number)
        rep.best = best_document(study, task, bt, test_metrics, space_file)
        fin = current_record(study)
        if fin is not None:
            rep.best["finalists"] = finalists_section(fin)
        write_yaml(folder / "best.yaml", rep.best)
        rep.files.append(folder / "best.yaml")
    rep.files += [p for p in [write_finalists(study, folder)] if p is not None]
    if plots and not df.empty:
        try:
            rep.files += write_plots(study, df, lb, task.metric, task.direction, folder / "plots")
        except Exception as exc:  # a plot must never cost the user their results
            log.warning("could not draw plots: %s", exc)
    try:
        rep.files += _write_pareto(study, task, folder, df, lb, rep, plots)
    except Exception as exc:  # the Pareto set and report.md must never cost the user their results
        log.warning("could not write pareto.csv / report.md: %s", exc)
    return rep


def _write_pareto(study: optuna.Study, task, folder: Path, df, lb, rep: Report, plots: bool) -> list[Path]:
    """``pareto.csv``, ``plots/pareto.png`` (when completed trials have a latency) and ``report.md``."""
    files = []
    latency = latency_column(study)
    front = pareto_table(df, task.metric, task.direction, latency)
    if not front.empty:
        rep.pareto = front
        _write_csv(front, folder / "pareto.csv")
        files.append(folder / "pareto.csv")
        if plots:
            try:
                files.append(pareto_plot(df, front, task.metric, latency, folder / "plots" / "pareto.png"))
            except Exception as exc:  # a plot must never cost the user their results
                log.warning("could not draw pareto.png: %s", exc)
    md = [f"# {task.name} · study {study.study_name}", ""]
    counts = df.state.value_counts().to_dict() if not df.empty else {}
    md += [f"{len(df)} trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "pruned", "fail")), ""]
    if rep.best is not None:
        b = rep.best
        cfg = b.get("config") or {}
        test = (b.get("test_metrics") or {}).get(task.metric)
        val = b.get("validation_score")
        md += [f"**Winner: trial #{b['trial']}** ({cfg.get('backbone')}, unfreeze {cfg.get('unfreeze')}"
               f"{', the most accurate member of the Pareto set' if b.get('chosen_as') else ''}): validation "
               f"{task.metric} {val if val is None else format(val, '.4f')}"
               + (f", test {test:.4f}" if isinstance(test, (int, float)) else "")
               + (f"; CPU latency {b['model']['latency_cpu_b1_ms']:.2f} ms at batch 1"
                  if "latency_cpu_b1_ms" in (b.get("model") or {}) else ""), ""]
    if not lb.empty:
        md += ["## Leaderboard", ""] + markdown_table(lb) + [""]
    md += pareto_section(rep.pareto if rep.pareto is not None else front, task.metric, latency,
                         len(study.directions) > 1, task.name, study.study_name)
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
    files.append(folder / "report.md")
    return files


def _write_csv(df, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _previous_test_metrics(path: Path, trial: int) -> dict | None:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
        return doc.get("test_metrics") if doc.get("trial") == trial else None
    except Exception:
        return None
