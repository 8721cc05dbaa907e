"""GPU memory between trials: nothing leaks, out-of-memory fails a trial and retries it at half the batch
size, and the admission controller packs trials on one GPU while they fit.

Out-of-memory is simulated on the CPU (``torch.cuda.OutOfMemoryError`` raised by a patched forward), so the
classification and the half-batch retry run here; the leak test has a CUDA case (allocated memory back to
its baseline after 10 trials) that skips without a GPU, and a CPU case (no growth of live tensors).
"""
from __future__ import annotations

import dataclasses
import gc
import threading
import time

import optuna
import pytest
import torch

from autoft.core import FeatureCache, fine_tune_and_score
from autoft.core import gpu
from autoft.core.gpu import GpuAdmission, TrialOutOfMemory, estimate_trial_bytes, is_oom
from autoft.core.model import Classifier
from autoft.errors import TrialFailed

NO_CUDA = "no CUDA GPU on this machine"
GB = 1 << 30
CFG = dict(backbone="resnet20", unfreeze=1, lr=1e-3, epochs=1, batch_size=32, seed=0)


def oom_above(monkeypatch, limit: int):
    """Training batches larger than ``limit`` raise CUDA's out-of-memory error (evaluation never does)."""
    real = Classifier.forward_from

    def forward_from(self, state, start):
        n = len(state[0]) if isinstance(state, tuple) else len(state)
        if torch.is_grad_enabled() and n > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated, batch {n})")
        return real(self, state, start)

    monkeypatch.setattr(Classifier, "forward_from", forward_from)


def live_classifiers() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Classifier))


# --- classification ----------------------------------------------------------------------------------

def test_out_of_memory_errors_are_told_apart():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # not an error torch raises
    assert not is_oom(TrialFailed("loss became nan"))


# --- the core fails the trial with its reason, and leaks nothing ------------------------------------------

def test_oom_in_training_fails_the_trial_with_its_reason(small_digits_task, feature_cache, monkeypatch):
    before = live_classifiers()
    oom_above(monkeypatch, 16)
    with pytest.raises(TrialOutOfMemory) as err:
        fine_tune_and_score(CFG, small_digits_task, cache=feature_cache)
    exc = err.value
    assert isinstance(exc, TrialFailed) and exc.batch_size == 32 and exc.retry_batch_size == 16
    assert "out of memory at batch size 32 on cpu at epoch 1, step 1" in str(exc)
    assert "a batch size of 16" in str(exc)
    del err
    assert live_classifiers() == before  # the failed trial's frames were cleared: its model is gone
    # at half the batch size the same trial runs
    assert fine_tune_and_score({**CFG, "batch_size": 16}, small_digits_task, cache=feature_cache).epochs_run == 1


def test_oom_outside_the_training_step_is_classified_too(small_digits_task, feature_cache, monkeypatch):
    import autoft.core.train as train

    def predict_logits(*a, **k):
        raise RuntimeError("CUDA error: out of memory (simulated in evaluation)")

    monkeypatch.setattr(train, "predict_logits", predict_logits)
    with pytest.raises(TrialOutOfMemory, match="out of memory at batch size 32 on cpu"):
        fine_tune_and_score(CFG, small_digits_task, cache=feature_cache)


def test_other_errors_pass_through_unchanged(small_digits_task, feature_cache):
    with pytest.raises(TrialFailed) as err:
        fine_tune_and_score({**CFG, "lr": 1e6, "optimizer": "sgd", "epochs": 3}, small_digits_task,
                            cache=feature_cache)
    assert not isinstance(err.value, TrialOutOfMemory) and "loss became" in str(err.value)


# --- the engine retries once at half the batch size ----------------------------------------------------------

@pytest.fixture(scope="module")
def digits_search():
    from autoft.task import load_task

    task = load_task("digits")
    return task, task.prepare()


def _search(task, td, tmp_path, n_trials: int):
    from autoft.engines.base import build_request
    from autoft.engines.optuna_engine import run_study

    req = build_request(task, overrides={"epochs": 1, "backbone": ["resnet20"], "unfreeze": 0, "batch_size": 32},
                        results_dir=tmp_path, n_trials=n_trials)
    return run_study(req, task_data=td, cache=FeatureCache(disk=False), rank=False)


