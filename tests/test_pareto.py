"""``--objectives accuracy,latency``: a multi-objective study, its Pareto set (pareto.csv, pareto.png, report.md)
and the export of any member.

Real weights and data: a 4-trial digits search over two CIFAR ResNets and two head shapes (head only,
1 epoch), then the export of a Pareto member checked against PyTorch with the export tests' helpers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

import autoft
from autoft.cli import main
from autoft.engines.base import build_request
from autoft.errors import ConfigError
from autoft.export import export_trial
from autoft.results.pareto import dominates, pareto_table

sys.path.insert(0, str(Path(__file__).parent))
from test_export import _check_formats_match_pytorch, _runtime_accuracy  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
OVERRIDES = {"backbone": ["resnet20", "resnet32"], "unfreeze": 0, "epochs": 1, "head": ["linear", "mlp"],
             "head_width": 64, "head_depth": 1}


@pytest.fixture(scope="module")
def mo_search(tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp("pareto")
    task = load_digits()
    td = task.prepare()
    r = autoft.search(task, n_trials=4, results_dir=root, objectives="accuracy,latency", overrides=OVERRIDES,
                      pruner="hyperband", task_data=td, evaluate=False)
    return task, td, r, root


def load_digits():
    from autoft.task import load_task

    return load_task("digits")


def _non_dominated(df: pd.DataFrame, latency: str = "latency_cpu_b1_ms") -> set[int]:
    done = df[df.state == "complete"]
    pts = {int(r.number): (float(r.score), float(r[latency])) for _, r in done.iterrows()}
    return {n for n, p in pts.items() if not any(dominates(q, p, True) for m, q in pts.items() if m != n)}


def test_multi_objective_search_writes_the_pareto_set(mo_search):
    task, td, r, _ = mo_search
    study = r.study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.user_attrs["objectives"] == ["accuracy", "latency_cpu_b1_ms"]
    trials = study.get_trials()
    assert all(t.state.name == "COMPLETE" for t in trials) and len(trials) == 4  # nothing pruned (Optuna cannot)
    for t in trials:  # the objectives are the metric and the recorded latency
        assert t.values == [pytest.approx(t.user_attrs["metrics"]["accuracy"]),
                            pytest.approx(t.user_attrs["latency_cpu_b1_ms"])]
        assert len(t.user_attrs["history"]) == 1 and not t.intermediate_values
    folder = r.results_dir
    df = pd.read_csv(folder / "trials.csv")
    front = pd.read_csv(folder / "pareto.csv")
    assert list(front.columns) == ["number", "accuracy", "latency_cpu_b1_ms", "latency_cpu_b64_ms", "n_params",
                                   "size_mb", "backbone", "unfreeze", "head"]
    # exactly the non-dominated completed trials, checked here pair by pair; Optuna agrees
    assert set(front.number) == _non_dominated(df) == {t.number for t in study.best_trials}
    assert list(front.latency_cpu_b1_ms) == sorted(front.latency_cpu_b1_ms)  # fastest first
    for _, row in front.iterrows():
        t = df[df.number == row.number].iloc[0]
        assert row.accuracy == pytest.approx(t.score) and row.n_params == t.n_params and row.backbone == t.backbone
    assert (folder / "plots" / "pareto.png").stat().st_size > 5000
    md = (folder / "report.md").read_text()
    assert "## Accuracy vs latency: the Pareto set" in md and "plots/pareto.png" in md
    assert all(f"| {int(n)} |" in md for n in front.number)
    # the winner (final check) is the most accurate member of the Pareto set
    best = yaml.safe_load((folder / "best.yaml").read_text())
    top = front.sort_values(["accuracy", "latency_cpu_b1_ms"], ascending=[False, True]).iloc[0]
    assert best["trial"] == r.best_trial.number == int(top.number) and r.best_value == pytest.approx(top.accuracy)
    assert best["objectives"] == ["accuracy", "latency_cpu_b1_ms"] and 0 < best["test_metrics"]["accuracy"] <= 1
    pd.testing.assert_frame_equal(r.pareto(), front, check_dtype=False)
    for png in ("history.png", "learning_curves.png"):
        assert (folder / "plots" / png).is_file()


def test_report_show_and_resume_of_a_multi_objective_study(mo_search, capsys):
    task, _, r, root = mo_search
    args = ["--task", "digits", "--results-dir", str(root)]
    assert main(["report", *args]) == 0 and main(["show", *args]) == 0
    assert "pareto.csv" in capsys.readouterr().out
    # a study keeps its objectives: asking for the metric alone is an error naming the option
    with pytest.raises(ConfigError, match="--objectives.*optimises accuracy and latency_cpu_b1_ms"):
        autoft.search(task, n_trials=4, results_dir=root, objectives="accuracy", overrides=OVERRIDES)
    assert main(["search", *args, "--objectives", "accuracy", "--n-trials", "4"]) == 2
    assert "a study keeps the objectives" in capsys.readouterr().err
    # Ray Tune's schedulers stop trials on one metric: refused with a clear error
    from autoft.engines.ray_engine import refuse_multi_objective

    with pytest.raises(ConfigError, match="--objectives.*--backend optuna only"):
        refuse_multi_objective(build_request(task, results_dir=root, objectives="accuracy,latency"))
    with pytest.raises(ConfigError, match="--backend optuna only"):  # the existing study's objectives
        refuse_multi_objective(build_request(task, results_dir=root))


def test_export_of_a_pareto_member_and_of_a_non_best_trial(mo_search, tmp_path, feature_cache, capsys):
    task, td, r, root = mo_search
    front = r.pareto()
    # a member other than the winner when the front has one, else the winner itself
    others = [int(n) for n in front.number if int(n) != r.best_trial.number]
    member = others[0] if others else int(front.number[0])
    res = export_trial(task, tmp_path / "member", study=r.study, trial=member, task_data=td, cache=feature_cache)
    assert res.trial == member
    _check_formats_match_pytorch(res, td)  # pt2, ONNX, TorchScript and the state_dict give PyTorch's logits
    assert _runtime_accuracy(res.folder, td, "onnx") == pytest.approx(res.test_metrics["accuracy"], abs=1e-6)
    card = (res.folder / "README.md").read_text()
    assert f"trial #{member}" in card and "forward latency, measured during the search" in card
    # the command line exports any completed trial, here one that is not the winner
    done = [t for t in r.study.get_trials() if t.state.name == "COMPLETE" and t.number != r.best_trial.number]
    other = sorted(done, key=lambda t: (t.number in set(front.number), t.number))[0]
    assert main(["export", "--task", "digits", "--results-dir", str(root), "--trial", str(other.number),
                 "--out", str(tmp_path / "cli"), "--formats", "onnx"]) == 0
    assert f"trial #{other.number}" in (tmp_path / "cli" / "README.md").read_text()
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["validation_score"] == pytest.approx(other.values[0])
    assert _runtime_accuracy(tmp_path / "cli", td, "onnx") == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)


def test_pareto_table_dominance_with_ties():
    df = pd.DataFrame({"number": [0, 1, 2, 3, 4, 5], "state": ["complete"] * 5 + ["pruned"],
                       "score": [0.9, 0.9, 0.8, 0.95, 0.9, 0.99],
                       "latency_cpu_b1_ms": [2.0, 2.0, 1.0, 5.0, 3.0, 0.1],
                       "latency_cpu_b64_ms": [20.0, 20.0, 10.0, 50.0, 30.0, 1.0],
                       "n_params": [1, 1, 1, 2, 1, 1], "size_mb": [0.1] * 6, "backbone": ["a"] * 6,
                       "unfreeze": [0] * 6, "cfg_head": ["linear"] * 6})
    front = pareto_table(df, "accuracy", "maximize")
    # 0 and 1 tie (neither dominates the other), 4 is dominated by 0, the pruned trial 5 is no candidate
    assert list(front.number) == [2, 0, 1, 3]
    assert list(pareto_table(df.assign(score=-df.score), "loss", "minimize").number) == [2, 0, 1, 3]
    assert list(pareto_table(df, "loss", "minimize").number) == [2]  # lowest loss and fastest


def test_evaluate_a_multi_objective_study(mo_search, tmp_path):
    """`autoft evaluate` on a multi-objective study (FrozenTrial.value raises there): the most accurate Pareto
    member, its search score read from the first objective."""
    from autoft.evaluation.sources import evaluate_trial
    from autoft.results.tables import best_trial

    task, _, r, root = mo_search
    ev = evaluate_trial(task, results_dir=root, out=tmp_path / "ev", explain=0, n_boot=50, html=False)
    winner = best_trial(r.study)
    doc = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert doc["trial"] == ev.summary["trial"] == winner.number
    assert doc["validation_score_search"] == pytest.approx(winner.values[0])
