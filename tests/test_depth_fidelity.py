"""Depth as a fidelity (issue 17, item 2): ``head_first`` epochs train the head alone on the cached pooled
features, then the configured depth trains for the other epochs, warm-started from that head."""
from __future__ import annotations

import optuna
import pytest
import torch

from autoft.core import FeatureCache, NullReporter, StopAfter, TrialConfig, fine_tune_and_score
from autoft.core import train as train_mod
from autoft.core.model import Classifier
from autoft.errors import ConfigError

CFG = dict(backbone="resnet20", unfreeze=1, lr=3e-3, head_lr_mult=3.0, epochs=4, head_first=2, batch_size=32, seed=0)


@pytest.fixture
def starts(monkeypatch):
    """The ``start`` stage of every forward pass (num_stages + 1 = the cached pooled features)."""
    seen: list[int] = []
    orig = Classifier.forward_from

    def spy(self, state, start):
        seen.append(int(start))
        return orig(self, state, start)

    monkeypatch.setattr(Classifier, "forward_from", spy)
    return seen


@pytest.fixture
def phases(monkeypatch):
    """Each training run: its configuration, the head it was given (a copy at entry, and the module) and that
    head when the run ended (a copy)."""
    calls: list[dict] = []
    orig = train_mod._fine_tune

    def spy(cfg, task, reporter, **kw):
        head = kw.get("head")
        entry = {"cfg": cfg, "head_in": None if head is None else {k: v.clone() for k, v in head.state_dict().items()},
                 "head_obj": head}
        calls.append(entry)
        res = orig(cfg, task, reporter, **kw)
        if head is not None:
            entry["head_out"] = {k: v.clone() for k, v in head.state_dict().items()}
        return res

    monkeypatch.setattr(train_mod, "_fine_tune", spy)
    return calls


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_only_epochs_use_the_cached_pooled_features_and_leave_the_backbone(small_digits_task, starts):
    cache = FeatureCache(disk=False)
    pristine = {k: v.clone() for k, v in cache.backbone("resnet20").state_dict().items()}  # weights and BN stats
    res = fine_tune_and_score(CFG, small_digits_task, StopAfter(2), cache=cache, return_model=True)
    assert res.epochs_run == 2 and res.stopped_early
    pooled = cache.backbone("resnet20").num_stages + 1
    assert starts and set(starts) == {pooled}  # no pass through a backbone stage, training or validation
    assert _same(pristine, res.model.backbone.state_dict())  # nothing of the backbone changed (BN statistics too)
    # the only prefix computed is the whole backbone's (split = num_stages): the deeper one was never needed
    assert len(cache._prefix) == 1


def test_head_only_phase_is_exactly_an_unfreeze_0_run(small_digits_task, feature_cache):
    both = fine_tune_and_score(CFG, small_digits_task, cache=feature_cache)
    probe = fine_tune_and_score({**CFG, "unfreeze": 0, "epochs": 2, "head_first": 0}, small_digits_task,
                                cache=feature_cache)
    assert both.history[:2] == probe.history


def test_promotion_warm_starts_the_head(small_digits_task, feature_cache, phases, starts):
    res = fine_tune_and_score(CFG, small_digits_task, cache=feature_cache, return_model=True)
    assert len(phases) == 2
    first, second = phases
    assert (first["cfg"].unfreeze, first["cfg"].epochs) == (0, 2)
    assert (second["cfg"].unfreeze, second["cfg"].epochs) == (1, 2)
    assert second["head_obj"] is first["head_obj"]
    assert _same(second["head_in"], first["head_out"])  # the deep phase starts from the trained head ...
    assert not _same(second["head_in"], first["head_in"])  # ... which training changed (not a re-initialised one)
    assert res.model.head is first["head_obj"]
    # the head-only phase starts from the same initial head as a run without head_first
    torch.manual_seed(CFG["seed"])
    fresh = train_mod.build_head(64, 10, TrialConfig(**CFG))
    assert _same(first["head_in"], fresh.state_dict())
    # the deep phase runs the last stage (and no cached pooled features once it has started)
    stages = feature_cache.backbone("resnet20").num_stages
    assert stages - 1 in starts


