"""Inference latency and size of every completed trial's model (autoft.core.latency), recorded by both engines.

Real weights and data: a 2-trial digits search (resnet20, head only, 1 epoch) under the Optuna engine,
the Ray engine's driver-side measurement on frozen trials, and the meter's per-architecture cache.
"""
from __future__ import annotations

import datetime as dt
import os

import optuna
import pandas as pd
import pytest
import torch
import yaml

from autoft.core import TrialConfig
from autoft.core.latency import LatencyMeter, Timing, default_meter
from autoft.core.model import Classifier, build_head
from autoft.engines.base import build_request, parse_objectives
from autoft.engines.optuna_engine import run_study
from autoft.errors import ConfigError
from autoft.results import write_report
from autoft.results.tables import LATENCY_COLUMNS
from autoft.study.record import (ATTR_LATENCY, ATTR_LATENCY_CPU_B1, ATTR_LATENCY_CPU_B64, ATTR_PARAMS, ATTR_SIZE_MB,
                                 latency_attrs)
from autoft.task import load_task
from autoft.zoo import get_backbone

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAST = {1: Timing(warmup=1, min_runs=3, max_runs=5, budget_s=0.05), 64: Timing(warmup=0, min_runs=1, max_runs=1,
                                                                                   budget_s=0.0)}


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits")
    return task, task.prepare()


def _whole_model_size(name: str, cfg: TrialConfig, num_classes: int) -> tuple[int, float]:
    bb = get_backbone(name)
    model = Classifier(bb, build_head(bb.feature_dim, num_classes, cfg))
    n = sum(p.numel() for p in model.parameters())
    mb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 1e6
    return n, mb