def test_engine_retries_an_oom_trial_once_at_half_the_batch(digits_search, tmp_path, monkeypatch):
    from autoft.study.record import ATTR_OOM_BATCH, ATTR_OOM_RETRY, trial_origin

    task, td = digits_search
    oom_above(monkeypatch, 16)
    study = _search(task, td, tmp_path, n_trials=1)
    trials = study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"].startswith("TrialOutOfMemory: out of memory at batch size 32")
    retry = trials[1]
    assert retry.user_attrs[ATTR_OOM_RETRY] == 0 and retry.user_attrs[ATTR_OOM_BATCH] == 16
    assert retry.user_attrs["config"]["batch_size"] == 16
    assert trial_origin(retry) == "out-of-memory retry of #0 (batch 16)"
    assert trial_origin(trials[0]) == "sampler"


def test_a_retry_that_runs_out_of_memory_again_is_not_retried(digits_search, tmp_path, monkeypatch):
    task, td = digits_search
    oom_above(monkeypatch, 4)
    study = _search(task, td, tmp_path, n_trials=1)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert "batch size 16" in study.trials[1].user_attrs["fail_reason"]


def test_oom_retry_can_be_switched_off(digits_search, tmp_path, monkeypatch):
    task, td = digits_search
    oom_above(monkeypatch, 16)
    monkeypatch.setenv("AUTOFT_OOM_RETRY", "0")
    study = _search(task, td, tmp_path, n_trials=1)
    assert [t.state.name for t in study.trials] == ["FAIL"]


# --- nothing leaks between trials ---------------------------------------------------------------------