def test_epochs_history_and_reports_span_both_phases(small_digits_task, feature_cache):
    reporter = NullReporter()
    res = fine_tune_and_score({**CFG, "epochs": 5}, small_digits_task, reporter, cache=feature_cache)
    assert [s for s, _ in reporter.history] == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert res.epochs_run == 5 and not res.stopped_early
    assert [v for _, v in reporter.history] == [h["accuracy"] for h in res.history]
    assert res.score == res.history[-1]["accuracy"]
    assert res.best_score == max(h["accuracy"] for h in res.history)
    assert res.history[res.best_epoch - 1]["accuracy"] == res.best_score
    assert res.data["head_first_seconds"] > 0 and res.seconds > res.data["head_first_seconds"]


def test_a_stop_at_the_last_head_only_epoch_ends_the_trial(small_digits_task, feature_cache, phases):
    res = fine_tune_and_score(CFG, small_digits_task, StopAfter(2), cache=feature_cache)
    assert len(phases) == 1  # not promoted
    assert res.epochs_run == 2 and res.stopped_early
    # a stop in the deep phase: numbered across phases, and an early stop
    res = fine_tune_and_score({**CFG, "epochs": 5}, small_digits_task, StopAfter(3), cache=feature_cache)
    assert res.epochs_run == 3 and res.stopped_early and [h["epoch"] for h in res.history] == [1, 2, 3]
    # asking to stop after the very last epoch is not an early stop
    assert not fine_tune_and_score(CFG, small_digits_task, StopAfter(4), cache=feature_cache).stopped_early


def test_an_optuna_pruner_stops_a_trial_while_it_is_head_only(small_digits_task, feature_cache, starts):
    from autoft.engines.optuna_engine import OptunaReporter

    # prunes at step 2, the first after the warm-up (every score is below 1.0), in the head-only phase
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.0, n_warmup_steps=2))
    trial = study.ask()
    reporter = OptunaReporter(trial)
    res = fine_tune_and_score({**CFG, "epochs": 6, "head_first": 3}, small_digits_task, reporter, cache=feature_cache)
    assert reporter.pruned_at == 2 and res.epochs_run == 2 and res.stopped_early
    assert sorted(study.trials[0].intermediate_values) == [1, 2]
    assert set(starts) == {feature_cache.backbone("resnet20").num_stages + 1}  # only head-only epochs ran


def test_head_first_with_unfreeze_0_changes_nothing(small_digits_task, feature_cache, phases):
    plain = fine_tune_and_score({**CFG, "unfreeze": 0, "head_first": 0}, small_digits_task, cache=feature_cache)
    same = fine_tune_and_score({**CFG, "unfreeze": 0, "head_first": 3}, small_digits_task, cache=feature_cache)
    assert same.history == plain.history and same.epochs_run == 4
    assert [p["head_in"] for p in phases] == [None, None]  # one ordinary run each


def test_invalid_head_first_names_the_field(small_digits_task, feature_cache):
    with pytest.raises(ValueError, match="head_first"):
        TrialConfig(backbone="resnet20", head_first=-1)
    with pytest.raises(ConfigError) as err:
        fine_tune_and_score({**CFG, "head_first": 4}, small_digits_task, cache=feature_cache)
    assert err.value.field == "head_first" and "below epochs=4" in str(err.value)
    from autoft.space import parse_space

    with pytest.raises(ConfigError) as err:
        parse_space({"backbone": ["resnet20"], "head_first": [0, -2]}, "space.yaml")
    assert err.value.field == "head_first.choices" and "space.yaml" in str(err.value)
    # a searched head_first is an ordinary space parameter
    space = parse_space({"backbone": ["resnet20"], "head_first": [0, 5], "epochs": 10})
    cfg = space.sample(optuna.create_study().ask())
    assert cfg.head_first in (0, 5)
