"""The core on every device (cpu, cuda) and in every precision: the same code paths, the same checks.

The CUDA cases skip on a machine without a GPU ("no CUDA GPU on this machine"); on the CPU, bf16 runs
through ``torch.autocast("cpu", dtype=torch.bfloat16)`` and fp16 through autocast plus the gradient
scaler, so those paths are exercised here too.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
from autoft.core.cache import compute_prefix
from autoft.core.model import Classifier
from autoft.core.precision import autocast, channels_last, grad_scaler, resolve_precision
from autoft.errors import ConfigError
from autoft.zoo.base import text_mask

NO_CUDA = "no CUDA GPU on this machine"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]

CFG = dict(backbone="resnet20", lr=1e-3, epochs=1, batch_size=32, seed=0)
# The text encoder of the text-on-the-device test: MiniLM, or (on a lent GPU machine that cannot carry its 88 MB
# of weights) a folder with MiniLM's config and tokenizer and random weights: benchmarks/gpu_checks.sh makes one.
TEXT_BACKBONE = os.environ.get("AUTOFT_TEST_TEXT_BACKBONE", "minilm")


def on(task, device):
    return dataclasses.replace(task, device=device)


def loss_tol(device: str, cpu: float) -> float:
    """How close the cached and uncached training losses must be. On the CPU the same kernels run either way; on
    CUDA the frozen prefix is computed in other batch shapes than the training steps use, so cuDNN (autotuned,
    TF32 convolutions by default) picks other algorithms: losses agree to ~3e-4 (measured on an H100), scores
    exactly."""
    return cpu if device == "cpu" else 2e-3


# --- precision resolution --------------------------------------------------------------------------

def test_auto_precision_is_fp32_on_the_cpu_and_explicit_choices_are_kept():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, "cpu") == "fp32"
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, "cpu") == p
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    assert TrialConfig(backbone="resnet20").precision == "auto"
    with pytest.raises(Exception):
        TrialConfig(backbone="resnet20", precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_auto_precision_on_cuda_is_bf16_where_native():
    major = torch.cuda.get_device_capability()[0]
    assert resolve_precision("auto", "cuda") == ("bf16" if major >= 8 else "fp32")


def test_scaler_only_for_fp16_and_channels_last_only_for_images_on_cuda(feature_cache):
    assert grad_scaler("cpu", "fp16").is_enabled()
    assert not grad_scaler("cpu", "bf16").is_enabled() and not grad_scaler("cpu", "fp32").is_enabled()
    bb = feature_cache.backbone("resnet20")
    assert not channels_last(bb, "cpu")
    assert channels_last(bb, "cuda")  # decided from the device and modality only


# --- correct on the device ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unfreeze", [0, 2])
def test_cached_and_uncached_agree_on_the_device(small_digits_task, device, unfreeze):
    cache = FeatureCache(disk=False)
    task = on(small_digits_task, device)
    cfg = {**CFG, "unfreeze": unfreeze, "precision": "fp32"}
    cached = fine_tune_and_score(cfg, task, cache=cache, use_cache=True, return_model=True)
    uncached = fine_tune_and_score(cfg, task, cache=cache, use_cache=False)
    assert cached.score == pytest.approx(uncached.score, abs=1e-5)
    assert cached.history[0]["train_loss"] == pytest.approx(uncached.history[0]["train_loss"],
                                                            abs=loss_tol(device, 1e-4))
    # the returned model is a plain CPU float32 model (what export and predict take)
    p = next(cached.model.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    assert all(t.is_contiguous() for t in cached.model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_entries_are_float32_computed_on_the_device(small_digits_task, device):
    cache = FeatureCache(disk=False)
    bb = cache.backbone("resnet20").set_unfreeze(2)
    encoded, digest = cache.encoded(small_digits_task.data, bb.preprocessing)
    rows = torch.arange(40)
    with autocast(device, "bf16"):  # even inside a bf16 region the cached features are float32
        out = cache.prefix(bb, encoded, digest, bb.split, device, rows=rows)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    ref = compute_prefix(cache.backbone("resnet20").set_unfreeze(2), encoded[:40], bb.split, device)
    assert torch.equal(out, ref)
    assert next(bb.parameters()).device.type == torch.device(device).type  # the backbone went to the device


@pytest.mark.parametrize("device", DEVICES)
def test_text_prefix_pads_on_the_device(sms_small, device):
    """MiniLM's frozen prefix keeps text states at the full padded width: padding on the device."""
    from autoft.data import stratified_split
    from autoft.core import TaskData

    splits = stratified_split(sms_small.labels, val=0.25, test=0.25, seed=0, source="sms")
    task = TaskData(sms_small, splits, metric="f1_pos", positive_index=sms_small.class_names.index("spam"),
                    device=device, name="sms")
    cache = FeatureCache(disk=False)
    cfg = dict(backbone=TEXT_BACKBONE, unfreeze=1, lr=5e-5, head_lr_mult=100, epochs=1, batch_size=16, seed=0,
               precision="fp32")
    cached = fine_tune_and_score(cfg, task, cache=cache, use_cache=True)
    uncached = fine_tune_and_score(cfg, task, cache=cache, use_cache=False)
    assert cached.score == pytest.approx(uncached.score, abs=1e-5)
    bb = cache.backbone(TEXT_BACKBONE).set_unfreeze(1)
    encoded, _ = cache.encoded(sms_small, bb.preprocessing)
    out = compute_prefix(bb, tuple(t[:8] for t in encoded), bb.split, device)
    assert isinstance(out, tuple) and out[0].shape[1] == encoded[1].shape[1] and text_mask(out) is not None


