"""Data at scale: the backbone ranking and the winner's evaluation stream images that would not fit the
memory budget (a tiny ``TaskData.memory_budget`` forces it here) and give the in-memory numbers (1e-5),
on real photos (a subset of hymenoptera) with the offline ImageNet checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.data import LabelledData, stratified_split
from autoft.data.images import ImageFiles
from autoft.evaluation.evaluate import data_logits, evaluate_winner, split_logits
from autoft.rank import rank_backbones

BACKBONES = ["mobilenet_v3_small_folded", "squeezenet1_1_folded"]


@pytest.fixture(scope="module")
def photos(assets):
    """12 ants and 12 bees from hymenoptera's train folder, read lazily."""
    paths, labels = [], []
    for c, cls in enumerate(("ants", "bees")):
        files = sorted((assets / "data" / "hymenoptera" / "train" / cls).glob("*.jpg"))[:12]
        paths += files
        labels += [c] * len(files)
    data = LabelledData(ImageFiles(paths), np.array(labels), ["ants", "bees"], "image", "hymenoptera-subset")
    return data, stratified_split(data.labels, val=0.25, test=0.25, seed=0)


def _task(photos, budget=None):
    data, splits = photos
    return TaskData(data, splits, name="ants-bees-subset", memory_budget=budget, num_workers=0)


def test_ranking_streams_through_disk_features_and_matches_memory(photos, tmp_path):
    memory = rank_backbones(_task(photos), BACKBONES, FeatureCache(disk=False), methods=("logme", "knn"))
    cache = FeatureCache(disk=tmp_path)
    streamed = rank_backbones(_task(photos, budget=1), BACKBONES, cache, methods=("logme", "knn"))
    assert not cache._encoded  # nothing encoded in memory
    assert len(list((tmp_path / "arrays").glob("*.npy"))) == len(BACKBONES)  # pooled features on disk
    assert [s.backbone for s in streamed] == [s.backbone for s in memory]
    for a, b in zip(streamed, memory):
        assert a.error is None and a.examples == b.examples and a.feature_dim == b.feature_dim
        assert a.logme == pytest.approx(b.logme, abs=1e-5) and a.knn == pytest.approx(b.knn, abs=1e-9)
    # a head-only trial on the streamed task reads the ranking's feature file: nothing computed again
    misses = cache.misses
    res = fine_tune_and_score(dict(backbone=BACKBONES[0], unfreeze=0, epochs=1, batch_size=8), _task(photos, 1),
                              cache=cache)
    assert res.data["mode"] == "disk features" and cache.misses == misses


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """A winner fine-tuned on the streamed task (last 2 stages trained), with its final check on the test split:
    the cache it used holds the frozen-prefix features of its rows on disk."""
    cache = FeatureCache(disk=tmp_path_factory.mktemp("features"))
    cfg = dict(backbone="mobilenet_v3_small_folded", unfreeze=2, epochs=2, lr=1e-3, batch_size=8)
    res = fine_tune_and_score(cfg, _task(photos, budget=1), cache=cache, test=True, return_model=True)
    assert res.data["mode"] == "disk features"
    return res, cache


def _evaluate(res, task, cache, folder):
    ev = evaluate_winner(res, task, folder, cache=cache, n_boot=50, explain=1)
    return ev, json.loads((folder / "summary.json").read_text()), pd.read_csv(folder / "predictions.csv")


def test_evaluation_streams_and_matches_memory(photos, trained, tmp_path):
    res, search_cache = trained
    _, mem, mem_pred = _evaluate(res, _task(photos), FeatureCache(disk=False), tmp_path / "memory")
    # streamed, reading the features the search wrote to disk (the final check's cache)
    misses = search_cache.misses
    _, disk, disk_pred = _evaluate(res, _task(photos, 1), search_cache, tmp_path / "disk")
    assert not search_cache._encoded and search_cache.misses == misses  # nothing encoded, nothing computed
    # streamed through the whole model (a cache that has no features of these rows)
    fresh = FeatureCache(disk=tmp_path / "fresh")
    _, whole, whole_pred = _evaluate(res, _task(photos, 1), fresh, tmp_path / "whole")
    assert not fresh._encoded and not list((tmp_path / "fresh").rglob("*.npy"))
    for s, pred in ((disk, disk_pred), (whole, whole_pred)):
        for k, v in mem["metrics_argmax"].items():
            assert s["metrics_argmax"][k] == pytest.approx(v, abs=1e-5), k
        for k, v in mem["metrics"].items():
            assert s["metrics"][k] == pytest.approx(v, abs=1e-5), k
        assert s["calibration"]["temperature"] == pytest.approx(mem["calibration"]["temperature"], abs=1e-4)
        for col in ("p_ants", "p_bees"):
            np.testing.assert_allclose(pred[col], mem_pred[col], atol=1e-5)
        assert (pred.predicted == mem_pred.predicted).all()
        assert s["explanations"]["examples"] >= 1
    # the final check's test metrics are the evaluation's argmax metrics
    for k, v in res.test_metrics.items():
        assert disk["metrics_argmax"][k] == pytest.approx(v, abs=1e-5), k


def test_split_and_data_logits_stream(photos, trained):
    res, search_cache = trained
    model, (data, _) = res.model, photos
    mem = split_logits(model, _task(photos), ("train", "val", "test"), FeatureCache(disk=False))
    streamed = split_logits(model, _task(photos, 1), ("train", "val", "test"), search_cache)
    for k in mem:
        torch.testing.assert_close(streamed[k], mem[k], atol=1e-5, rtol=0)
    cache = FeatureCache(disk=False)
    torch.testing.assert_close(data_logits(model, data, cache, budget=1), data_logits(model, data, cache),
                               atol=1e-5, rtol=0)
