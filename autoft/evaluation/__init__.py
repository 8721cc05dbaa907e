"""Evaluation of a trained model: per-class results, calibration, fairness across groups,
explanations, an HTML report per study, and suites of tasks.

* :func:`evaluate_winner` — a trained model (``fine_tune_and_score(..., return_model=True)``) on a
  split of its task, written to a folder (what the search's final check calls);
* :func:`evaluate_trial` / :func:`evaluate_export` — a trial of a study (refit) or an exported folder,
  on a split of the task or on a new labelled file or folder (``autoft evaluate``);
* :func:`write_study_report` — one self-contained HTML page per study;
* :func:`run_suite` — many tasks, one backbone x task table (``autoft suite``).

Heavy imports happen on first use, so ``import autoft.evaluation`` stays light.
"""
from __future__ import annotations

_EXPORTS = {
    "Evaluation": "autoft.evaluation.evaluate",
    "evaluate_predictions": "autoft.evaluation.evaluate",
    "evaluate_winner": "autoft.evaluation.evaluate",
    "split_logits": "autoft.evaluation.evaluate",
    "evaluate_trial": "autoft.evaluation.sources",
    "evaluate_export": "autoft.evaluation.sources",
    "resolve_groups": "autoft.evaluation.sources",
    "Calibration": "autoft.evaluation.calibration",
    "fit_calibration": "autoft.evaluation.calibration",
    "group_fairness": "autoft.evaluation.fairness",
    "write_study_report": "autoft.evaluation.report_html",
    "write_html_report": "autoft.evaluation.report_html",
    "run_suite": "autoft.evaluation.suite",
    "load_suite": "autoft.evaluation.suite",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autoft.evaluation' has no attribute {name!r}")
