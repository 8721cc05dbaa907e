"""Run a small search from Python instead of the CLI, then look at the results table.

    AUTOFT_HOME=../shared/assets python examples/search_from_python.py

Uses the built-in `digits` task with a reduced budget (4 trials, 2 epochs, resnet20 only).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from autoft.engines.common import build_request
from autoft.engines.optuna_engine import run_study
from autoft.results import write_report
from autoft.task import load_task


def main() -> None:
    task = load_task("digits")
    out = Path(tempfile.mkdtemp(prefix="autoft-example-"))
    req = build_request(task, overrides={"backbone": ["resnet20"], "epochs": 2}, results_dir=out, n_trials=4)
    study = run_study(req)
    report = write_report(study, task, req.study_dir)
    print(f"best trial #{report.best['trial']}: validation {task.metric} {report.best['validation_score']:.4f}")
    print("config:", report.best["config"])
    print("files:", ", ".join(str(p) for p in report.files))


if __name__ == "__main__":
    main()
