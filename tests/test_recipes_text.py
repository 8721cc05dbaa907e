"""The text search space's first-trial recipes: a many-class few-shot task (BANKING77's shape: 77 intents,
10 training examples each) starts with the recipe measured for it (batch 16, 60x head learning rate, cross
entropy), then the general one; a two-class task with thousands of examples (sms-spam) runs the general
recipe alone, exactly as before the rule existed."""
from __future__ import annotations

import numpy as np
import pytest

from autoft.core.train import TaskData
from autoft.data.datasets import LabelledData
from autoft.data.splits import stratified_split
from autoft.errors import ConfigError
from autoft.rank import RECIPE, BackboneScore, RankPolicy, plan_first_trials, prior_params, recipe_applies, task_shape
from autoft.space import load_space, parse_space
from autoft.task import BUILTIN_SPACES

TEXT = BUILTIN_SPACES / "text_minilm.yaml"
# what the text space ran first before it declared first_trials: the built-in recipe on MiniLM's last layer
GENERAL = {"backbone": "minilm", "unfreeze": 1, "lr": 1e-3, "head_lr_mult": 10.0, "head": "linear",
           "optimizer": "adamw", "batch_size": 64}


def _task(classes: int, per_class: int, val_per_class: int = 2) -> TaskData:
    labels = np.repeat(np.arange(classes), per_class + val_per_class + 1)
    data = LabelledData([f"text {i}" for i in range(len(labels))], labels, [f"c{i}" for i in range(classes)], "text")
    splits = stratified_split(labels, train_per_class=per_class, val_per_class=val_per_class, seed=0)
    return TaskData(data, splits)


def test_general_recipe_is_unchanged_for_two_classes():
    space = load_space(TEXT)
    assert GENERAL == {"backbone": "minilm", **{k: v for k, v in RECIPE.items() if k != "unfreeze"}, "unfreeze": 1}
    sms_like = {"classes": 2, "train_per_class": 1950.0}
    assert prior_params([BackboneScore("minilm")], RankPolicy(), space, sms_like) == [GENERAL]


def test_many_class_few_shot_starts_with_its_recipe():
    space = load_space(TEXT)
    first, second = prior_params([BackboneScore("minilm")], RankPolicy(), space,
                                 {"classes": 77, "train_per_class": 10.0})
    assert second == GENERAL
    assert first["batch_size"] == 16 and first["loss"] == "ce" and first["unfreeze"] == 1
    assert first["lr"] * first["head_lr_mult"] == pytest.approx(6e-3)
    assert "when_task" not in first  # a condition, not a parameter


@pytest.mark.parametrize("shape, applies", [
    ({"classes": 77, "train_per_class": 10.0}, True),
    ({"classes": 20, "train_per_class": 20.0}, True),     # the bounds are inclusive
    ({"classes": 19, "train_per_class": 10.0}, False),    # too few classes
    ({"classes": 77, "train_per_class": 21.0}, False),    # enough data per class for the general recipe
    (None, False),                                        # shape unknown: a conditional recipe is skipped
])
def test_when_task_condition(shape, applies):
    recipe = {"when_task": {"min_classes": 20, "max_train_per_class": 20}, "lr": 1e-4}
    assert recipe_applies(recipe, shape) is applies
    assert recipe_applies({"lr": 1e-4}, shape)  # no condition: always


def test_plan_reads_the_shape_from_the_task_data():
    from types import SimpleNamespace

    shape = task_shape(_task(30, 5))
    assert shape == {"classes": 30, "train_per_class": 5.0}
    req = SimpleNamespace(space=load_space(TEXT))
    scores, first = plan_first_trials(req, _task(30, 5), None, RankPolicy())
    assert scores == [] and len(first) == 2 and first[0]["batch_size"] == 16
    _, first = plan_first_trials(req, _task(2, 40), None, RankPolicy())
    assert first == [GENERAL]


@pytest.mark.parametrize("cond, words", [({"min_class": 20}, "unknown condition 'min_class'"),
                                         ({"min_classes": "many"}, "must be a number"), ({}, "mapping")])
def test_bad_when_task_is_refused(cond, words):
    with pytest.raises(ConfigError, match=words):
        parse_space({"backbone": ["minilm"], "first_trials": [{"when_task": cond, "lr": 1e-4}]}, "space.yaml")
