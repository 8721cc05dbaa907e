"""Task files: lookup, variable expansion, and errors that name the file and the field."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autoft.errors import ConfigError
from autoft.task import BUILTIN_TASKS, find_task, load_task, parse_task

GOOD = {"name": "t", "modality": "image", "data": {"source": "digits"}}


def test_builtin_tasks_load_and_prepare():
    digits = load_task("digits")
    assert digits.file == BUILTIN_TASKS / "digits.yaml"
    td = digits.prepare()
    assert td.data.num_classes == 10 and sum(td.splits.sizes().values()) == 1797
    spam = load_task("sms-spam")
    assert spam.metric == "f1_pos" and spam.data_path().is_file()
    assert str(spam.data_path()).startswith(os.environ["AUTOFT_HOME"])


def test_local_tasks_folder_wins(tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "digits.yaml").write_text("name: mine\nmodality: image\ndata: {source: digits}\n")
    monkeypatch.chdir(tmp_path)
    assert load_task("digits").name == "mine"
    assert find_task(str(tmp_path / "tasks" / "digits.yaml")).is_file()


def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        find_task("digitz")


def test_unset_variable_named(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTOFT_NOPE_NOT_SET", raising=False)
    t = parse_task({**GOOD, "modality": "text", "data": {"source": "csv", "path": "${AUTOFT_NOPE_NOT_SET}/x.csv"}},
                   tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="AUTOFT_NOPE_NOT_SET.*not set"):
        t.data_path()


@pytest.mark.parametrize("path", ["${AWS_SECRET_ACCESS_KEY}/x.csv", "$DATABASE_PASSWORD/x.csv"])
def test_only_documented_variables_expand(monkeypatch, tmp_path, path):
    """A task file from elsewhere cannot pull a secret out of the environment into messages and cards."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("DATABASE_PASSWORD", "s3cr3t")
    t = parse_task({**GOOD, "modality": "text", "data": {"source": "csv", "path": path}}, tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="not one a task file may use") as ei:
        t.data_path()
    assert "s3cr3t" not in str(ei.value)


def test_allowed_variables_and_literal_dollar(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOFT_DATA", str(tmp_path / "d"))
    t = parse_task({**GOOD, "modality": "text", "data": {"source": "csv", "path": "${AUTOFT_DATA}/a$$b.csv"}},
                   tmp_path / "t.yaml")
    assert t.data_path() == tmp_path / "d" / "a$b.csv"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    t = parse_task({**GOOD, "modality": "text", "data": {"source": "csv", "path": "$HOME/x.csv"}}, tmp_path / "t.yaml")
    assert t.data_path() == tmp_path / "home" / "x.csv"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "../x", "/abs"])
def test_task_name_cannot_leave_the_results_folder(name, tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_task({**GOOD, "name": name}, tmp_path / "t.yaml")
    assert ei.value.field == "name"


@pytest.mark.parametrize("doc, field, words", [
    ({**GOOD, "metrc": "accuracy"}, "metrc", "did you mean 'metric'"),
    ({**GOOD, "metric": "acuracy"}, "metric", "did you mean 'accuracy'"),
    ({**GOOD, "budget": {"n_trials": -3}}, "budget.n_trials", "greater than or equal to 1"),
    ({**GOOD, "budget": {"n_trial": 3}}, "budget.n_trial", "did you mean 'n_trials'"),
    ({**GOOD, "budget": {"max_epochs": "many"}}, "budget.max_epochs", "integer"),
    ({**GOOD, "data": {"source": "parquet"}}, "data.source", "'digits'"),
    ({**GOOD, "data": {"source": "csv"}}, "data", "needs data.path"),
    ({**GOOD, "modality": "audio"}, "modality", "'image' or 'text'"),
    ({"modality": "image", "data": {"source": "digits"}}, "name", "required"),
    ({**GOOD, "split": {"val": 1.5}}, "split.val", "less than 1"),
    ({**GOOD, "device": "tpu"}, "device", "not one of"),
])
def test_malformed_task_names_field(doc, field, words, tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_task(doc, tmp_path / "bad.yaml")
    assert ei.value.field == field, str(ei.value)
    assert "bad.yaml" in str(ei.value) and words in str(ei.value)


def test_malformed_yaml_gives_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nmodality: image\ndata: {source: digits\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_task(f)


def test_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_task(f)


def test_binary_metric_on_multiclass_rejected(tmp_path):
    t = parse_task({**GOOD, "metric": "f1_pos"}, tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="for binary tasks"):
        t.prepare()


def test_relative_data_path_is_relative_to_task_file(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    t = parse_task({**GOOD, "modality": "text", "data": {"source": "csv", "path": "d.csv"}}, tmp_path / "t.yaml")
    assert t.data_path() == Path(tmp_path / "d.csv")


def test_builtin_banking77_is_few_shot_with_the_official_test_set():
    """10 queries per intent for training and for validation from train.csv; test.csv (3,080) untouched."""
    t = load_task("banking77")
    td = t.prepare()
    assert td.data.num_classes == 77
    assert td.splits.sizes() == {"train": 770, "val": 770, "test": 3080}
    for part in (td.splits.train, td.splits.val):
        assert (np.bincount(td.data.labels[part], minlength=77) == 10).all()
    assert set(td.splits.test.tolist()).isdisjoint(td.splits.train.tolist() + td.splits.val.tolist())
