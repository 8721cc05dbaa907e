"""Evaluation building blocks: per-class metrics, confusion, bootstrap intervals, calibration
(temperature, threshold), fairness gaps and group sources, and the evaluation of a real fine-tuned
model (resnet20 on few-shot digits, 2 epochs)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support

from autoft.core import fine_tune_and_score
from autoft.core.metrics import compute_metrics
from autoft.errors import DataError, ExportError
from autoft.evaluation.calibration import (Calibration, ece, fit_calibration, fit_temperature, nll,
                                           tune_threshold)
from autoft.evaluation.fairness import (group_fairness, groups_from_column, groups_from_file, image_paths,
                                        length_bands)
from autoft.evaluation.metrics import (all_metrics, bootstrap_ci, confusion_matrix, most_confused,
                                       per_class_table, predictions)


def _fake(n=400, c=4, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += scale * torch.rand(n, generator=g)
    return z, y


def test_per_class_and_confusion_agree_with_scikit_learn():
    z, y = _fake()
    p = z.argmax(1)
    df = per_class_table(p, y, ["a", "b", "c", "d"])
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, zero_division=0)
    assert np.allclose(df.precision[:4], prec, atol=1e-6) and np.allclose(df.recall[:4], rec, atol=1e-6)
    assert np.allclose(df.f1[:4], f1, atol=1e-6) and (df.support[:4].to_numpy() == sup).all()
    assert df["class"].tolist()[4:] == ["(macro avg)", "(weighted avg)"]
    assert df.f1[4] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-6)
    assert df.f1[5] == pytest.approx(f1_score(y, p, average="weighted"), abs=1e-6)
    cm = confusion_matrix(p, y, 4)
    assert (cm == sk_confusion(y, p, labels=range(4))).all()
    top = most_confused(cm, ["a", "b", "c", "d"], 3)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    assert top[0]["count"] == off.max() and [t["count"] for t in top] == sorted([t["count"] for t in top], reverse=True)


def test_argmax_metrics_are_the_searchs_metrics():
    for c in (2, 5):
        z, y = _fake(c=c, seed=c)
        ours = all_metrics(torch.softmax(z, 1), y, c, 1 if c == 2 else None)
        ref = compute_metrics(z, y, c, 1 if c == 2 else None)
        assert set(ours) == set(ref)
        for k in ref:
            assert ours[k] == pytest.approx(ref[k], abs=1e-5), k


def test_bootstrap_interval_is_seeded_and_brackets_the_value():
    z, y = _fake(n=300, c=2, seed=3)
    p = torch.softmax(z, 1)
    a = bootstrap_ci(p, y, "f1_pos", 2, 1, n_boot=300, seed=0)
    b = bootstrap_ci(p, y, "f1_pos", 2, 1, n_boot=300, seed=0)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.low < a.value < a.high and a.high - a.low < 0.2
    assert a.value == pytest.approx(f1_score(y, p.argmax(1)), abs=1e-6)
    # a larger sample gives a narrower interval
    z2, y2 = _fake(n=3000, c=2, seed=3)
    wide = bootstrap_ci(torch.softmax(z2, 1), y2, "f1_pos", 2, 1, n_boot=300)
    assert wide.high - wide.low < a.high - a.low


def test_temperature_scaling_recovers_the_overconfidence():
    # calibrated logits by construction: labels sampled from softmax(z); the model reports 4 * z
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    t = fit_temperature(4 * z, y)
    assert t == pytest.approx(4.0, rel=0.1)
    assert nll(4 * z, y, t) < nll(4 * z, y)
    assert ece(torch.softmax(4 * z / t, 1), y) < ece(torch.softmax(4 * z, 1), y) / 3
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)


def test_threshold_tuning_maximises_f1_on_validation():
    z, y = _fake(n=500, c=2, seed=5, scale=1.5)
    p = torch.softmax(z, 1)
    th, score = tune_threshold(p, y, "f1_pos", 1)
    grid = np.linspace(0.01, 0.99, 99)
    brute = max(f1_score(y, (p[:, 1] >= g).long()) for g in grid)
    assert score >= brute - 1e-9
    assert score == pytest.approx(f1_score(y, (p[:, 1] >= th).long()), abs=1e-6)
    assert (predictions(p, 1, th) == (p[:, 1] >= th).long()).all()
    # positive class 0: the threshold is on p[:, 0]
    th0, _ = tune_threshold(p, y, "f1_pos", 0)
    assert (predictions(p, 0, th0) == torch.where(p[:, 0] >= th0, 0, 1)).all()
    with pytest.raises(ValueError, match="recall_pos"):
        tune_threshold(p, y, "recall_pos", 1)


def test_calibration_file_round_trip_and_checks(tmp_path):
    z, y = _fake(n=300, c=2, seed=7)
    cal = fit_calibration(2 * z, y, ["ham", "spam"], "f1_pos", 1)
    assert cal.threshold is not None and cal.positive_class == "spam" and cal.temperature > 1
    assert cal.validation["nll_after"] <= cal.validation["nll_before"]
    assert cal.validation["f1_pos_at_threshold"] >= cal.validation["f1_pos_at_0.5"]
    cal.save(tmp_path)
    back = Calibration.load(tmp_path, ["ham", "spam"])
    assert back.temperature == cal.temperature and back.threshold == cal.threshold and back.positive_index == 1
    assert (back.predict(z) == cal.predict(z)).all()
    # multi-class and metrics a threshold cannot serve: temperature only
    assert fit_calibration(*_fake(c=3), ["a", "b", "c"], "accuracy").threshold is None
    assert fit_calibration(2 * z, y, ["ham", "spam"], "auroc", 1).threshold is None
    doc = json.loads((tmp_path / "calibration.json").read_text())
    for bad in ({"temperature": 0}, {"temperature": "2"}, {"threshold": 1.5}, {"positive_class": "eggs"},
                {"format": "x"}):
        (tmp_path / "calibration.json").write_text(json.dumps(doc | bad))
        with pytest.raises(ExportError):
            Calibration.load(tmp_path, ["ham", "spam"])


def test_fairness_gaps_by_hand_and_fairlearn_fallback_agree():
    # group a: 4 positives (3 predicted), 4 negatives (1 predicted); group b: 2 positives (2), 6 negatives (0)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0] + [1, 1, 0, 0, 0, 0, 0, 0])
    pred = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0] + [1, 1, 0, 0, 0, 0, 0, 0])
    probs = torch.nn.functional.one_hot(pred, 2).float()
    groups = ["a"] * 8 + ["b"] * 8
    res = group_fairness(y, probs, groups, ["neg", "pos"], "f1_pos", 1, attribute="band")
    # selection rates 4/8 vs 2/8; TPR 3/4 vs 1; FPR 1/4 vs 0
    assert res.gaps["demographic_parity_difference"] == pytest.approx(0.25)
    assert res.gaps["equalized_odds_difference"] == pytest.approx(0.25)
    assert res.gaps["accuracy_difference"] == pytest.approx(1.0 - 6 / 8)
    t = res.table.set_index("group")
    assert t.loc["a", "tpr"] == pytest.approx(0.75) and t.loc["b", "fpr"] == 0 and t.loc["a", "positives"] == 4
    z, yy = _fake(n=600, c=3, seed=9)
    g = np.random.default_rng(0).choice(["x", "y", "z"], 600)
    for c, yy2, zz in ((2, (yy > 0).long(), torch.stack([z[:, 0], z[:, 1:].max(1).values], 1)), (3, yy, z)):
        a = group_fairness(yy2, torch.softmax(zz, 1), g, [str(i) for i in range(c)], "accuracy", None)
        b = group_fairness(yy2, torch.softmax(zz, 1), g, [str(i) for i in range(c)], "accuracy", None,
                           use_fairlearn=False)
        assert a.backend == "fairlearn" and b.backend == "scikit-learn"
        for k, v in a.gaps.items():
            assert b.gaps[k] == pytest.approx(v) if isinstance(v, float) else b.gaps[k] == v, k


def test_group_sources(tmp_path, sms_path):
    from autoft.data import load_csv

    texts = ["short one", "a much longer message " * 4, "mid length text here", "x"]
    assert length_bands(texts, [60]).tolist() == ["<=60", ">60", "<=60", "<=60"]
    assert length_bands(texts, [5, 60]).tolist() == ["6-60", ">60", "6-60", "<=5"]
    # a column of the task's own table, aligned row by row (rows without a label are skipped, as loading does)
    table = tmp_path / "t.tsv"
    table.write_text("Label\tSMS\tband\nham\thello\tshort\n\tno label\tx\nspam\tWIN cash now\tlong\n", encoding="utf-8")
    data = load_csv(table, "SMS", "Label")
    assert groups_from_column(table, "band", data.inputs, text_column="SMS", label_column="Label").tolist() == \
        ["short", "long"]
    with pytest.raises(DataError, match="no column 'bnd'.*did you mean 'band'"):
        groups_from_column(table, "bnd", data.inputs, text_column="SMS", label_column="Label")
    with pytest.raises(DataError, match="do not match"):
        groups_from_column(table, "band", ["hello", "other"], text_column="SMS", label_column="Label")
    # a groups table by index, by text, by image path
    gf = tmp_path / "g.csv"
    gf.write_text("index,group\n0,a\n2,b\n", encoding="utf-8")
    assert groups_from_file(gf, 3).tolist() == ["a", "(missing)", "b"]
    gf.write_text("text,group\nhello,a\nWIN cash now,b\n", encoding="utf-8")
    assert groups_from_file(gf, 2, texts=data.inputs).tolist() == ["a", "b"]
    gf.write_text("index,group\n0,a\n0,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="two groups"):
        groups_from_file(gf, 3)
    from PIL import Image

    root = tmp_path / "imgs"
    for cls, names in (("ants", ["1.png", "2.png"]), ("bees", ["3.png"])):
        (root / cls).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (4, 4)).save(root / cls / n)
    paths = image_paths(root, ["ants", "bees"], np.array([0, 0, 1]))
    assert paths == ["ants/1.png", "ants/2.png", "bees/3.png"]
    gf.write_text(f"path,group\n./ants/2.png,outdoor\n{root / 'bees' / '3.png'},indoor\n", encoding="utf-8")
    assert groups_from_file(gf, 3, paths=paths, root=root).tolist() == ["(missing)", "outdoor", "indoor"]
    with pytest.raises(DataError, match="skipped as unreadable"):
        image_paths(root, ["ants", "bees"], np.array([0, 1]))


@pytest.fixture(scope="module")
def digits_model(small_digits_task, feature_cache):
    cfg = dict(backbone="resnet20", unfreeze=1, epochs=2, lr=3e-3, head_lr_mult=3.0, batch_size=32)
    return fine_tune_and_score(cfg, small_digits_task, cache=feature_cache, test=True, return_model=True)


def test_evaluate_winner_on_few_shot_digits(digits_model, small_digits_task, feature_cache, tmp_path):
    from autoft.evaluation import evaluate_winner

    td = small_digits_task
    groups = np.where(np.arange(len(td.data)) % 2 == 0, "even row", "odd row")
    ev = evaluate_winner(digits_model, td, tmp_path / "evaluation", cache=feature_cache, groups=groups,
                         n_boot=200, explain=2)
    s = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    # the argmax metrics are exactly the final check's test metrics (same model, same examples)
    for k, v in digits_model.test_metrics.items():
        assert s["metrics_argmax"][k] == pytest.approx(v, abs=1e-5), k
    assert s["examples"] == len(td.splits.test) and s["split"] == "test"
    # temperature scaling leaves argmax predictions alone (multi-class: no threshold)
    assert s["metrics"]["accuracy"] == pytest.approx(s["metrics_argmax"]["accuracy"])
    assert s["calibration"]["threshold"] is None and s["calibration"]["temperature"] > 0
    h = s["headline"]
    assert h["metric"] == "accuracy" and h["ci_low"] <= h["value"] <= h["ci_high"]
    pc = pd.read_csv(tmp_path / "evaluation" / "per_class.csv")
    assert pc.support[:10].sum() == len(td.splits.test)
    assert pd.read_csv(tmp_path / "evaluation" / "confusion.csv").iloc[:, 1:].to_numpy().sum() == len(td.splits.test)
    fair = pd.read_csv(tmp_path / "evaluation" / "fairness.csv")
    assert set(fair.group) == {"even row", "odd row"} and fair.examples.sum() == len(td.splits.test)
    assert s["fairness"]["gaps"]["equalized_odds_difference"] is not None
    assert s["explanations"]["examples"] == 4 and (tmp_path / "evaluation" / "explanations.png").stat().st_size > 5000
    assert (tmp_path / "evaluation" / "confused_pairs.png").is_file() and s["confused_pairs"]
    assert set(s["files"]) >= {"per_class.csv", "confusion.png", "reliability.png", "calibration.json",
                               "fairness.csv", "predictions.csv", "summary.json"}
    assert ev.calibration.temperature == s["calibration"]["temperature"]


def test_task_fairness_section_gives_the_groups(tmp_path):
    """``task_groups`` reads a task's ``fairness`` section (the task-file field proposed for task.py)."""
    from types import SimpleNamespace

    from autoft.data import load_csv
    from autoft.evaluation.sources import task_groups
    from autoft.task import parse_task

    (tmp_path / "t.tsv").write_text("Label\tSMS\tsrc\nham\thi there\tA\nspam\t" + "WIN " * 20 + "\tB\n",
                                    encoding="utf-8")
    (tmp_path / "g.csv").write_text("index,group\n0,x\n1,y\n", encoding="utf-8")
    task = parse_task({"name": "t", "modality": "text", "data": {"source": "csv", "path": "t.tsv", "text_column": "SMS",
                                                                  "label_column": "Label"}}, tmp_path / "t.yaml")
    data = load_csv(tmp_path / "t.tsv", "SMS", "Label")
    assert task_groups(task, data) == (None, "")
    for spec, want in (({"group_column": "src"}, ["A", "B"]), ({"length_bands": [60]}, ["<=60", ">60"]),
                       ({"groups_file": "g.csv"}, ["x", "y"])):
        t = SimpleNamespace(data=task.data, data_path=task.data_path, file=task.file,
                            fairness=SimpleNamespace(**{"group_column": None, "groups_file": None,
                                                        "length_bands": None, **spec}))
        groups, _ = task_groups(t, data)
        assert groups.tolist() == want, spec
    # options given explicitly win over the task file's section
    assert task_groups(t, data, length_bands=[3])[0].tolist() == [">3", ">3"]


def test_evaluation_without_captum_skips_explanations(digits_model, small_digits_task, feature_cache, tmp_path,
                                                      monkeypatch):
    """captum is optional: without it the evaluation is written and says why explanations are missing."""
    from autoft.errors import AutoftError
    from autoft.evaluation import evaluate_winner
    from autoft.evaluation import explain as E

    def missing():
        raise AutoftError("attributions need captum: pip install captum")

    monkeypatch.setattr(E, "_captum", missing)
    ev = evaluate_winner(digits_model, small_digits_task, tmp_path / "ev", cache=feature_cache, n_boot=20, explain=1)
    assert "captum" in ev.summary["explanations"]["error"] and not (tmp_path / "ev" / "explanations.png").exists()
    assert (tmp_path / "ev" / "per_class.csv").is_file()
