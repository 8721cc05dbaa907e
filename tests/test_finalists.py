"""Finalists: the top-k distinct configurations are re-run over seeds (or folds) before the winner is
chosen by the mean (autoft.study.finalists), recorded on the study and written to finalists.csv."""
from __future__ import annotations

import math
import statistics

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState, create_trial
from scipy.stats import t as student_t

import autoft
from autoft.cli import main
from autoft.core import FeatureCache, fine_tune_and_score
from autoft.core.config import TrialConfig
from autoft.engines.base import TimeBudget
from autoft.results import write_report
from autoft.study.finalists import (FinalistsSpec, chosen_trial, config_key, cv_folds, run_finalists,
                                    select_finalists)
from autoft.study.record import ATTR_FINALISTS
from autoft.task import load_task

optuna.logging.set_verbosity(optuna.logging.WARNING)
OVERRIDES = {"epochs": 3, "backbone": ["resnet20"], "unfreeze": 0}  # head only: a run takes about a second


class Collect:
    def __init__(self):
        self.events = []

    def on_finalist(self, e):
        self.events.append(e)


@pytest.fixture(scope="module")
def fewshot():
    task = load_task("digits-fewshot")
    return task, task.prepare()


@pytest.fixture(scope="module")
def searched(fewshot, tmp_path_factory):
    task, td = fewshot
    seen = Collect()
    r = autoft.search(task, overrides=OVERRIDES, n_trials=4, pruner="none", rank=False, task_data=td,
                      results_dir=tmp_path_factory.mktemp("fin"), finalists=3, finalist_seeds=3, callbacks=[seen],
                      evaluate=False, finalist_mode="seeds")
    return r, seen


