"""``autoft evaluate`` on a study's trial and on an exported folder, fairness on real SMS data by message
length, the HTML report (opened in headless Chromium when it is installed), and ``autoft suite``.

Real data and weights throughout: few-shot digits with resnet20 (head only, 1 epoch) for the study and
the export, 200 real SMS messages with MiniLM (head only) for fairness and text explanations."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from autoft.cli import _EXTRA_COMMANDS, main
from autoft.evaluation.cli import add_parser
from autoft.task import parse_task


def run_cli(*argv) -> int:
    if add_parser not in _EXTRA_COMMANDS:  # until autoft.cli registers autoft.evaluation.cli itself
        _EXTRA_COMMANDS.append(add_parser)
    return main([str(a) for a in argv])


def _digits_task(root, name="digits-eval", **split):
    doc = {"name": name, "modality": "image", "data": {"source": "digits"}, "metric": "accuracy",
           "split": split or {"train_per_class": 20, "val_per_class": 20, "seed": 0}, "pruner": "none"}
    path = root / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 1-trial study of few-shot digits (resnet20, head only, 1 epoch) and its export."""
    from autoft.api import search

    root = tmp_path_factory.mktemp("evalstudy")
    task_file = _digits_task(root)
    r = search(str(task_file), overrides={"unfreeze": 0, "epochs": 1, "lr": 3e-3, "head_lr_mult": 3.0},
               backbones=["resnet20"], n_trials=1, rank=False, results_dir=root / "results", export=root / "export")
    return root, task_file, r


def test_evaluate_a_trial_and_its_export_agree(study, capsys):
    root, task_file, r = study
    assert run_cli("evaluate", "--task", task_file, "--results-dir", root / "results", "--n-boot", 100,
                   "--explain", 1) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "95% CI" in out and "temperature" in out and "Per class" in out
    ev = r.results_dir / "evaluation"
    s = json.loads((ev / "summary.json").read_text())
    # the trial is refitted with its seed: the argmax metrics are the search's final-check test metrics
    for k, v in r.test_metrics.items():
        assert s["metrics_argmax"][k] == pytest.approx(v, abs=1e-5), k
    assert s["trial"] == r.best_trial.number and s["split"] == "test"
    assert (r.results_dir / "report.html").is_file()
    # the export, evaluated with the stand-alone runtime on the same split, gives the same predictions
    assert run_cli("evaluate", "--model", root / "export", "--task", task_file, "--out", root / "ev-export",
                   "--n-boot", 100, "--explain", 1) == 0
    e = json.loads((root / "ev-export" / "summary.json").read_text())
    assert e["metrics_argmax"]["accuracy"] == pytest.approx(s["metrics_argmax"]["accuracy"], abs=1e-6)
    assert e["calibration"]["temperature"] == pytest.approx(s["calibration"]["temperature"], rel=1e-3)
    # fitted here on the validation split, or (once the export carries calibration.json) the export's own
    carried = (root / "export" / "calibration.json").is_file()
    assert e["calibration_source"] == ("export" if carried else "fitted on the task's validation split")
    assert (root / "ev-export" / "explanations.png").is_file() and (root / "ev-export" / "report.html").is_file()


def _add_to_export(folder, name, doc):
    """Write a file into an export and list it in the manifest (what the export will do itself)."""
    (folder / name).write_text(json.dumps(doc), encoding="utf-8")
    man = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(man), encoding="utf-8")


