"""The search-space translator: conditional unfreeze, bounds, conditions, overrides, errors."""
from __future__ import annotations

import optuna
import pytest

from autoft.errors import ConfigError
from autoft.space import load_space, num_stages, parse_space
from autoft.task import BUILTIN_SPACES

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample_many(space, n=60, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append((t, space.sample(t)))
        study.tell(t, 0.0)
    return out


def test_unfreeze_range_depends_on_backbone():
    space = load_space(BUILTIN_SPACES / "cifar_resnets.yaml")
    seen: dict[str, set] = {}
    for t, cfg in _sample_many(space, 150):
        assert 0 <= cfg.unfreeze <= num_stages(cfg.backbone)
        dist = t.distributions["unfreeze"]
        assert dist.high == num_stages(cfg.backbone)  # the range itself is conditional
        seen.setdefault(cfg.backbone, set()).add(cfg.unfreeze)
    assert num_stages("resnet20") == 10 and num_stages("resnet56") == 28
    # deep unfreezing is only ever sampled for the deep backbone
    assert max(seen["resnet56"]) > 10 >= max(seen["resnet20"])


def test_every_declared_parameter_within_bounds_and_conditions():
    space = load_space(BUILTIN_SPACES / "cifar_resnets.yaml")
    for t, cfg in _sample_many(space, 80, seed=1):
        for p in space.params:
            if p.kind == "fixed":
                assert getattr(cfg, p.name) == p.value
                continue
            if not p.active(t.params):
                assert p.name not in t.params  # conditional parameter not sampled
                continue
            v = t.params[p.name]
            assert getattr(cfg, p.name) == v
            if p.kind == "categorical":
                assert v in p.choices
            else:
                low, high = p.bounds(t.params)
                assert low <= v <= high
        if cfg.head == "linear":
            assert "head_width" not in t.params and "dropout" not in t.params


def test_unfreeze_cap_and_text_space():
    import yaml

    from autoft.space import num_stages

    path = BUILTIN_SPACES / "text_minilm.yaml"
    cap = yaml.safe_load(path.read_text())["unfreeze"]["max"]
    assert cap < num_stages("minilm")  # the cap really is below the backbone's range
    space = load_space(path)
    seen = set()
    for t, cfg in _sample_many(space, 30):
        assert cfg.backbone == "minilm" and 0 <= cfg.unfreeze <= cap
        assert t.distributions["unfreeze"].high == cap
        seen.add(cfg.unfreeze)
    assert seen == set(range(cap + 1))


def test_overrides_fix_values_and_replace_backbones():
    space = load_space(BUILTIN_SPACES / "cifar_resnets.yaml").with_overrides(
        {"lr": 0.002, "backbone": ["resnet20", "resnet32"], "epochs": 2})
    for t, cfg in _sample_many(space, 20):
        assert cfg.lr == 0.002 and cfg.epochs == 2 and "lr" not in t.params
        assert cfg.backbone in ("resnet20", "resnet32")


@pytest.mark.parametrize("doc, field, words", [
    ({"lr": {"low": 1e-3, "high": 1e-2}}, "backbone", "needs 'backbone'"),
    ({"backbone": ["resnet20"], "lrr": 0.1}, "lrr", "did you mean 'lr'"),
    ({"backbone": ["resnet_20"]}, "backbone", "did you mean 'resnet20'"),
    ({"backbone": []}, "backbone.choices", "non-empty"),
    ({"backbone": ["resnet20"], "lr": {"low": -1.0, "high": 1.0}}, "lr.low", "greater than 0"),
    ({"backbone": ["resnet20"], "lr": {"low": 0.1, "high": 0.01}}, "lr", "above high"),
    ({"backbone": ["resnet20"], "lr": {"low": 0.0001, "hi": 0.01}}, "lr.hi", "did you mean 'high'"),
    ({"backbone": ["resnet20"], "unfreeze": {"low": -2, "high": 3}}, "unfreeze.low", "integer >= 0"),
    ({"backbone": ["resnet20"], "head": ["linear", "conv"]}, "head.choices", "conv"),
    ({"backbone": ["resnet20"], "lr": {"low": "fast", "high": 1}}, "lr.low", "must be a number"),
    ({"backbone": ["resnet20"], "dropout": {"low": 0, "high": 0.3, "when": {"head": "mlp"}}}, "dropout.when",
     "not declared before"),
    ({"backbone": ["resnet20"], "first_trials": {"lr": 0.1}}, "first_trials", "list of mappings"),
    ({"backbone": ["resnet20"], "first_trials": [{"lrr": 0.1}]}, "first_trials[0].lrr", "did you mean 'lr'"),
    ({"backbone": ["resnet20"], "first_trials": [{}, {"lr": -1}]}, "first_trials[1].lr", "greater than 0"),
    ({"backbone": ["resnet20"], "first_trials": [{"unfreeze": "most"}]}, "first_trials[0].unfreeze",
     "integer >= 0 or 'half'"),
    ({"backbone": ["resnet20"], "first_trials": [{"backbone": "resnet20"}]}, "first_trials[0].backbone",
     "from the ranking"),
    ({"backbone": ["resnet20"], "first_trial": [{"lr": 0.1}]}, "first_trial", "did you mean 'first_trials'"),
])
def test_malformed_space_names_field(doc, field, words):
    with pytest.raises(ConfigError) as ei:
        parse_space(doc, "space.yaml")
    msg = str(ei.value)
    assert ei.value.field == field and "space.yaml" in msg
    assert words in msg


def test_first_trials_are_read_and_survive_overrides():
    doc = {"backbone": ["resnet20", "resnet32"], "lr": {"low": 1e-4, "high": 1e-2, "log": True},
           "first_trials": [{"unfreeze": "half", "lr": 3e-3}, {"unfreeze": 0}]}
    space = parse_space(doc, "space.yaml")
    assert space.first_trials == [{"unfreeze": "half", "lr": 3e-3}, {"unfreeze": 0}]
    assert "first_trials" not in space.names  # not a parameter: never sampled
    assert space.with_overrides({"lr": 1e-3}).first_trials == space.first_trials
    assert parse_space({"backbone": ["resnet20"]}).first_trials is None
    from autoft.rank import BackboneScore, RankPolicy, prior_params

    none_first = parse_space({"backbone": ["resnet20"], "first_trials": []})  # the sampler alone
    assert none_first.first_trials == [] and prior_params([BackboneScore("resnet20")], RankPolicy(), none_first) == []
    assert load_space(BUILTIN_SPACES / "cifar_resnets.yaml").first_trials  # declares its own
