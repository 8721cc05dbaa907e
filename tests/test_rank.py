"""Backbone ranking before training: LogME (checked against the evidence computed directly), kNN,
the ``autoft rank`` command and its use in the search."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from autoft.core import FeatureCache
from autoft.rank import (RankPolicy, apply_ranking, frozen_features, knn_accuracy, logme, prior_params,
                         rank_backbones)
from autoft.zoo import get_backbone


def _direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, I/beta + F F^T/alpha): the marginal likelihood LogME maximises, per example."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))) / n


def test_logme_is_the_maximised_evidence():
    rng = np.random.default_rng(0)
    n, d = 60, 8
    f = rng.normal(size=(n, d))
    labels = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)  # two classes
    per_class = []
    for c in (0, 1):
        y = (labels == c).astype(float)
        res = minimize(lambda p: -_direct_evidence(f, y, math.exp(p[0]), math.exp(p[1])), x0=[0.0, 0.0],
                       method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        per_class.append(-res.fun)
    assert logme(f, labels) == pytest.approx(np.mean(per_class), abs=1e-4)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=300)
    informative = np.eye(5)[y] * 3 + rng.normal(size=(300, 5)) * 0.5
    noise = rng.normal(size=(300, 5))
    assert logme(np.hstack([informative, noise]), y) > logme(np.hstack([noise, rng.normal(size=(300, 5))]), y)
    # more samples than dimensions and the reverse both work
    assert np.isfinite(logme(rng.normal(size=(10, 40)), rng.integers(0, 2, size=10)))


def test_knn_probe():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    centres = np.eye(3) * 10
    f = centres[y] + rng.normal(size=(60, 3))
    assert knn_accuracy(f, y, k=5) == 1.0
    assert knn_accuracy(rng.normal(size=(60, 3)), y, k=5) < 0.7


def test_pretrained_ranks_above_random_init(digits_task, tmp_path):
    """On digits, LogME of the CIFAR-pretrained resnet20 beats the same network randomly initialised."""
    cache = FeatureCache(disk=tmp_path)
    t0 = time.perf_counter()
    (pre,) = rank_backbones(digits_task, ["resnet20"], cache)
    first = time.perf_counter() - t0
    torch.manual_seed(0)
    rand = get_backbone("resnet20", pretrained=False).set_unfreeze(0)
    f, y = frozen_features(rand, digits_task, cache)
    assert len(y) == len(digits_task.splits.train) == pre.examples
    assert pre.logme > logme(f, y) + 0.02
    # seconds: the scores themselves are instant, the features come from the cache the second time
    t0 = time.perf_counter()
    (again,) = rank_backbones(digits_task, ["resnet20"], FeatureCache(disk=tmp_path), methods=("logme", "knn"))
    assert again.logme == pytest.approx(pre.logme, abs=1e-9)
    assert time.perf_counter() - t0 < max(5.0, first)
    assert 0.5 < again.knn <= 1.0


def test_rank_command(tmp_path, monkeypatch, capsys):
    from autoft.cli import main

    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(tmp_path / "features"))
    assert main(["rank", "--task", "digits-fewshot", "--backbones", "resnet20,resnet32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ranking = doc["ranking"]
    assert [r["backbone"] for r in ranking] != [] and {r["backbone"] for r in ranking} == {"resnet20", "resnet32"}
    assert ranking[0]["logme"] >= ranking[1]["logme"]
    assert all(r["seconds"] >= 0 and r["examples"] == 200 and r["feature_dim"] == 64 for r in ranking)
    assert main(["rank", "--task", "digits-fewshot", "--backbones", "resnet20,resnet32"]) == 0  # table
    out = capsys.readouterr().out
    assert "LogME" in out and "resnet32" in out and "seconds" in out
    assert main(["rank", "--task", "digits-fewshot", "--methods", "nope"]) == 2


def test_search_tries_top_ranked_backbone_first(tmp_path, monkeypatch):
    import optuna

    from autoft.engines.base import build_request
    from autoft.engines.optuna_engine import run_study
    from autoft.task import load_task

    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(tmp_path / "features"))
    task = load_task("digits-fewshot")
    req = build_request(task, overrides={"epochs": 1}, backbones=["resnet20", "resnet32"],
                        results_dir=tmp_path / "results", n_trials=2)
    study = run_study(req, task_data=task.prepare())
    ranking = study.user_attrs["ranking"]
    assert [r["backbone"] for r in ranking] == sorted([r["backbone"] for r in ranking],
                                                       key=lambda b: -next(x["logme"] for x in ranking
                                                                           if x["backbone"] == b))
    first = study.trials[0]
    assert first.params["backbone"] == ranking[0]["backbone"]
    half = round({"resnet20": 10, "resnet32": 16}[first.params["backbone"]] / 2)
    assert first.params["unfreeze"] == half and first.params["optimizer"] == "adamw"
    assert first.state == optuna.trial.TrialState.COMPLETE and first.user_attrs["first_trial"]
    # the report sets the ranking beside the fine-tuned results
    import pandas as pd

    from autoft.results import write_report

    write_report(study, task, req.study_dir, plots=False)
    lb = pd.read_csv(req.study_dir / "leaderboard.csv").set_index("backbone")
    for place, r in enumerate(ranking, 1):
        if r["backbone"] in lb.index:
            assert lb.loc[r["backbone"], "logme"] == pytest.approx(r["logme"])
            assert lb.loc[r["backbone"], "logme_rank"] == place
    trials = pd.read_csv(req.study_dir / "trials.csv")
    assert trials.origin.iloc[0] == "first trial" and (trials.origin.iloc[1:] == "sampler").all()
    # ranking off: nothing recorded, nothing enqueued
    req2 = build_request(task, overrides={"epochs": 1}, backbones=["resnet20", "resnet32"], study_name="norank",
                         results_dir=tmp_path / "results", n_trials=1)
    assert "ranking" not in run_study(req2, task_data=task.prepare(), rank=False).user_attrs


def test_prior_params_stay_in_the_space(digits_task):
    from autoft.engines.base import build_request
    from autoft.rank import BackboneScore
    from autoft.task import load_task

    import yaml

    from autoft.space import num_stages

    req = build_request(load_task("sms-spam"))  # unfreeze capped by text_minilm.yaml
    cap = yaml.safe_load(Path(req.space.file).read_text())["unfreeze"]["max"]
    scores = [BackboneScore("minilm", logme=0.1)]
    (params,) = prior_params(scores, RankPolicy(first_trials=[{"unfreeze": "half", "lr": 1.0, "head": "linear"}]),
                             req.space)
    # half of minilm's stages, clipped to the space's cap; lr 1.0 is outside the range and left out
    assert params == {"backbone": "minilm", "unfreeze": min(round(num_stages("minilm") / 2), cap), "head": "linear"}
    many = [BackboneScore("a", logme=1.0), BackboneScore("b", logme=0.2), BackboneScore("c", error="x")]
    policy = RankPolicy(enqueue=3, drop_below=0.5, first_trials=[{}])
    assert prior_params(many, policy, req.space) == [{"backbone": "a"}]


def test_single_backbone_space_is_not_ranked_but_gets_its_first_trial(tmp_path):
    """Nothing to rank: no time spent on features, but the space's recipe still runs first."""
    import optuna

    from autoft.engines.base import build_request
    from autoft.rank import ATTR_RANKING
    from autoft.space import num_stages
    from autoft.task import load_task

    req = build_request(load_task("digits-fewshot"), backbones=["resnet20"], results_dir=tmp_path)
    study = optuna.create_study()
    # task_data None: computing features would fail, so passing shows no ranking was attempted
    assert apply_ranking(study, req, None, FeatureCache(disk=False), RankPolicy()) == []
    assert ATTR_RANKING not in study.user_attrs
    (waiting,) = study.get_trials(deepcopy=False)
    fixed = waiting.system_attrs["fixed_params"]  # what enqueue_trial stored for the sampler
    recipe = req.space.first_trials[0]
    assert fixed["backbone"] == "resnet20"
    assert fixed["unfreeze"] == round(num_stages("resnet20") / 2)
    assert fixed["lr"] == recipe["lr"] and fixed["batch_size"] == recipe["batch_size"]
    # off: nothing enqueued
    study2 = optuna.create_study()
    assert apply_ranking(study2, req, None, FeatureCache(disk=False), RankPolicy(enqueue=0)) == []
    assert not study2.trials