def test_evaluate_an_export_uses_its_calibration_and_new_labelled_images(study, tmp_path, caplog):
    from PIL import Image

    root, task_file, r = study
    export = tmp_path / "export"
    shutil.copytree(root / "export", export)
    if (export / "calibration.json").exists():  # an export that carries one: start from one without it
        (export / "calibration.json").unlink()
        man = json.loads((export / "manifest.json").read_text())
        man["files"].pop("calibration.json")
        (export / "manifest.json").write_text(json.dumps(man), encoding="utf-8")
    # an unlisted calibration.json is neither checked nor used
    (export / "calibration.json").write_text(json.dumps({"format": "autoft-calibration", "temperature": 9.0}))
    from autoft.evaluation.sources import evaluate_export

    ev = evaluate_export(export, task=str(task_file), out=tmp_path / "a", n_boot=50, explain=0, html=False)
    assert ev.summary["calibration_source"] != "export" and "not listed" in caplog.text
    _add_to_export(export, "calibration.json", {"format": "autoft-calibration", "format_version": 1,
                                                "temperature": 2.5, "fitted_on": "val"})
    ev = evaluate_export(export, task=str(task_file), out=tmp_path / "b", n_boot=50, explain=0, html=False)
    assert ev.summary["calibration_source"] == "export" and ev.calibration.temperature == 2.5
    # a new labelled folder (one sub-folder per class) of real digits, with groups by image path
    from autoft.data import load_digits_data

    d = load_digits_data()
    rows = []
    for i in range(0, 60):
        p = tmp_path / "new" / d.class_names[d.labels[i]] / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(d.inputs[i][..., 0]).save(p)
        rows.append({"path": f"{d.class_names[d.labels[i]]}/{i}.png", "group": "early" if i < 30 else "late"})
    pd.DataFrame(rows).to_csv(tmp_path / "groups.csv", index=False)
    assert run_cli("evaluate", "--model", export, "--data", tmp_path / "new", "--groups", tmp_path / "groups.csv",
                   "--out", tmp_path / "c", "--n-boot", 50, "--explain", 0) == 0
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["examples"] == 60 and s["split"] == "data new"
    assert {g["group"]: g["examples"] for g in s["fairness"]["groups"]} == {"early": 30, "late": 30}
    preds = pd.read_csv(tmp_path / "c" / "predictions.csv")
    assert preds.id.str.endswith(".png").all() and (preds.group == np.where(
        preds.id.str.extract(r"/(\d+)\.png")[0].astype(int) < 30, "early", "late")).all()


def test_evaluate_errors_are_messages(study, tmp_path, capsys):
    root, task_file, _ = study
    assert run_cli("evaluate", "--results-dir", root / "results") == 2
    assert "give --task" in capsys.readouterr().err
    assert run_cli("evaluate", "--task", task_file, "--results-dir", root / "results", "--trial", 7) == 2
    assert "no trial #7" in capsys.readouterr().err
    assert run_cli("evaluate", "--task", task_file, "--results-dir", root / "results", "--group-column", "x",
                   "--explain", 0) == 2
    assert "--group-column names a column of a text table" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sms_length_task(tmp_path_factory, sms_small):
    """200 real SMS messages with the message-length band as a column of the task's own table."""
    root = tmp_path_factory.mktemp("smsfair")
    rows = ["Label\tSMS\tlength_band"]
    for x, y in zip(sms_small.inputs, sms_small.labels):
        rows.append(f"{sms_small.class_names[y]}\t{x}\t{'<=60' if len(x) <= 60 else '>60'}")
    (root / "sms.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = parse_task({"name": "sms-fair", "modality": "text", "metric": "f1_pos", "positive_class": "spam",
                       "data": {"source": "csv", "path": "sms.tsv", "text_column": "SMS", "label_column": "Label",
                                "max_length": 64},
                       "split": {"val": 0.3, "test": 0.3, "seed": 0}}, root / "sms.yaml")
    return task, task.prepare()


