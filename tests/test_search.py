"""The Optuna study: pruning stops epochs, failures do not stop the study, results files, resume."""
from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
import yaml

from autoft.cli import main
from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
from autoft.engines.common import build_request
from autoft.engines.optuna_engine import make_objective, run_study
from autoft.results import write_report
from autoft.results.tables import BASE_COLUMNS
from autoft.task import load_task

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits")
    return task, task.prepare()


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


def _req(task, tmp_path, **kw):
    ov = {"epochs": 3, "backbone": ["resnet20"], "unfreeze": 0, **kw.pop("overrides", {})}
    return build_request(task, overrides=ov, results_dir=tmp_path, **kw)


def test_pruned_trial_stops_training_early(digits, cache, tmp_path):
    task, td = digits
    req = _req(task, tmp_path)
    # a pruner that prunes every trial at its first report: training must stop after epoch 1 of 3
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.optimize(make_objective(req, td, cache), n_trials=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    for t in trials:
        assert t.user_attrs["epochs_run"] == 1 and t.user_attrs["config"]["epochs"] == 3
        assert list(t.intermediate_values) == [1]


def test_failed_trials_do_not_stop_the_study(digits, cache, tmp_path):
    task, td = digits
    req = _req(task, tmp_path, overrides={"optimizer": "sgd", "head": "linear"}, n_trials=3)
    study = optuna.create_study(study_name=req.study_name, storage=req.storage_url, direction="maximize")
    # the first trial diverges (NaN loss) and must be recorded as failed with its reason
    study.enqueue_trial({"lr": 1e6, "head_lr_mult": 30.0})
    study = run_study(req, task_data=td, cache=cache)
    states = [t.state.name for t in study.trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2, states
    assert "loss became" in study.trials[0].user_attrs["fail_reason"]
    rep = write_report(study, task, req.study_dir, plots=False)
    df = pd.read_csv(req.study_dir / "trials.csv")
    assert df.loc[df.number == 0, "fail_reason"].str.contains("TrialFailed: loss became").all()
    assert rep.best["trial"] in (1, 2)


def test_results_files_and_best_yaml_reruns_to_same_score(digits, cache, tmp_path):
    task, td = digits
    req = _req(task, tmp_path, overrides={"unfreeze": 1, "epochs": 2}, n_trials=3)
    study = run_study(req, task_data=td, cache=cache)
    rep = write_report(study, task, req.study_dir)
    folder = req.study_dir
    df = pd.read_csv(folder / "trials.csv")
    assert list(df.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert {"cfg_lr", "cfg_head", "cfg_optimizer", "val_accuracy", "val_f1_macro", "val_precision_macro",
            "val_recall_macro"} <= set(df.columns)
    assert len(df) == 3 and set(df.state) <= {"complete", "pruned", "fail"}
    lb = pd.read_csv(folder / "leaderboard.csv")
    assert list(lb.backbone) == ["resnet20"] and lb.trials[0] == 3
    for png in ("history.png", "backbones.png", "learning_curves.png"):
        assert (folder / "plots" / png).stat().st_size > 1000
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["config"]["backbone"] == "resnet20" and best["metric"] == "accuracy"
    assert best["trial"] == rep.best["trial"]
    rerun = fine_tune_and_score(TrialConfig(**best["config"]), td)  # fresh cache: nothing shared
    assert math.isclose(rerun.score, best["validation_score"], abs_tol=1e-6)


def test_cli_search_resumes_and_reports(tmp_path, capsys):
    args = ["search", "--task", "digits", "--results-dir", str(tmp_path), "--backbones", "resnet20",
            "--set", "epochs=1", "--set", "unfreeze=0", "--pruner", "none"]
    assert main(args + ["--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "test (held out, scored once)" in out
    first = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert main(args + ["--n-trials", "3"]) == 0  # same study, budget raised: one more trial
    assert "resuming: 2 finished trial(s)" in capsys.readouterr().out
    second = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert list(second.number) == [0, 1, 2]
    pd.testing.assert_frame_equal(first[["number", "score", "cfg_lr"]], second[["number", "score", "cfg_lr"]].head(2))
    best = yaml.safe_load((tmp_path / "digits" / "default" / "best.yaml").read_text())
    assert 0 < best["test_metrics"]["accuracy"] <= 1
    assert main(args + ["--n-trials", "3"]) == 0  # budget reached: nothing re-run
    assert len(pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")) == 3
    assert main(["show", "--task", "digits", "--results-dir", str(tmp_path)]) == 0
    assert "Leaderboard" in capsys.readouterr().out


def test_cli_bad_input_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodality: image\ndata: {source: digits}\nbudget: {n_trials: 0}\n")
    assert main(["search", "--task", str(bad), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "budget.n_trials" in err and "Traceback" not in err