def test_finalists_are_the_top_k_distinct_configurations_chosen_by_the_mean(searched):
    r, seen = searched
    rec = r.finalists
    assert rec is not None and r.study.user_attrs[ATTR_FINALISTS] == rec
    done = sorted((t for t in r.study.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    expected, keys = [], set()
    for t in done:
        if config_key(t.user_attrs["config"]) not in keys:
            keys.add(config_key(t.user_attrs["config"]))
            expected.append(t)
    expected = expected[:3]
    assert [f["trial"] for f in rec["finalists"]] == [t.number for t in expected]
    assert rec["single_seed_trial"] == r.study.best_trial.number == expected[0].number
    for f, t in zip(rec["finalists"], expected):
        s = t.user_attrs["config"]["seed"]
        assert f["seeds"] == [s, s + 1, s + 2] and f["source"] == ["trial", "re-run", "re-run"]
        assert f["scores"][0] == t.value and len(f["scores"]) == 3
        mean, std = statistics.fmean(f["scores"]), statistics.stdev(f["scores"])
        half = student_t.ppf(0.975, 2) * std / math.sqrt(3)
        assert f["mean"] == pytest.approx(mean) and f["std"] == pytest.approx(std)
        assert (f["ci95_low"], f["ci95_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    best = max(rec["finalists"], key=lambda f: statistics.fmean(f["scores"]))
    assert rec["chosen_trial"] == best["trial"] == r.best_trial.number
    assert rec["changed"] == (best["trial"] != expected[0].number)
    # progress: a start and an end event per re-run (2 per finalist)
    ends = [e for e in seen.events if e.score is not None]
    assert len(ends) == 6 and len(seen.events) == 12 and ends[-1].index == ends[-1].total == 6
    assert "finalists" in r.timings and r.finalists_skipped is None
    assert r.test_metrics is not None  # the final check refitted the chosen trial


def test_a_rerun_reproduces_the_recorded_score(searched, fewshot):
    """The trial's own seed is not re-run (its recorded score is used): a re-run reproduces it, and a
    re-run with seed s+1 reproduces the recorded score of that seed."""
    r, _ = searched
    _, td = fewshot
    f = r.finalists["finalists"][1]
    t = next(t for t in r.study.trials if t.number == f["trial"])
    cfg = TrialConfig(**t.user_attrs["config"])
    cache = FeatureCache(disk=False)
    assert fine_tune_and_score(cfg, td, cache=cache).score == pytest.approx(t.value, abs=1e-6)
    again = fine_tune_and_score(cfg.model_copy(update={"seed": f["seeds"][1]}), td, cache=cache)
    assert again.score == pytest.approx(f["scores"][1], abs=1e-6)


def test_finalists_csv_best_yaml_and_report_agree(searched, fewshot):
    r, _ = searched
    task, _ = fewshot
    rec = r.finalists
    df = pd.read_csv(r.results_dir / "finalists.csv")
    assert list(df.trial) == sorted((f["trial"] for f in rec["finalists"]),
                                    key=lambda n: -next(f["mean"] for f in rec["finalists"] if f["trial"] == n))
    assert df.loc[0, "trial"] == rec["chosen_trial"] and bool(df.loc[0, "chosen"]) and df.loc[0, "rank"] == 1
    for _, row in df.iterrows():
        f = next(f for f in rec["finalists"] if f["trial"] == row.trial)
        scores = [float(x) for x in str(row.scores).split(";")]
        assert scores == f["scores"] and row["mean"] == pytest.approx(statistics.fmean(scores))
        assert row.seeds == ";".join(map(str, f["seeds"]))
    best = yaml.safe_load((r.results_dir / "best.yaml").read_text())
    assert best["trial"] == rec["chosen_trial"] and "test_metrics" in best
    assert best["finalists"]["validation_mean"] == pytest.approx(df.loc[0, "mean"])
    assert best["finalists"]["single_seed_trial"] == rec["single_seed_trial"]
    # 'autoft report' rewrites the same winner from the storage
    assert chosen_trial(r.study).number == rec["chosen_trial"]
    rep = write_report(r.study, task, r.results_dir, plots=False)
    assert rep.best["trial"] == rec["chosen_trial"] and r.results_dir / "finalists.csv" in rep.files


def test_a_time_budget_too_small_skips_them_with_a_message(searched, fewshot):
    r, _ = searched
    _, td = fewshot
    now = [1000.0]
    clock = TimeBudget(10, clock=lambda: now[0])
    now[0] = clock.deadline - 1  # a second left
    before = dict(r.study.user_attrs[ATTR_FINALISTS])
    out = run_finalists(r.study, td, FinalistsSpec(3, 3, "seeds"), clock=clock)
    assert out.skipped and "finalists' re-runs" in out.skipped and "skipped to keep the 10 s time budget" in out.skipped
    assert "--finalists 0" in out.skipped
    assert out.chosen.number == out.single.number == r.study.best_trial.number and out.record is None
    assert r.study.user_attrs[ATTR_FINALISTS] == before  # nothing recorded


def test_cross_validation_folds(searched, fewshot):
    r, _ = searched
    _, td = fewshot
    folds = cv_folds(td.splits, td.data.labels, 3, seed=0)
    pool = np.sort(np.concatenate([td.splits.train, td.splits.val]))
    labels = td.data.labels
    for s in folds:
        assert np.array_equal(np.sort(np.concatenate([s.train, s.val])), pool)
        assert np.array_equal(s.test, td.splits.test) and not set(s.train) & set(s.val)
        # every class keeps the search's own train and validation sizes (20 + 20 per class here)
        assert np.array_equal(np.bincount(labels[s.val], minlength=10), np.bincount(labels[td.splits.val], minlength=10))
        assert np.array_equal(np.bincount(labels[s.train], minlength=10),
                              np.bincount(labels[td.splits.train], minlength=10))
    # 40 per class, 20 validated per fold: folds 1-2 validate on disjoint halves that cover the pool, and fold 3
    # starts another shuffle (it differs from both)
    assert not set(folds[0].val) & set(folds[1].val)
    assert np.array_equal(np.sort(np.concatenate([folds[0].val, folds[1].val])), pool)
    assert not np.array_equal(folds[2].val, folds[0].val) and not np.array_equal(folds[2].val, folds[1].val)
    assert all(np.array_equal(a.val, b.val) for a, b in zip(folds, cv_folds(td.splits, labels, 3, seed=0)))
    # a fractional split (70 / 15 per class): 5 disjoint validation parts of 15, each training on the other 70
    from autoft.data.splits import Splits
    y = np.repeat(np.arange(2), 100)
    tr = np.concatenate([np.arange(70), 100 + np.arange(70)])
    va = np.concatenate([70 + np.arange(15), 170 + np.arange(15)])
    frac = cv_folds(Splits(tr, va, np.concatenate([85 + np.arange(15), 185 + np.arange(15)])), y, 5, seed=1)
    assert [len(f.val) for f in frac] == [30] * 5 and [len(f.train) for f in frac] == [140] * 5
    assert len(set(np.concatenate([f.val for f in frac]))) == 150  # 5 disjoint parts of the 170-example pool
    out = run_finalists(r.study, td, FinalistsSpec(2, 2, "cv"), record=False)
    assert [f["folds"] for f in out.record["finalists"]] == [[0, 1], [0, 1]]
    assert all(f["source"] == ["re-run", "re-run"] and f["n"] == 2 for f in out.record["finalists"])
    assert out.record["chosen_by"] == "mean of 2 cross-validation folds of train+validation"


def test_distinct_configurations_and_a_stale_record():
    """Two trials of one configuration (other seed) count once; a record the study has moved past is ignored."""
    study = optuna.create_study(direction="maximize")
    cfgs = [{"backbone": "resnet20", "lr": lr, "seed": 0} for lr in (1e-3, 1e-3, 2e-3, 3e-3)]
    cfgs[1]["seed"] = 5  # the same configuration as trial 0
    for cfg, v in zip(cfgs, (0.9, 0.95, 0.8, 0.7)):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=v, user_attrs={"config": cfg}))
    top = select_finalists(study.trials, "maximize", 3, first=study.best_trial)
    assert [t.number for t in top] == [1, 2, 3]
    study.set_user_attr(ATTR_FINALISTS, {"k": 3, "direction": "maximize", "chosen_trial": 2,
                                         "finalists": [{"trial": n} for n in (1, 2, 3)]})
    assert chosen_trial(study).number == 2
    # a configuration that does not validate (written by another version or process) is never a finalist
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.98, user_attrs={"config": {"lr": "fast"}}))
    assert [t.number for t in select_finalists(study.trials, "maximize", 3)] == [1, 2, 3]
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.99,
                                 user_attrs={"config": {"backbone": "resnet20", "lr": 9e-3, "seed": 0}}))
    assert chosen_trial(study).number == 5  # the study moved on: the single-seed best again


