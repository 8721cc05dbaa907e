"""The Optuna study: pruning stops epochs, failures do not stop the study, results files, resume."""
from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
import yaml

from autoft.cli import main
from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
from autoft.engines.base import build_request
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
    assert "logme" not in lb.columns  # one backbone: nothing was ranked
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
    # not a terminal: one plain progress line per trial instead of the live bar
    # trial 0 runs the search space's first_trials recipe, the next one the sampler's choice
    assert "trial 0 complete (first trial: a first_trials recipe of the search space): accuracy " in out and "1/2 done" in out \
        and "trial 1 complete: accuracy " in out and "2/2 done" in out \
        and "after 1 epoch (resnet20, unfreeze 0 stages)" in out
    first = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert list(first.origin) == ["first trial", "sampler"]
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
    out = capsys.readouterr().out
    # not a terminal: wide enough that no column is cut short ("res…") and lines are not wrapped
    assert "Leaderboard" in out and "best_unfreeze" in out and "resnet20" in out and "…" not in out


def test_cli_bad_input_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodality: image\ndata: {source: digits}\nbudget: {n_trials: 0}\n")
    assert main(["search", "--task", str(bad), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "budget.n_trials" in err and "Traceback" not in err


def _sampled(sampler, space, n: int = 24) -> list[dict]:
    """Params of ``n`` trials of a study with Hyperband pruning and a deterministic objective."""
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name="same",  # Hyperband's brackets hash it
                                pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3))

    def objective(trial):
        cfg = space.sample(trial, {"seed": 0, "epochs": 9})
        x = -abs(math.log10(cfg.lr) + 2.5) - 0.01 * cfg.unfreeze + (0.2 if cfg.head == "mlp" else 0.0)
        for step in range(1, 10):
            trial.report(x + 0.05 * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x + 0.45

    study.optimize(objective, n_trials=n)
    return [t.params for t in study.trials]


def test_tpe_reading_once_per_trial_samples_what_optuna_tpe_samples():
    # our TPESampler hands TPE the study instead of Hyperband's per-suggestion bracket view (to save
    # a read of the whole study per suggestion); the values sampled must not change
    from autoft.engines.optuna_engine import TPESampler

    class Counting(TPESampler):
        views = 0

        def _study(self, study):
            Counting.views += study is not TPESampler._study(study)
            return TPESampler._study(study)

    space = build_request(load_task("digits")).space
    kw = dict(seed=3, n_startup_trials=8, multivariate=True, group=True)
    ours = _sampled(Counting(**kw), space)
    assert Counting.views > 24  # the bracket views were there, and replaced
    theirs = _sampled(optuna.samplers.TPESampler(**kw), space)
    assert len(ours) == 24 and ours == theirs
    assert len({round(p["lr"], 12) for p in ours}) == 24  # really sampled (not one repeated value)


def test_first_pruning_waits_for_enough_training():
    from autoft.engines.pruners import first_rung

    assert first_rung(1437, 3) == 1  # digits: one epoch is ~1,400 examples
    assert first_rung(200, 10) == 5  # few-shot: 5 epochs of 200 examples
    assert first_rung(200, 4) == 2 and first_rung(200, 1) == 1  # never past half of the epochs, never 0
    assert first_rung(0, 3) == 1


def test_fewshot_search_prunes_no_trial_before_the_first_rung(tmp_path):
    task = load_task("digits-fewshot")
    req = build_request(task, overrides={"epochs": 4, "backbone": ["resnet20"], "unfreeze": 0, "lr": 1e-3},
                        results_dir=tmp_path, n_trials=12)
    study = run_study(req, cache=FeatureCache(disk=False), rank=False)
    assert study.pruner._min_resource == 2  # 4 epochs of 200 examples: first decision after epoch 2
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") >= 1, states  # the pruner did act ...
    assert all(len(t.intermediate_values) >= 2 for t in study.trials), \
        [len(t.intermediate_values) for t in study.trials]  # ... but never after epoch 1


def test_progress_counts_a_retried_trial_once(capsys):
    """A failed trial run again in the same search (a stale trial retried) counts once, through its
    retry, as the study's budget does: the progress reads 8/8 done, not 9/8."""
    from rich.console import Console

    from autoft.console import SearchProgress
    from autoft.events import SearchStarted, TrialEnded

    view = SearchProgress(Console(width=300, highlight=False))
    view.on_search_start(SearchStarted(task="t", study="s", engine="optuna", budget=8, metric="accuracy",
                                       direction="maximize", storage="sqlite://", backbones=("resnet20",),
                                       device="cpu"))
    cfg = {"backbone": "resnet20", "unfreeze": 0}
    for n in range(9):
        state, origin = ("fail", "sampler") if n == 3 else ("complete", "retry of #3" if n == 4 else "sampler")
        view.on_trial_end(TrialEnded(key=str(n), state=state, value=None if state == "fail" else 0.5, config=cfg,
                                     epochs=1, number=n, origin=origin))
    view.close()
    out = capsys.readouterr().out
    assert "trial 4 complete (retry of #3)" in out and "4/8 done" in out  # #3 failed, #4 ran it again
    assert "8/8 done" in out and "9/8 done" not in out, out