def test_first_trials_recipe_by_recipe_without_duplicates(digits_task):
    from autoft.engines.base import build_request
    from autoft.rank import BackboneScore
    from autoft.task import load_task

    req = build_request(load_task("digits"))
    scores = [BackboneScore("resnet44", logme=0.5), BackboneScore("resnet20", logme=0.4)]
    recipes = [{"unfreeze": 2, "lr": 3e-3}, {"unfreeze": 0}, {"unfreeze": 2, "lr": 3e-3}]
    got = prior_params(scores, RankPolicy(enqueue=2, first_trials=recipes), req.space)
    assert got == [{"backbone": "resnet44", "unfreeze": 2, "lr": 3e-3}, {"backbone": "resnet20", "unfreeze": 2, "lr": 3e-3},
                   {"backbone": "resnet44", "unfreeze": 0}, {"backbone": "resnet20", "unfreeze": 0}]
    # without an explicit list the space's own recipes are used
    space_first = prior_params(scores, RankPolicy(), req.space)
    assert len(space_first) == len(req.space.first_trials)
    assert all(p["backbone"] == "resnet44" for p in space_first)


def test_text_ranking_uses_the_tasks_token_budget(sms_small):
    """The ranking's features use the task's max_length, as the trials do: a head-only trial then reads the
    ranking's cache entry instead of computing its own pass."""
    from autoft.core import FeatureCache, TaskData, TrialConfig, fine_tune_and_score
    from autoft.data import stratified_split
    from autoft.rank import frozen_features

    task = TaskData(sms_small, stratified_split(sms_small.labels, val=0.2, test=0.2, seed=0), metric="accuracy",
                    name="sms-small", max_length=24)
    cache = FeatureCache(disk=False)
    f, _ = frozen_features("minilm", task, cache)
    assert cache.misses == 1 and f.shape[0] == len(task.splits.train)
    fine_tune_and_score(TrialConfig(backbone="minilm", unfreeze=0, epochs=1, batch_size=16), task, cache=cache)
    assert cache.misses == 1 and cache.hits >= 1  # the trial read the ranking's features