def test_fairness_by_message_length_on_real_sms(sms_length_task, feature_cache, tmp_path):
    from autoft.core import fine_tune_and_score
    from autoft.evaluation import evaluate_winner
    from autoft.evaluation.sources import task_groups

    task, td = sms_length_task
    res = fine_tune_and_score({"backbone": "minilm", "unfreeze": 0, "epochs": 3, "lr": 1e-3, "head_lr_mult": 10.0,
                               "batch_size": 16}, td, cache=feature_cache, test=True, return_model=True)
    groups, name = task_groups(task, td.data, group_column="length_band")
    ev = evaluate_winner(res, td, tmp_path / "ev", cache=feature_cache, groups=groups, group_name=name,
                         n_boot=200, explain=2)
    s = ev.summary
    # a binary task: the threshold was tuned on validation for spam F1 and is applied on test
    cal = s["calibration"]
    assert cal["threshold"] is not None and cal["positive_class"] == "spam" and cal["metric"] == "f1_pos"
    assert cal["validation"]["f1_pos_at_threshold"] >= cal["validation"]["f1_pos_at_0.5"]
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert ((preds.p_spam >= cal["threshold"]) == (preds.predicted == "spam")).all()
    # per-group table and gaps, recomputed here from the predictions
    f = s["fairness"]
    assert f["attribute"] == "length_band" and f["positive_class"] == "spam"
    table = pd.DataFrame(f["groups"]).set_index("group")
    assert set(table.index) == {"<=60", ">60"}
    texts = [td.data.inputs[i] for i in np.sort(td.splits.test)]
    assert table.examples.to_dict() == {"<=60": sum(len(t) <= 60 for t in texts),
                                        ">60": sum(len(t) > 60 for t in texts)}
    rate = preds.assign(sel=preds.predicted == "spam").groupby("length_band").sel.mean()
    assert f["gaps"]["demographic_parity_difference"] == pytest.approx(abs(rate["<=60"] - rate[">60"]))
    assert table.loc["<=60", "selection_rate"] == pytest.approx(rate["<=60"])
    tpr = preds[preds.true == "spam"].assign(hit=lambda d: d.predicted == "spam").groupby("length_band").hit.mean()
    fpr = preds[preds.true == "ham"].assign(hit=lambda d: d.predicted == "spam").groupby("length_band").hit.mean()
    assert f["gaps"]["equalized_odds_difference"] == pytest.approx(
        max(abs(tpr.get("<=60", 0) - tpr.get(">60", 0)), abs(fpr["<=60"] - fpr[">60"])), abs=1e-9)
    # token attributions for text, rendered as escaped HTML
    html = (tmp_path / "ev" / "explanations.html").read_text()
    assert s["explanations"]["examples"] >= 2 and html.count('class="tok"') > 10 and "<script" not in html


def test_token_html_escapes_text():
    from autoft.evaluation.explain import token_html

    out = token_html([{"caption": "<b>caption</b>", "correct": True,
                       "tokens": [("<script>", 0.5), ("##x", -0.3), ("&", 0.0)]}])
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;b&gt;" in out and "&amp;" in out


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(b)), None)


def test_html_report_is_self_contained(study, tmp_path):
    from autoft.evaluation.evaluate import evaluate_predictions
    from autoft.evaluation.report_html import write_html_report, write_study_report

    root, _, r = study
    path = write_study_report(r.results_dir)
    doc = path.read_text(encoding="utf-8")
    assert "<script" not in doc.lower() and not re.search(r"(src|href)=['\"]?(https?:|//|file:)", doc)
    assert doc.count("data:image/png;base64,") >= 5  # search plots, confusion, reliability, explanations
    assert "Leaderboard" in doc and "Evaluation of the winner" in doc and "resnet20" in doc
    # user strings are escaped (class names come from data)
    z = torch.randn(40, 2)
    evaluate_predictions(z, torch.arange(40) % 2, ["<img src=x onerror=alert(1)>", "b&b"], tmp_path / "ev",
                         metric="accuracy", n_boot=20, explain=0)
    page = write_html_report(tmp_path / "r.html", evaluation_dir=tmp_path / "ev").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "b&amp;b" in page