def test_disabled_is_todays_behaviour_and_the_cli_prints_them(fewshot, tmp_path, capsys):
    task, td = fewshot
    r = autoft.search(task, overrides=OVERRIDES, n_trials=2, pruner="none", rank=False, task_data=td,
                      results_dir=tmp_path, finalists=0, evaluate=False)
    assert r.finalists is None and r.finalists_skipped is None and "finalists" not in r.timings
    assert r.best_trial.number == r.study.best_trial.number and ATTR_FINALISTS not in r.study.user_attrs
    assert not (r.results_dir / "finalists.csv").exists()
    assert "finalists" not in yaml.safe_load((r.results_dir / "best.yaml").read_text())
    args = ["search", "--task", "digits-fewshot", "--results-dir", str(tmp_path), "--study-name", "cli",
            "--backbones", "resnet20", "--set", "epochs=2", "--set", "unfreeze=0", "--n-trials", "2",
            "--pruner", "none", "--no-rank", "--no-evaluate", "--finalists", "2", "--finalist-seeds", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # the default mode: 2 cross-validation folds per finalist
    assert "finalists 1/4: trial #" in out and "finalists 4/4" in out and " fold 2: accuracy " in out
    assert "finalists (mean of 2 cross-validation folds of train+validation; 95 % t-interval of the mean):" in out
    assert "the choice" in out and " · finalists " in out  # the time line has the phase


def test_export_and_evaluate_default_to_the_finalists_choice(searched):
    """Without --trial, export and evaluate take the study's winner: the finalists' choice, not the single-seed
    best (both go through autoft.results.tables.best_trial)."""
    from autoft.export.export import select_trial
    from autoft.results.tables import best_trial

    r, _ = searched
    rec = r.study.user_attrs[ATTR_FINALISTS]
    other = next(f["trial"] for f in rec["finalists"] if f["trial"] != rec["chosen_trial"])
    try:
        r.study.set_user_attr(ATTR_FINALISTS, {**rec, "chosen_trial": other})
        assert best_trial(r.study).number == other
        assert select_trial(r.study, None).number == other
    finally:
        r.study.set_user_attr(ATTR_FINALISTS, rec)
    assert select_trial(r.study, None).number == rec["chosen_trial"]


def test_recorded_fold_scores_are_reused_only_for_the_same_folds():
    """A resumed study reuses a recorded fold score only when the folds are the same ones (scheme and seed):
    folds of an older scheme, or drawn from another seed, are other examples."""
    from autoft.study.finalists import FOLD_SCHEME, _previous_scores

    spec = FinalistsSpec(2, 2, "cv")
    rec = {"mode": "cv", "seeds": 2, "fold_scheme": FOLD_SCHEME, "fold_seed": 7,
           "finalists": [{"trial": 3, "seeds": [7, 7], "folds": [0, 1], "scores": [0.9, 0.8],
                          "source": ["re-run", "re-run"]}]}
    assert _previous_scores(rec, spec, 7) == {(3, 7, 0): 0.9, (3, 7, 1): 0.8}
    assert _previous_scores(rec, spec, 8) == {}  # another fold seed
    assert _previous_scores({**rec, "fold_scheme": None}, spec, 7) == {}  # recorded before the scheme was
    assert _previous_scores(rec, FinalistsSpec(2, 3, "cv"), 7) == {}  # another number of folds