# --- mixed precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_stays_close_to_fp32(small_digits_task, device, precision):
    cache = FeatureCache(disk=False)
    task = on(small_digits_task, device)
    cfg = {**CFG, "unfreeze": 2, "epochs": 2}
    ref = fine_tune_and_score({**cfg, "precision": "fp32"}, task, cache=cache)
    amp = fine_tune_and_score({**cfg, "precision": precision}, task, cache=cache, return_model=True)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in amp.history)
    # not bit-exact (autocast rounds the trainable part), but the same fit
    assert amp.history[0]["train_loss"] == pytest.approx(ref.history[0]["train_loss"], rel=0.05)
    assert amp.score == pytest.approx(ref.score, abs=0.1)
    assert amp.history[0]["train_loss"] != ref.history[0]["train_loss"]  # autocast did run
    assert next(amp.model.parameters()).dtype == torch.float32  # weights stay float32


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_cached_and_uncached_agree(small_digits_task, device):
    """The frozen prefix runs in float32 with or without the cache, so the cache stays exact under autocast."""
    cache = FeatureCache(disk=False)
    task = on(small_digits_task, device)
    cfg = {**CFG, "unfreeze": 2, "precision": "bf16"}
    a = fine_tune_and_score(cfg, task, cache=cache, use_cache=True)
    b = fine_tune_and_score(cfg, task, cache=cache, use_cache=False)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], abs=loss_tol(device, 1e-5))
    assert a.score == pytest.approx(b.score, abs=1e-5)


def test_fp32_default_on_cpu_is_todays_computation(small_digits_task, feature_cache):
    """precision auto on the CPU is fp32: the same numbers, bit for bit, as asking for fp32."""
    cfg = {**CFG, "unfreeze": 1}
    a = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache)
    b = fine_tune_and_score({**cfg, "precision": "fp32"}, small_digits_task, cache=feature_cache)
    assert a.history == b.history and a.metrics == b.metrics


@pytest.mark.parametrize("device", DEVICES)
def test_forward_from_runs_frozen_stages_in_float32_under_autocast(feature_cache, device):
    from autoft.core.model import build_head

    bb = feature_cache.backbone("resnet20").set_unfreeze(1).to(device)
    model = Classifier(bb, build_head(bb.feature_dim, 10, TrialConfig(backbone="resnet20"))).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    seen = []
    h = bb.stages[bb.split - 1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), autocast(device, "bf16"):
        model.forward_from(x, 0)
    h.remove()
    assert seen == [torch.float32]


# --- export and predict on the device ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_exported_program_predicts_on_the_device_like_the_cpu_model(feature_cache, tmp_path, device):
    from autoft.core.model import build_head
    from autoft.export.export import DEVICE_ATOL, _export_pt2, dynamic_shapes, wrap
    from autoft.export.runtime import _Pt2Backend

    torch.manual_seed(0)
    bb = feature_cache.backbone("resnet20").set_unfreeze(0)
    model = Classifier(bb, build_head(bb.feature_dim, 10, TrialConfig(backbone="resnet20"))).eval()
    net = wrap(model, "image")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = net(x).numpy()
    path = tmp_path / "model.pt2"
    _export_pt2(net, (x,), dynamic_shapes("image", bb.preprocessing), path)
    out = _Pt2Backend(path, device)((x,))
    tol = 1e-4 if device == "cpu" else DEVICE_ATOL
    assert abs(out - ref).max() <= tol


# --- the training input on the GPU, the loss read once an epoch ---------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_in_memory_input_is_indexed_on_the_gpu_with_the_same_result(small_digits_task, monkeypatch):
    task = on(small_digits_task, "cuda")
    cfg = {**CFG, "unfreeze": 1, "precision": "fp32"}
    resident = fine_tune_and_score(cfg, task, cache=FeatureCache(disk=False))
    assert resident.data["mode"] == "on the device"
    monkeypatch.setenv("AUTOFT_GPU_RESIDENT", "0")
    host = fine_tune_and_score(cfg, task, cache=FeatureCache(disk=False))
    assert host.data["mode"] == "in memory"
    assert resident.history[0]["train_loss"] == pytest.approx(host.history[0]["train_loss"], abs=loss_tol("cuda", 0))
    assert resident.score == pytest.approx(host.score, abs=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_loss_fails_the_trial_naming_its_step(small_digits_task, device):
    """On CUDA the loss is checked once an epoch (no wait per step): the failure still names the first bad step."""
    import re

    from autoft.errors import TrialFailed

    cfg = dict(backbone="resnet20", unfreeze=1, lr=1e6, optimizer="sgd", epochs=3, batch_size=32, precision="fp32")
    with pytest.raises(TrialFailed) as err:
        fine_tune_and_score(cfg, on(small_digits_task, device), cache=FeatureCache(disk=False))
    assert re.search(r"loss became (nan|inf|-inf) at epoch 1, step \d+ \(lr=1e\+06", str(err.value)), str(err.value)