def test_html_report_renders_in_headless_chromium(study, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from PIL import Image

    root, _, r = study
    path = r.results_dir / "report.html"
    if not path.is_file():
        from autoft.evaluation.report_html import write_study_report

        write_study_report(r.results_dir)
    shot = tmp_path / "report.png"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,2400", f"--screenshot={shot}", path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (2400, 1200)
    # a rendered page, not a blank one: text and embedded plots make many dark pixels
    assert (img < 128).mean() > 0.01 and img.std() > 20


# -- suites -------------------------------------------------------------------------------------------
@pytest.fixture()
def npz_tasks(tmp_path):
    """Two small image tasks of real digits (300 images each) as .npz files."""
    from autoft.data import load_digits_data

    d = load_digits_data()
    x = np.stack(d.inputs)[..., 0]
    for k in (0, 1):
        sl = slice(300 * k, 300 * (k + 1))
        np.savez(tmp_path / f"part{k}.npz", x=x[sl], y=d.labels[sl])
    tasks = [{"inline": {"name": f"digits-part{k}", "modality": "image",
                         "data": {"source": "npz", "path": f"part{k}.npz"}, "split": {"val": 0.2, "test": 0.2}}}
             for k in (0, 1)]
    import yaml

    suite = tmp_path / "mini.yaml"
    suite.write_text(yaml.safe_dump({"name": "mini", "mode": "fixed", "tasks": tasks,
                                     "backbones": ["resnet20", "resnet32"],
                                     "recipe": {"unfreeze": 0, "lr": 3e-3, "head_lr_mult": 3.0, "epochs": 2,
                                                "batch_size": 32},
                                     "search": {"n_trials": 2}}), encoding="utf-8")
    return suite


def test_suite_fixed_mode_table_ranks_kendall_and_resume(npz_tasks, tmp_path, capsys):
    from autoft.evaluation.suite import run_suite

    out = tmp_path / "out"
    assert run_cli("suite", "--suite", npz_tasks, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "Kendall" in printed and "mean rank" in printed
    scores = pd.read_csv(out / "scores.csv", index_col=0)
    assert list(scores.columns) == ["digits-part0", "digits-part1", "mean_rank"]
    assert set(scores.index) == {"resnet20", "resnet32"} and scores.iloc[:, :2].notna().all().all()
    ranks = pd.read_csv(out / "ranks.csv", index_col=0)
    for t in ("digits-part0", "digits-part1"):
        best = scores[t].idxmax()
        assert ranks.loc[best, t] == 1.0
    assert ranks.mean_rank.to_dict() == pytest.approx(ranks[["digits-part0", "digits-part1"]].mean(1).to_dict())
    k = pd.read_csv(out / "kendall.csv").set_index("task")
    for t in ("digits-part0", "digits-part1"):
        doc = json.loads((out / "tasks" / f"{t}.json").read_text())
        lm = doc["logme"]
        val = {b: r["val"] for b, r in doc["backbones"].items()}
        agree = (lm["resnet20"] - lm["resnet32"]) * (val["resnet20"] - val["resnet32"])
        assert k.loc[t, "kendall_tau"] == (1.0 if agree > 0 else -1.0 if agree < 0 else 0.0)
        assert all(r["test"] is not None for r in doc["backbones"].values())
    # resumable: a second run skips both tasks; a task whose file is gone runs again, from its partial file
    res = run_suite(npz_tasks, out=out)
    assert res.skipped == ["digits-part0", "digits-part1"] and res.ran == []
    doc = json.loads((out / "tasks" / "digits-part1.json").read_text())
    (out / "tasks" / "digits-part1.json").unlink()
    partial = {"fingerprint": doc["fingerprint"], "logme": doc["logme"],
               "backbones": {"resnet20": doc["backbones"]["resnet20"]}}
    (out / "tasks" / "digits-part1.partial.json").write_text(json.dumps(partial))
    lines = []
    res = run_suite(npz_tasks, out=out, progress=lines.append)
    assert res.ran == ["digits-part1"] and res.skipped == ["digits-part0"]
    assert not any("resnet20" in line and "validation" in line for line in lines)  # taken from the partial file
    assert not (out / "tasks" / "digits-part1.partial.json").exists()
    # other settings are another experiment: the task runs again
    res = run_suite(npz_tasks, out=out, tasks=["digits-part0"], mode="fixed", fresh=True)
    assert res.ran == ["digits-part0"]


def test_suite_search_mode_uses_the_search(npz_tasks, tmp_path):
    from autoft.evaluation.suite import load_suite, run_suite

    suite = load_suite(npz_tasks)
    suite.tasks = suite.tasks[:1]
    suite.recipe = {}
    res = run_suite(suite, out=tmp_path / "s", mode="search")
    doc = res.tasks["digits-part0"]
    assert doc["mode"] == "search" and sum(doc["counts"].values()) == 2
    assert (tmp_path / "s" / "results" / "digits-part0" / "suite-mini" / "leaderboard.csv").is_file()
    tried = [b for b, r in doc["backbones"].items() if r["val"] is not None]
    assert tried and doc["winner"] in tried and doc["backbones"][doc["winner"]]["test"] is not None
    assert set(doc["logme"]) == {"resnet20", "resnet32"} and all(v is not None for v in doc["logme"].values())


def test_suite_file_errors(tmp_path):
    from autoft.errors import ConfigError
    from autoft.evaluation.suite import load_suite

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks: [digits]\nbackbones: [resnet20]\nrecipee: {}\n")
    with pytest.raises(ConfigError, match="recipee"):
        load_suite(bad)
    with pytest.raises(ConfigError, match="no suite named 'cifar-digit'.*did you mean 'cifar-digits'"):
        load_suite("cifar-digit")
    assert load_suite("cifar-digits").backbones == ["resnet20", "resnet32", "resnet44", "resnet56"]


def test_export_carries_calibration_and_predict_applies_it(sms_length_task, feature_cache, tmp_path):
    """Active once autoft.export writes calibration.json (the integration of autoft.evaluation)."""
    import autoft.export.export as X

    if not hasattr(X, "fit_export_calibration"):
        pytest.skip("autoft.export does not carry calibration.json yet")
    from autoft.api import search
    from autoft.evaluation.sources import evaluate_export
    from autoft.export import load_exported

    task, td = sms_length_task
    r = search(task, overrides={"unfreeze": 0, "epochs": 2}, n_trials=1, rank=False, results_dir=tmp_path / "results",
               final_check=False, task_data=td)
    X.export_trial(task, tmp_path / "export", study=r.study, task_data=td, cache=feature_cache,
                   formats=("torchscript",))
    cal = json.loads((tmp_path / "export" / "calibration.json").read_text())
    assert cal["threshold"] is not None and cal["positive_class"] == "spam" and cal["temperature"] > 0
    assert "calibration.json" in json.loads((tmp_path / "export" / "manifest.json").read_text())["files"]
    m = load_exported(tmp_path / "export")
    rows = np.sort(td.splits.test)
    texts = [td.data.inputs[i] for i in rows]
    preds = m.predict(texts)
    p_spam = preds.probabilities[:, m.classes.index("spam")]
    assert (np.array(preds.labels) == np.where(p_spam >= cal["threshold"], "spam", "ham")).all()
    z = m.logits(texts)  # raw logits; probabilities use the temperature
    assert np.allclose(preds.probabilities, np.exp(z / cal["temperature"]) / np.exp(z / cal["temperature"]).sum(1,
                       keepdims=True), atol=1e-5)
    truth = np.array([td.data.class_names[y] for y in td.data.labels[rows]])
    assert cal["test"]["accuracy"] == pytest.approx(float(np.mean(np.array(preds.labels) == truth)), abs=1e-6)
    ev = evaluate_export(tmp_path / "export", task=task, out=tmp_path / "ev", n_boot=50, explain=0, html=False)
    assert ev.summary["calibration_source"] == "export" and ev.calibration.threshold == cal["threshold"]
    assert (pd.read_csv(tmp_path / "ev" / "predictions.csv").predicted.to_numpy() == np.array(preds.labels)).all()


@pytest.mark.slow
def test_builtin_three_task_suite_across_modalities(tmp_path):
    """digits-fewshot (CIFAR ResNets), sms-spam (MiniLM) and ants-bees (the offline ImageNet checkpoints) in one
    cross-task table; each task's own backbones, a sparse table and a mean rank over the tasks a backbone ran on."""
    from autoft.evaluation.suite import run_suite

    out = tmp_path / "three"
    res = run_suite("three-tasks", out=out)
    assert res.ran == ["digits-fewshot", "sms-spam", "ants-bees"]
    scores = pd.read_csv(out / "scores.csv", index_col=0)
    assert list(scores.columns) == ["digits-fewshot", "sms-spam", "ants-bees", "mean_rank"]
    assert scores.loc[["resnet20", "resnet32", "resnet56"], "digits-fewshot"].notna().all()
    assert scores.loc["minilm", "sms-spam"] > 0.9  # spam F1 of a real fine-tune, not a stand-in
    folded = ["mobilenet_v2_folded", "mobilenet_v3_small_folded", "squeezenet1_1_folded"]
    assert scores.loc[folded, "ants-bees"].notna().all() and scores.loc[folded, "ants-bees"].max() > 0.85
    assert scores.loc["minilm", ["digits-fewshot", "ants-bees"]].isna().all()
    k = pd.read_csv(out / "kendall.csv").set_index("task")
    assert k.loc["digits-fewshot", "backbones"] == 3 and k.loc["ants-bees", "backbones"] == 3