def test_a_search_records_latency_and_size_of_every_completed_trial(digits, feature_cache, tmp_path):
    task, td = digits
    # one architecture (resnet20 + linear head) in both trials: the second is not measured again
    req = build_request(task, overrides={"backbone": ["resnet20"], "unfreeze": 0, "epochs": 1, "head": "linear"},
                        results_dir=tmp_path, n_trials=2, pruner="none")
    study = run_study(req, task_data=td, cache=feature_cache, rank=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    n, mb = _whole_model_size("resnet20", TrialConfig(backbone="resnet20"), td.data.num_classes)
    for t in trials:
        a = t.user_attrs
        assert 0 < a[ATTR_LATENCY_CPU_B1] < a[ATTR_LATENCY_CPU_B64]
        assert a[ATTR_PARAMS] == n and a[ATTR_SIZE_MB] == pytest.approx(mb, abs=1e-3)
        setup = a[ATTR_LATENCY]
        assert setup["input"] == "3x32x32" and setup["threads"] == 1  # AUTOFT_LATENCY_THREADS, default 1
        assert setup["batch_sizes"] == [1, 64] and setup["gpu"] is None and setup["seconds"] < 30
    # same architecture: the second trial took the first's measurement from the process's meter
    assert trials[1].user_attrs[ATTR_LATENCY]["cached"] is True
    assert trials[1].user_attrs[ATTR_LATENCY_CPU_B1] == trials[0].user_attrs[ATTR_LATENCY_CPU_B1]
    rep = write_report(study, task, req.study_dir, plots=False)
    df = pd.read_csv(req.study_dir / "trials.csv")
    cols = list(df.columns)
    assert cols[cols.index("origin") + 1: cols.index("origin") + 1 + len(LATENCY_COLUMNS)] == LATENCY_COLUMNS
    assert (df.latency_cpu_b1_ms > 0).all() and (df.n_params == n).all()
    best = yaml.safe_load((req.study_dir / "best.yaml").read_text())
    assert best["model"]["n_params"] == n and best["model"]["latency_cpu_b1_ms"] > 0
    # a single-objective study has its Pareto set too (metric vs CPU latency at batch 1)
    assert (req.study_dir / "pareto.csv").is_file() and rep.pareto is not None and len(rep.pareto) >= 1


def test_the_meter_measures_an_architecture_once(digits, feature_cache):
    _, td = digits
    meter = LatencyMeter(timings=FAST)
    a = meter.measure(TrialConfig(backbone="resnet20", lr=1e-3, unfreeze=0), td, feature_cache)
    # another training recipe of the same architecture: from the cache, not timed again
    b = meter.measure(TrialConfig(backbone="resnet20", lr=3e-2, unfreeze=3, epochs=5, dropout=0.2,
                                  optimizer="sgd"), td, feature_cache)
    assert not a.cached and b.cached and b.figures() == a.figures()
    assert len(meter.measured) == 1 and meter.backbones_timed == 1
    # another head on the same backbone: a new architecture, but the backbone's timing is reused
    c = meter.measure(TrialConfig(backbone="resnet20", head="mlp", head_width=256, head_depth=2), td, feature_cache)
    assert not c.cached and len(meter.measured) == 2 and meter.backbones_timed == 1
    assert c.params > a.params
    assert c.seconds < a.seconds  # only the head was timed
    # another backbone: timed
    d = meter.measure(TrialConfig(backbone="resnet32"), td, feature_cache)
    assert meter.backbones_timed == 2 and d.params > a.params
    # the process's meter used by the engines is one object
    assert default_meter() is default_meter()


def test_cpu_figures_use_one_thread_and_leave_the_process_as_it_was(digits, feature_cache, monkeypatch):
    _, td = digits
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lat = LatencyMeter(timings=FAST).measure(TrialConfig(backbone="resnet20"), td, feature_cache)
        assert lat.threads == 1 and torch.get_num_threads() == 2
        monkeypatch.setenv("AUTOFT_LATENCY_THREADS", "2")
        meter = LatencyMeter(timings=FAST)
        assert meter.threads == 2 and meter.key(TrialConfig(backbone="resnet20"), 10)[4] == 2
    finally:
        torch.set_num_threads(before)


def test_text_is_timed_at_the_task_length(feature_cache, sms_small):
    from autoft.core import TaskData
    from autoft.data import stratified_split

    splits = stratified_split(sms_small.labels, val=0.2, test=0.2, seed=0, source="sms")
    td = TaskData(sms_small, splits, metric="f1_pos", positive_index=1, max_length=16)
    # MiniLM, or on a lent GPU machine its architecture with random weights (benchmarks/gpu_checks.sh)
    text = os.environ.get("AUTOFT_TEST_TEXT_BACKBONE", "minilm")
    lat = LatencyMeter(timings=FAST).measure(TrialConfig(backbone=text), td, feature_cache)
    assert lat.input == "16 tokens" and lat.cpu_b1_ms > 0 and lat.params > 20_000_000


def test_ray_driver_measures_completed_trials(digits, feature_cache):
    """The Ray engine measures on the driver, after the sweep, every completed trial it writes to the study."""
    from autoft.engines.ray_engine import _add_latency

    _, td = digits
    cfg = TrialConfig(backbone="resnet20").model_dump()
    now = dt.datetime.now()

    def frozen(state, value):
        return optuna.trial.FrozenTrial(number=0, trial_id=0, state=state, value=value, values=None,
                                        datetime_start=now, datetime_complete=now, params={}, distributions={},
                                        user_attrs={"config": cfg}, system_attrs={}, intermediate_values={})

    done, pruned = frozen(optuna.trial.TrialState.COMPLETE, 0.5), frozen(optuna.trial.TrialState.PRUNED, None)
    _add_latency([done, pruned], td)
    assert done.user_attrs[ATTR_LATENCY_CPU_B1] > 0 and done.user_attrs[ATTR_PARAMS] > 0
    assert ATTR_LATENCY_CPU_B1 not in pruned.user_attrs


def test_latency_attrs_and_switch(monkeypatch, digits, feature_cache):
    from autoft.core.latency import latency_enabled
    from autoft.engines.optuna_engine import trial_latency

    assert latency_attrs(None) == {}
    monkeypatch.setenv("AUTOFT_LATENCY", "0")
    assert not latency_enabled()
    assert trial_latency(TrialConfig(backbone="resnet20"), digits[1], feature_cache) is None
    # a multi-objective study needs it: measured all the same
    assert trial_latency(TrialConfig(backbone="resnet20"), digits[1], feature_cache, required=True) is not None


def test_objectives_are_validated(digits):
    task, _ = digits
    assert parse_objectives("accuracy,latency", task) == ("accuracy", "latency_cpu_b1_ms")
    assert parse_objectives(["accuracy", "latency_cpu_b64"], task) == ("accuracy", "latency_cpu_b64_ms")
    assert parse_objectives("accuracy", task) == ("accuracy",) and parse_objectives("", task) is None
    with pytest.raises(ConfigError, match="--objectives.*unknown objective 'latncy'.*did you mean 'latency'"):
        parse_objectives("accuracy,latncy", task)
    with pytest.raises(ConfigError, match="the task's metric .* first"):
        parse_objectives("latency,accuracy", task)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_latency_is_measured_on_a_cuda_task(digits, feature_cache):
    import dataclasses

    _, td = digits
    lat = LatencyMeter(timings=FAST).measure(TrialConfig(backbone="resnet20"), dataclasses.replace(td, device="cuda"),
                                             feature_cache)
    assert lat.gpu_b1_ms > 0 and lat.gpu_b64_ms > 0 and lat.gpu
    assert {"latency_gpu_b1_ms", "latency_gpu_b64_ms"} <= set(latency_attrs(lat))