def _ten_trials(task, cache):
    for i in range(10):
        cfg = {**CFG, "unfreeze": i % 3, "seed": i, "lr": 1e-3 * (1 + i)}
        fine_tune_and_score(cfg, task, cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_memory_returns_to_its_baseline_after_ten_trials(small_digits_task):
    task = dataclasses.replace(small_digits_task, device="cuda")
    cache = FeatureCache(disk=False)
    fine_tune_and_score(CFG, task, cache=cache)  # warm-up: CUDA context, cuBLAS/cuDNN workspaces
    gpu.release_memory("cuda")
    baseline = torch.cuda.memory_allocated()
    _ten_trials(task, cache)
    assert torch.cuda.memory_allocated() <= baseline
    # cached features live on the CPU: the feature cache holds no GPU memory
    assert all(t.device.type == "cpu" for s in cache._prefix.values() for t in (s if isinstance(s, tuple) else (s,)))


def test_cpu_live_tensors_do_not_grow_over_ten_trials(small_digits_task):
    """CPU counterpart: after a warm-up, ten trials leave no more live tensors than the warm-up did, and the
    feature cache stays within its budget."""
    first = FeatureCache(disk=False)
    probe = fine_tune_and_score(CFG, small_digits_task, cache=first)
    budget = 2 * first.stats()["memory_bytes"]  # room for about two prefix entries: eviction must happen
    cache = FeatureCache(disk=False, max_bytes=budget)
    for u in range(3):  # warm-up: backbones, encoded inputs, one prefix per split point
        fine_tune_and_score({**CFG, "unfreeze": u}, small_digits_task, cache=cache)
    del probe, first
    gc.collect()
    baseline = gpu.live_tensors()
    _ten_trials(small_digits_task, cache)
    gc.collect()
    assert gpu.live_tensors() <= baseline
    assert cache.stats()["memory_bytes"] <= budget and cache.stats()["memory_entries"] <= 2


# --- packing several trials on one GPU ----------------------------------------------------------------------

def test_unmeasured_trial_probes_alone_then_trials_pack_while_they_fit():
    adm = GpuAdmission(10 * GB)
    key = ("resnet50", 2, 64, "bf16")
    first = adm.try_acquire(key, estimate=8 * GB)
    assert first is not None
    assert adm.try_acquire(key, 1 * GB) is None  # the first one probes: nothing else starts
    adm.measured(first, 3 * GB)  # its first steps peaked at 3 GB: 3.3 GB reserved with the margin
    assert adm.known[key] == int(3 * GB * 1.1)
    second, third = adm.try_acquire(key, 8 * GB), adm.try_acquire(key, 8 * GB)  # the estimate is ignored now
    assert second is not None and third is not None
    assert adm.try_acquire(key, 8 * GB) is None  # 4 x 3.3 GB > 10 GB
    adm.release(second)
    assert adm.try_acquire(key, 8 * GB) is not None


def test_measured_keys_do_not_probe_and_estimates_bound_unmeasured_ones():
    adm = GpuAdmission(10 * GB, probe=False)
    a = adm.try_acquire(("a",), 6 * GB)
    assert adm.try_acquire(("b",), 5 * GB) is None  # 6 + 5 > 10
    assert adm.try_acquire(("c",), 4 * GB) is not None  # 6 + 4 fits
    adm.release(a)
    assert adm.in_use() == 4 * GB


def test_a_trial_larger_than_the_gpu_still_runs_alone_and_max_trials_caps_packing():
    adm = GpuAdmission(10 * GB, probe=False, max_trials=2)
    big = adm.try_acquire(("big",), 40 * GB)
    assert big is not None and adm.try_acquire(("small",), 1) is None
    adm.release(big)
    assert adm.try_acquire(("s",), 1) is not None and adm.try_acquire(("s",), 1) is not None
    assert adm.try_acquire(("s",), 1) is None  # n_jobs caps it


def test_waiting_trials_start_when_memory_is_released():
    adm = GpuAdmission(10 * GB, probe=False)
    held = adm.try_acquire(("x",), 8 * GB)
    started = []

    def waiter():
        started.append(adm.acquire(("y",), 5 * GB, timeout=10))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    assert not started  # waiting for memory
    adm.release(held)
    t.join(5)
    assert started and started[0] is not None
    assert adm.acquire(("z",), 9 * GB, timeout=0.1) is None  # times out while 5 GB are held


def test_memory_estimate_grows_with_what_costs_memory(feature_cache, digits):
    from autoft.core import TrialConfig

    base = dict(params=25_000_000, trainable=5_000_000, batch_size=64, activation_per_example=4_000_000)
    fp32 = estimate_trial_bytes(**base)
    assert estimate_trial_bytes(**base, precision="bf16") < fp32
    assert estimate_trial_bytes(**{**base, "batch_size": 128}) > fp32
    assert estimate_trial_bytes(**{**base, "trainable": 20_000_000}) > fp32
    assert estimate_trial_bytes(**base, optimizer="sgd") < fp32
    # from a configuration: deeper unfreezing and bigger batches need more
    est = [gpu.estimate_for(TrialConfig(backbone="resnet20", unfreeze=u, batch_size=b), feature_cache, digits)
           for u, b in ((0, 32), (3, 32), (3, 128))]
    assert est[0] < est[1] < est[2]


def test_packed_trials_measure_and_release(feature_cache, digits):
    """PackedTrials on the CPU: PeakMemory reads 0 off CUDA, so nothing is remembered, and the slot is freed."""
    from autoft.core import TrialConfig

    packed = gpu.PackedTrials(GpuAdmission(10 * GB), "cpu")
    cfg = TrialConfig(backbone="resnet20", unfreeze=1)

    class Rep:
        pass

    rep = Rep()
    with packed.run(cfg, feature_cache, digits, rep) as ticket:
        assert ticket in packed.admission.running and packed.admission.running[ticket].probing
        rep.on_first_steps()
        assert not packed.admission.running[ticket].probing
    assert not packed.admission.running and not packed.admission.known


def test_optuna_objective_packs_only_on_cuda_with_several_jobs(digits_search, tmp_path):
    from autoft.engines.base import Execution, build_request
    from autoft.engines.optuna_engine import gpu_packing

    task, td = digits_search
    req = build_request(task, overrides={"backbone": ["resnet20"]}, results_dir=tmp_path,
                        execution=Execution(n_jobs=4))
    assert gpu_packing(req, td) is None  # the CPU: threads as before
    if torch.cuda.is_available():
        assert gpu_packing(req, dataclasses.replace(td, device="cuda")) is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
