"""Training losses (autoft.core.losses): ce unchanged, class weights from the training rows only, focal loss
checked by hand, real head-only runs on SMS spam with each loss, and the text space's conditional sampling."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

import autoft.core.train as train_mod
from autoft.core import TaskData, TrialConfig, fine_tune_and_score
from autoft.core.losses import build_criterion, class_weights, focal_loss
from autoft.data import Splits, stratified_split
from autoft.space import load_space
from autoft.task import BUILTIN_SPACES

HEAD_ONLY = {"backbone": "minilm", "unfreeze": 0, "head": "linear", "lr": 3e-3, "head_lr_mult": 10.0,
             "batch_size": 32, "epochs": 1, "seed": 0}


@pytest.fixture(scope="module")
def sms_task(sms_small) -> TaskData:
    splits = stratified_split(sms_small.labels, val=0.25, test=0.25, seed=0, source="sms")
    return TaskData(sms_small, splits, metric="f1_pos", positive_index=sms_small.class_names.index("spam"),
                    name="sms-small")


def _batch(seed=0, n=16, c=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_default_is_ce_and_the_criterion_is_the_old_loss_bit_for_bit():
    assert TrialConfig(backbone="minilm").loss == "ce"
    logits, y = _batch()
    for eps in (0.0, 0.1):
        crit = build_criterion(TrialConfig(backbone="minilm", label_smoothing=eps), y, 3)
        assert torch.equal(crit(logits, y), F.cross_entropy(logits, y, label_smoothing=eps))


def test_ce_run_is_bit_identical_to_the_old_loss_line(sms_task, feature_cache, monkeypatch):
    """A whole run with loss=ce equals one whose criterion is the pre-existing loss line, exactly."""
    cfg = {**HEAD_ONLY, "epochs": 2, "label_smoothing": 0.05}
    new = fine_tune_and_score(cfg, sms_task, cache=feature_cache)
    monkeypatch.setattr(train_mod, "build_criterion", lambda c, *a: (
        lambda logits, yb: F.cross_entropy(logits, yb, label_smoothing=c.label_smoothing)))
    old = fine_tune_and_score(cfg, sms_task, cache=feature_cache)
    assert [h["train_loss"] for h in new.history] == [h["train_loss"] for h in old.history]
    assert new.metrics == old.metrics


def test_class_weights_formula():
    w = class_weights(torch.tensor([0] * 90 + [1] * 10), 2)  # w_c = C (1/n_c) / sum_k (1/n_k)
    inv = np.array([1 / 90, 1 / 10])
    assert w.tolist() == pytest.approx((2 * inv / inv.sum()).tolist())
    assert w.mean().item() == pytest.approx(1.0) and w[1] / w[0] == pytest.approx(9.0)
    balanced = class_weights(torch.tensor([0, 1, 2] * 5), 3)
    assert balanced.tolist() == pytest.approx([1.0, 1.0, 1.0])  # balanced task: weighted == ce
    absent = class_weights(torch.tensor([0, 0, 1]), 3)  # class 2 has no training row: counted as 1
    assert torch.isfinite(absent).all()


def test_weighted_uses_the_training_split_only(sms_small, feature_cache, monkeypatch):
    """Class weights come from the training rows: val and test with other class mixes change nothing."""
    labels, spam = sms_small.labels, sms_small.class_names.index("spam")
    rng = np.random.default_rng(0)
    s_idx, h_idx = rng.permutation(np.flatnonzero(labels == spam)), rng.permutation(np.flatnonzero(labels != spam))
    train = np.sort(np.concatenate([s_idx[:10], h_idx[:90]]))  # 10 % spam
    rest_s, rest_h = s_idx[10:], h_idx[90:]  # 50 spam, 50 ham left

    def task(val, test):
        return TaskData(sms_small, Splits(train, np.sort(val), np.sort(test)), metric="f1_pos", positive_index=spam)

    a = task(np.concatenate([rest_s[:40], rest_h[:10]]), np.concatenate([rest_s[40:], rest_h[10:]]))  # val 80 % spam
    b = task(np.concatenate([rest_s[:10], rest_h[:40]]), np.concatenate([rest_s[10:], rest_h[40:]]))  # val 20 % spam
    seen = []
    real = train_mod.build_criterion

    def spy(cfg, train_labels, num_classes, device):
        seen.append(train_labels.clone())
        return real(cfg, train_labels, num_classes, device)

    monkeypatch.setattr(train_mod, "build_criterion", spy)
    cfg = {**HEAD_ONLY, "loss": "weighted", "epochs": 2}
    ra, rb = (fine_tune_and_score(cfg, t, cache=feature_cache, test=True) for t in (a, b))
    assert seen[0].tolist() == seen[1].tolist() == labels[train].tolist()
    inv = np.array([1 / 90, 1 / 10]) if spam == 1 else np.array([1 / 10, 1 / 90])
    assert class_weights(seen[0], 2).tolist() == pytest.approx((2 * inv / inv.sum()).tolist())
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]


def test_weighted_criterion_matches_torch_weighted_ce():
    logits, y = _batch(1)
    train_labels = torch.tensor([0] * 20 + [1] * 5 + [2] * 2)
    cfg = TrialConfig(backbone="minilm", loss="weighted", label_smoothing=0.1)
    w = class_weights(train_labels, 3)
    assert build_criterion(cfg, train_labels, 3)(logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y, weight=w, label_smoothing=0.1).item(), abs=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_focal_with_gamma_zero_is_ce(eps):
    logits, y = _batch(2, n=64, c=5)
    cfg = TrialConfig(backbone="minilm", loss="focal", focal_gamma=0.0, label_smoothing=eps)
    focal = build_criterion(cfg, y, 5)(logits, y)
    assert focal.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=eps).item(), abs=1e-6)
    assert focal_loss(logits, y, 0.0, eps).item() == pytest.approx(focal.item(), abs=1e-7)


def test_focal_down_weights_easy_examples_by_hand():
    # two examples of class 0: an easy one (logit margin 4) and a hard one (margin 0.5), gamma 2
    logits, y = torch.tensor([[4.0, 0.0], [0.5, 0.0]]), torch.tensor([0, 0])
    p_easy, p_hard = 1 / (1 + math.exp(-4.0)), 1 / (1 + math.exp(-0.5))  # 0.98201, 0.62246
    fl_easy = (1 - p_easy) ** 2 * -math.log(p_easy)  # 3.2e-4 * 0.01815 = 5.86e-6
    fl_hard = (1 - p_hard) ** 2 * -math.log(p_hard)  # 0.14254 * 0.47408 = 0.06758
    assert focal_loss(logits[:1], y[:1], 2.0).item() == pytest.approx(fl_easy, rel=1e-5)
    assert focal_loss(logits[1:], y[1:], 2.0).item() == pytest.approx(fl_hard, rel=1e-5)
    assert focal_loss(logits, y, 2.0).item() == pytest.approx((fl_easy + fl_hard) / 2, rel=1e-5)
    # relative to ce, the easy example is scaled by (1-p)^2 = 3.2e-4, the hard one by 0.143
    ce = F.cross_entropy(logits, y, reduction="none")
    assert fl_easy / ce[0].item() == pytest.approx((1 - p_easy) ** 2, rel=1e-5)
    assert fl_easy / ce[0].item() < 0.01 * fl_hard / ce[1].item()


def test_focal_gradient_is_finite_in_low_precision_logits():
    logits, y = _batch(3)
    logits = logits.to(torch.bfloat16).requires_grad_()
    loss = focal_loss(logits, y, 2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("loss,extra", [("ce", {}), ("weighted", {}), ("focal", {"focal_gamma": 2.0}),
                                        ("focal", {"focal_gamma": 1.0, "label_smoothing": 0.1}),
                                        ("weighted", {"label_smoothing": 0.1})])
def test_real_head_only_run_on_sms_spam(sms_task, feature_cache, loss, extra):
    res = fine_tune_and_score({**HEAD_ONLY, "loss": loss, **extra}, sms_task, cache=feature_cache, test=True)
    assert res.epochs_run == 1 and math.isfinite(res.history[0]["train_loss"])
    assert 0.0 <= res.score <= 1.0 and "f1_pos" in res.test_metrics


def test_losses_differ_and_weighted_raises_spam_recall(sms_task, feature_cache):
    """The options really change training: on 30 % spam the weighted loss does not lower spam recall."""
    cfg = {**HEAD_ONLY, "epochs": 3}
    runs = {loss: fine_tune_and_score({**cfg, "loss": loss}, sms_task, cache=feature_cache)
            for loss in ("ce", "weighted", "focal")}
    losses = {k: r.history[0]["train_loss"] for k, r in runs.items()}
    assert len(set(losses.values())) == 3
    assert runs["weighted"].metrics["recall_pos"] >= runs["ce"].metrics["recall_pos"]


def test_bad_loss_is_rejected_naming_the_field():
    with pytest.raises(Exception, match="loss"):
        TrialConfig(backbone="minilm", loss="hinge")
    with pytest.raises(Exception, match="focal_gamma"):
        TrialConfig(backbone="minilm", loss="focal", focal_gamma=-1)


def test_text_space_samples_loss_and_gamma_only_for_focal():
    space = load_space(BUILTIN_SPACES / "text_minilm.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        t = study.ask()
        cfg = space.sample(t, {"seed": 0})
        study.tell(t, 0.0)
        seen.add(cfg.loss)
        assert "loss" in t.params
        assert ("focal_gamma" in t.params) == (cfg.loss == "focal")
        if cfg.loss == "focal":
            assert 0.5 <= cfg.focal_gamma <= 3.0
    assert seen == {"ce", "weighted", "focal"}
    # an image space that does not declare it keeps ce
    img = load_space(BUILTIN_SPACES / "cifar_resnets.yaml")
    t = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert img.sample(t).loss == "ce" and "loss" not in t.params


def test_loss_is_in_the_trials_table_and_the_config_round_trip():
    import yaml

    from autoft.results.tables import trial_row
    from autoft.study.record import ATTR_CONFIG

    cfg = TrialConfig(backbone="minilm", loss="focal", focal_gamma=1.5)
    assert TrialConfig(**yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg  # best.yaml / export refit
    t = optuna.trial.create_trial(params={}, distributions={}, value=0.9,
                                  user_attrs={ATTR_CONFIG: cfg.model_dump()})
    row = trial_row(t)
    assert row["cfg_loss"] == "focal" and row["cfg_focal_gamma"] == 1.5
