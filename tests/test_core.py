"""The core: fine-tune one configuration and score it; the reporter protocol; the exact cache."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoft.core import FeatureCache, NullReporter, StopAfter, TaskData, TrialConfig, fine_tune_and_score
from autoft.core.metrics import compute_metrics
from autoft.core.model import Classifier
from autoft.data import encode, stratified_split
from autoft.errors import ConfigError, TrialFailed

HEAD_ONLY = dict(backbone="resnet20", unfreeze=0, lr=1e-3, epochs=3, batch_size=32, seed=0)


# --- the reporter protocol -------------------------------------------------------------------------

def test_reporter_that_asks_to_stop_stops_training(small_digits_task, feature_cache):
    reporter = StopAfter(2)
    result = fine_tune_and_score({**HEAD_ONLY, "epochs": 6}, small_digits_task, reporter, cache=feature_cache)
    assert result.epochs_run == 2
    assert len(result.history) == 2
    assert result.stopped_early
    assert [step for step, _ in reporter.history] == [1, 2]
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.score == reporter.history[-1][1] == result.history[-1]["accuracy"]


def test_reporter_sees_every_epoch(small_digits_task, feature_cache):
    reporter = NullReporter()
    result = fine_tune_and_score(HEAD_ONLY, small_digits_task, reporter, cache=feature_cache)
    assert result.epochs_run == 3 and not result.stopped_early
    assert [v for _, v in reporter.history] == [h["accuracy"] for h in result.history]
    assert result.best_score == max(v for _, v in reporter.history)
    assert result.history[result.best_epoch - 1]["accuracy"] == result.best_score
    # asking to stop after the last epoch is not an early stop
    assert not fine_tune_and_score(HEAD_ONLY, small_digits_task, StopAfter(3), cache=feature_cache).stopped_early


# --- metrics ------------------------------------------------------------------------------------------

def _logits_for(preds, num_classes):
    logits = torch.zeros(len(preds), num_classes)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 2.0
    return logits


def test_multiclass_metrics_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = [0, 1, 1, 1, 2, 0]
    logits = _logits_for(preds, 3)
    m = compute_metrics(logits, target, 3)
    # per class (precision, recall, f1): 0 → (1/2, 1/2, 1/2); 1 → (2/3, 1, 4/5); 2 → (1, 1/2, 2/3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # cross-entropy: right class has logit 2 of (2, 0, 0) on 4 examples, logit 0 on 2
    p_right, p_wrong = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    assert m["loss"] == pytest.approx(-(4 * math.log(p_right) + 2 * math.log(p_wrong)) / 6, rel=1e-6)
    assert not {"f1_pos", "precision_pos", "recall_pos", "auroc"} & set(m)


def test_multiclass_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=gen)
    target = torch.randint(0, 5, (200,), generator=gen)
    target[:3] = 4
    logits[:, 3] -= 10  # class 3 is never predicted: precision 0/0 counts as 0
    m = compute_metrics(logits, target, 5)
    y, p = target.numpy(), logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["precision_macro"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(y, p, average="macro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)


def test_binary_metrics_by_hand():
    from sklearn.metrics import f1_score, roc_auc_score

    target = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    z = torch.tensor([2.0, 1.0, -1.0, -2.0, 0.5, -3.0, -0.5, 3.0])  # logit of class 1 (class 0 has 0)
    logits = torch.stack([torch.zeros_like(z), z], 1)
    m = compute_metrics(logits, target, 2)
    # predictions 1,1,0,0,1,0,0,1: tp=3, fn=1, fp=1, tn=3
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision_pos"] == pytest.approx(3 / 4)
    assert m["recall_pos"] == pytest.approx(3 / 4)
    assert m["f1_pos"] == pytest.approx(3 / 4)
    # 14 of the 16 (positive, negative) pairs are ranked correctly
    assert m["auroc"] == pytest.approx(14 / 16)
    assert m["auroc"] == pytest.approx(roc_auc_score(target.numpy(), z.numpy()))

    # positive class 0 instead: everything is computed for class 0
    target0 = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1])  # two examples of class 0
    m0 = compute_metrics(logits, target0, 2, positive_index=0)
    y0, p0 = (target0 == 0).numpy(), (logits.argmax(1) == 0).numpy()
    assert m0["f1_pos"] == pytest.approx(f1_score(y0, p0))
    assert m0["recall_pos"] == pytest.approx(1 / 2)  # of the two class-0 examples, one is predicted 0
    assert m0["precision_pos"] == pytest.approx(1 / 4)  # 4 predicted 0, one of them right
    assert m0["auroc"] == pytest.approx(roc_auc_score(y0, -z.numpy()))


def test_auroc_undefined_with_one_class_present():
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    m = compute_metrics(logits, torch.tensor([1, 1]), 2)
    assert math.isnan(m["auroc"]) and m["accuracy"] == 1.0


# --- the frozen-prefix cache is exact ------------------------------------------------------------------

@pytest.mark.parametrize("unfreeze", [0, 3, 10])
def test_cached_and_uncached_give_the_same_scores(small_digits_task, feature_cache, unfreeze):
    cfg = dict(backbone="resnet20", unfreeze=unfreeze, lr=1e-3, epochs=1, batch_size=32, seed=0)
    if unfreeze == 10:
        assert feature_cache.backbone("resnet20").num_stages == 10  # every stage trained
    cached = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache, use_cache=True)
    uncached = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache, use_cache=False)
    assert cached.score == pytest.approx(uncached.score, abs=1e-5)
    for key in ("loss", "f1_macro"):
        assert cached.metrics[key] == pytest.approx(uncached.metrics[key], abs=1e-5)
    assert cached.history[0]["train_loss"] == pytest.approx(uncached.history[0]["train_loss"], abs=1e-5)


def test_prefix_is_computed_once(small_digits_task):
    cache = FeatureCache(disk=False)
    cfg = dict(backbone="resnet20", unfreeze=2, epochs=1, batch_size=64, seed=0)
    fine_tune_and_score(cfg, small_digits_task, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    fine_tune_and_score({**cfg, "lr": 3e-3, "seed": 1}, small_digits_task, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    fine_tune_and_score({**cfg, "unfreeze": 1}, small_digits_task, cache=cache)  # another split point
    assert cache.misses == 2


def test_same_seed_same_result(small_digits_task, feature_cache):
    cfg = dict(backbone="resnet20", unfreeze=1, lr=1e-3, epochs=2, batch_size=32, seed=3, dropout=0.2)
    a = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache)
    b = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache)
    assert a.history == b.history
    assert a.metrics == b.metrics
    c = fine_tune_and_score({**cfg, "seed": 4, "epochs": 1}, small_digits_task, cache=feature_cache)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


# --- failures -----------------------------------------------------------------------------------

def test_nan_loss_fails_the_trial(small_digits_task, feature_cache):
    cfg = dict(backbone="resnet20", unfreeze=1, lr=1e6, optimizer="sgd", epochs=3, batch_size=32)
    with pytest.raises(TrialFailed) as err:
        fine_tune_and_score(cfg, small_digits_task, cache=feature_cache)
    msg = str(err.value)
    assert re.search(r"loss became (nan|inf) at epoch \d+, step \d+", msg), msg
    assert "lr=1e+06" in msg and "lower learning rate" in msg


def test_infinite_loss_fails_the_trial(small_digits_task, feature_cache, monkeypatch):
    import autoft.core.losses as losses  # the trial's criterion (autoft.core.losses.build_criterion)

    calls, real_cross_entropy = [], F.cross_entropy

    def exploding(logits, target, **kw):
        calls.append(1)
        loss = real_cross_entropy(logits, target, **kw)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(losses.F, "cross_entropy", exploding)
    with pytest.raises(TrialFailed, match=r"loss became inf at epoch 1, step 3"):
        fine_tune_and_score(HEAD_ONLY, small_digits_task, cache=feature_cache)


def test_unfreeze_beyond_the_backbone_is_a_config_error(small_digits_task, feature_cache):
    with pytest.raises(ConfigError) as err:
        fine_tune_and_score({**HEAD_ONLY, "unfreeze": 11}, small_digits_task, cache=feature_cache)
    assert err.value.field == "unfreeze"
    assert "resnet20" in str(err.value) and "10 stages" in str(err.value) and "0..10" in str(err.value)


def test_trial_config_validates_fields():
    with pytest.raises(ValueError):
        TrialConfig(backbone="resnet20", unfreeze=-1)
    with pytest.raises(ValueError):
        TrialConfig(backbone="resnet20", optimizer="rmsprop")
    with pytest.raises(ValueError):
        TrialConfig(backbone="resnet20", learning_rate=0.1)  # unknown field
    assert TrialConfig(backbone="resnet20", lr=1e-3, head_lr_mult=5).head_lr == pytest.approx(5e-3)


# --- test split and the returned model ---------------------------------------------------------------

def test_test_metrics_and_returned_model(digits, small_digits_task, feature_cache):
    cfg = dict(backbone="resnet20", unfreeze=1, head="mlp", head_width=32, lr=1e-3, epochs=2, batch_size=16,
               seed=0)
    result = fine_tune_and_score(cfg, small_digits_task, cache=feature_cache, test=True, return_model=True)
    assert set(result.test_metrics) >= {"accuracy", "f1_macro", "loss"}
    assert result.test_metrics["accuracy"] > 0.3  # well above chance (0.1) after 26 steps
    model = result.model
    assert isinstance(model, Classifier) and not model.training
    # the returned model, run end to end on raw encoded inputs, reproduces the validation accuracy
    val = small_digits_task.splits.val
    x = encode([digits.inputs[i] for i in val], model.backbone.preprocessing)
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == digits.labels[val]).mean())
    assert acc == pytest.approx(result.metrics["accuracy"], abs=1e-6)
    assert "model" not in result.to_dict() and result.to_dict()["epochs_run"] == 2


# --- text ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sms_task(sms_small) -> TaskData:
    splits = stratified_split(sms_small.labels, val=0.25, test=0.25, seed=0, source="sms")
    return TaskData(sms_small, splits, metric="f1_pos", positive_index=sms_small.class_names.index("spam"),
                    name="sms-small")


def test_minilm_text_run_end_to_end(sms_task, feature_cache):
    cfg = dict(backbone="minilm", unfreeze=1, lr=5e-5, head_lr_mult=100, epochs=2, batch_size=16, seed=0)
    reporter = NullReporter()
    result = fine_tune_and_score(cfg, sms_task, reporter, cache=feature_cache, test=True)
    assert result.epochs_run == 2 and len(reporter.history) == 2
    assert {"f1_pos", "precision_pos", "recall_pos", "auroc", "accuracy"} <= set(result.metrics)
    assert result.score == result.metrics["f1_pos"]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.metrics["auroc"] > 0.9  # MiniLM features separate spam even after two short epochs
    assert result.test_metrics is not None and 0 <= result.test_metrics["f1_pos"] <= 1


def test_minilm_cached_and_uncached_agree(sms_task, feature_cache):
    cfg = dict(backbone="minilm", unfreeze=1, lr=5e-5, head_lr_mult=100, epochs=1, batch_size=16, seed=0)
    cached = fine_tune_and_score(cfg, sms_task, cache=feature_cache, use_cache=True)
    uncached = fine_tune_and_score(cfg, sms_task, cache=feature_cache, use_cache=False)
    assert cached.score == pytest.approx(uncached.score, abs=1e-5)
    assert cached.metrics["loss"] == pytest.approx(uncached.metrics["loss"], abs=1e-4)
    assert cached.history[0]["train_loss"] == pytest.approx(uncached.history[0]["train_loss"], abs=1e-4)


# --- text batches bucketed by length -----------------------------------------------------------------

def test_text_batches_cover_every_example_once_and_pad_little():
    from autoft.core.train import epoch_batches

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 65, (1000,), generator=gen)
    perm = torch.randperm(1000, generator=gen)
    batches = epoch_batches(perm, 16, lengths, torch.Generator().manual_seed(1))
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(1000))  # each example exactly once
    assert all(len(b) <= 16 for b in batches)
    # padded tokens (to each batch's longest example) are far fewer than with plain shuffled batches
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    plain = sum(int(lengths[perm[i:i + 16]].max()) * len(perm[i:i + 16]) for i in range(0, 1000, 16))
    assert padded < 0.7 * plain
    # deterministic for a generator seed; images (no lengths) keep the shuffled order
    again = epoch_batches(perm, 16, lengths, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert torch.equal(torch.cat(epoch_batches(perm, 16, None, gen)), perm)
