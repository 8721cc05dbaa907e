"""Export a searched trial, serve it without training code, and fail clearly on broken folders.

Real data and weights: a 2-trial digits search (resnet20, last stage unfrozen, 1 epoch) and a
2-trial search on 200 real SMS messages (MiniLM, head only, 1 epoch), each exported once per module
(model.pt2, model.onnx and model.ts; the formats themselves: tests/test_export_formats.py).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from autoft.cli import main
from autoft.data.encode import encode
from autoft.engines.base import build_request
from autoft.engines.optuna_engine import run_study
from autoft.errors import ConfigError, ExportError
from autoft.export import export_trial, load_exported
from autoft.export.export import rebuild_model
from autoft.export.runtime import load_pt2
from autoft.task import load_task, parse_task

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[1]
ALLOWED_AUTOFT_MODULES = {"autoft", "autoft.errors", "autoft.export", "autoft.export.runtime"}


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp("digits")
    task = load_task("digits")
    td = task.prepare()
    req = build_request(task, overrides={"backbone": ["resnet20"], "unfreeze": 1, "epochs": 1, "batch_size": 64},
                        results_dir=root / "results", n_trials=2, pruner="none")
    study = run_study(req, task_data=td, cache=feature_cache)
    # by study name, from the search's storage (as the CLI does)
    res = export_trial(task, root / "export", study="default", results_dir=root / "results", task_data=td,
                       cache=feature_cache)
    return task, td, study, res, root


@pytest.fixture(scope="module")
def sms_export(tmp_path_factory, feature_cache, sms_small):
    root = tmp_path_factory.mktemp("sms")
    rows = [f"{sms_small.class_names[y]}\t{x}" for x, y in zip(sms_small.inputs, sms_small.labels)]
    (root / "sms.tsv").write_text("Label\tSMS\n" + "\n".join(rows) + "\n", encoding="utf-8")
    task = parse_task({"name": "sms-mini", "modality": "text", "metric": "f1_pos", "positive_class": "spam",
                       "data": {"source": "csv", "path": "sms.tsv", "text_column": "SMS", "label_column": "Label"},
                       "split": {"val": 0.2, "test": 0.25, "seed": 0}, "search_space": "text_minilm",
                       "pruner": "none"}, root / "sms.yaml")
    td = task.prepare()
    req = build_request(task, overrides={"unfreeze": 0, "epochs": 1}, results_dir=root / "results", n_trials=2)
    study = run_study(req, task_data=td, cache=feature_cache)
    res = export_trial(task, root / "export", study=study, task_data=td, cache=feature_cache)
    return task, td, study, res, root


def _test_inputs(td):
    return [td.data.inputs[i] for i in td.splits.test], td.data.labels[td.splits.test]


def _pytorch_logits(res, td) -> tuple[torch.Tensor, tuple]:
    state = encode(_test_inputs(td)[0], res.model.backbone.preprocessing)
    state = state if isinstance(state, tuple) else (state,)
    net = res.model.eval()  # Classifier.forward takes the encoded state: a tensor, or (ids, mask) for text
    with torch.no_grad():
        parts = [tuple(s[i:i + 64] for s in state) for i in range(0, len(state[0]), 64)]
        ref = torch.cat([net(p if len(p) == 2 else p[0]) for p in parts])
    return ref, state


def _check_formats_match_pytorch(res, td):
    import onnxruntime as ort

    ref, state = _pytorch_logits(res, td)
    program = load_pt2(res.folder / "model.pt2").module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy format: torch.jit.load is deprecated (FutureWarning)
        ts = torch.jit.load(str(res.folder / "model.ts"))
    sess = ort.InferenceSession(str(res.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = json.loads((res.folder / "model.json").read_text())["inputs"]
    with torch.no_grad():
        pt2_out = torch.cat([program(*[s[i:i + 64] for s in state]) for i in range(0, len(state[0]), 64)])
        ts_out = torch.cat([ts(*[s[i:i + 64] for s in state]) for i in range(0, len(state[0]), 64)])
    onnx_out = np.concatenate([sess.run(None, {n: s[i:i + 64].numpy() for n, s in zip(names, state)})[0]
                               for i in range(0, len(state[0]), 64)])
    assert ref.shape == (len(td.splits.test), td.data.num_classes)
    assert (pt2_out - ref).abs().max().item() <= 1e-4
    assert (ts_out - ref).abs().max().item() <= 1e-4
    assert np.abs(onnx_out - ref.numpy()).max() <= 1e-4
    # the plain state_dict rebuilds the same network
    with torch.no_grad():
        rebuilt = rebuild_model(res.folder)
        again = rebuilt(state if len(state) == 2 else state[0])
    assert (again - ref).abs().max().item() <= 1e-4


def _runtime_accuracy(folder, td, backend) -> float:
    inputs, labels = _test_inputs(td)
    preds = load_exported(folder, backend).predict(inputs)
    assert preds.probabilities.shape == (len(labels), td.data.num_classes)
    assert np.allclose(preds.probabilities.sum(1), 1.0)
    return float(np.mean(preds.indices == labels))


# --------------------------------------------------------------------------------------------
def test_export_folder_is_complete_and_describes_the_trial(digits_export):
    task, td, study, res, _ = digits_export
    folder = res.folder
    best = study.best_trial
    assert res.trial == best.number
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    assert {"config.yaml", "classes.json", "preprocessing.json", "metrics.json", "model.pt2", "model.ts",
            "model.onnx", "model.pt", "model.json", "README.md"} <= listed
    assert yaml.safe_load((folder / "config.yaml").read_text()) == best.user_attrs["config"]
    assert json.loads((folder / "classes.json").read_text()) == td.data.class_names
    pre = json.loads((folder / "preprocessing.json").read_text())
    assert pre["input_size"] == 32 and pre["mean"] == [0.485, 0.456, 0.406]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["validation"] == best.user_attrs["metrics"] and metrics["validation_score"] == best.value
    assert metrics["test"] == res.test_metrics and metrics["refit"]["trained_on"] == ["train"]
    # same config, same seed, same data: the refit reproduces the search's validation score
    assert metrics["refit"]["validation"]["accuracy"] == pytest.approx(best.value, abs=1e-6)
    info = json.loads((folder / "model.json").read_text())
    assert info["architecture"] == "resnet20" and info["inputs"] == ["pixel_values"]
    for fmt in ("pt2", "onnx", "torchscript"):
        assert info["verification"][f"{fmt}_max_abs_diff"] <= 1e-4
    card = (folder / "README.md").read_text()
    for needle in ("# digits", "resnet20", "2 trials", "train 1259", "torch ", "test (refit"):
        assert needle in card, needle


def test_every_format_matches_pytorch_on_digits_test_split(digits_export):
    _, td, _, res, _ = digits_export
    _check_formats_match_pytorch(res, td)


def test_predict_accuracy_equals_refit_test_accuracy_digits(digits_export, tmp_path):
    _, td, _, res, _ = digits_export
    reported = res.test_metrics["accuracy"]
    for backend in ("pt2", "onnx", "torchscript"):
        assert _runtime_accuracy(res.folder, td, backend) == pytest.approx(reported, abs=1e-6)
    # the command line, from PNG files in one folder per class
    from PIL import Image

    inputs, labels = _test_inputs(td)
    for k, (img, y) in enumerate(zip(inputs, labels)):
        d = tmp_path / "test" / td.data.class_names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0], mode="L").save(d / f"{k}.png")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(res.folder), str(tmp_path / "test"), "--folder-labels",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(labels)
    assert {"input", "prediction", "probability", "p_0", "p_9", "label"} <= set(rows[0])
    assert np.mean([r["prediction"] == r["label"] for r in rows]) == pytest.approx(reported, abs=1e-6)


def test_refit_on_train_and_validation(digits_export, tmp_path, feature_cache):
    task, td, study, _, _ = digits_export
    res = export_trial(task, tmp_path / "tv", study=study, train_val=True, formats=("torchscript",),
                       task_data=td, cache=feature_cache)
    metrics = json.loads((res.folder / "metrics.json").read_text())
    assert metrics["refit"]["trained_on"] == ["train", "val"] and metrics["refit"]["validation"] is None
    info = json.loads((res.folder / "model.json").read_text())
    assert info["files"]["onnx"] is None and not (res.folder / "model.onnx").exists()
    assert info["files"]["pt2"] is None and not (res.folder / "model.pt2").exists()
    assert info["formats"] == ["torchscript"] and info["fallbacks"] == []  # asked for, not a fallback
    assert _runtime_accuracy(res.folder, td, "torchscript") == pytest.approx(res.test_metrics["accuracy"], abs=1e-6)
    with pytest.raises(ExportError, match="no onnx model"):
        load_exported(res.folder, "onnx")


def test_every_format_matches_pytorch_on_sms_test_split(sms_export):
    _, td, _, res, _ = sms_export
    assert (res.folder / "tokenizer" / "tokenizer.json").is_file()
    assert (res.folder / "tokenizer" / "vocab.txt").is_file()
    _check_formats_match_pytorch(res, td)


def test_text_pt2_has_a_dynamic_batch_and_sequence_length(sms_export):
    _, td, _, res, _ = sms_export
    info = json.loads((res.folder / "model.json").read_text())
    # torch.export captures MiniLM: no fallback to TorchScript
    assert info["files"]["pt2"] == "model.pt2" and info["preferred_backend"] == "pt2"
    assert "pt2" not in info["export_errors"] and info["fallbacks"] == [] and info["onnx_exporter"] == "dynamo"
    assert info["dynamic_dims"] == {"batch": {"min": 1, "max": None}, "sequence": {"min": 1, "max": 128}}
    assert info["verification"]["pt2_max_abs_diff"] <= 1e-4 and info["verification"]["runtime_pt2_max_abs_diff"] <= 1e-4
    program = load_pt2(res.folder / "model.pt2").module()
    texts = _test_inputs(td)[0]
    pre = res.model.backbone.preprocessing
    lengths = set()
    for batch in ([texts[0]], texts[:5], [texts[1] * 30, texts[2]]):  # 1 text, 5 texts, one truncated to 128
        ids, mask = encode(batch, pre)
        lengths.add(ids.shape[1])
        with torch.no_grad():
            assert (program(ids, mask) - res.model((ids, mask))).abs().max().item() <= 1e-4
    assert len(lengths) == 3 and max(lengths) == 128


def test_predict_accuracy_equals_refit_test_accuracy_sms(sms_export, tmp_path, capsys):
    _, td, _, res, _ = sms_export
    # predict applies the export's calibration (temperature, spam threshold): compare with that decision's accuracy
    reported = ((res.calibration or {}).get("test") or res.test_metrics)["accuracy"]
    for backend in ("pt2", "torchscript"):
        assert _runtime_accuracy(res.folder, td, backend) == pytest.approx(reported, abs=1e-6)
    inputs, labels = _test_inputs(td)
    table = tmp_path / "test.tsv"
    table.write_text("SMS\tLabel\n" + "".join(f"{x}\t{td.data.class_names[y]}\n" for x, y in zip(inputs, labels)),
                     encoding="utf-8")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(res.folder), str(table), "--text-column", "SMS", "--label-column",
                 "Label", "--backend", "onnx", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == len(labels) and {"p_ham", "p_spam"} <= set(rows[0])
    assert np.mean([r["prediction"] == r["label"] for r in rows]) == pytest.approx(reported, abs=1e-6)
    assert f"accuracy {reported:.4f}" in capsys.readouterr().out


def test_exports_load_in_a_fresh_process_without_training_code(digits_export, sms_export, tmp_path):
    _, dtd, _, dres, _ = digits_export
    _, stx, _, sres, _ = sms_export
    images = np.stack(_test_inputs(dtd)[0][:20])  # (20, 8, 8, 1) uint8, as the digits data holds them
    np.save(tmp_path / "digits.npy", images)
    texts = _test_inputs(stx)[0][:10]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import autoft
        d = autoft.load_exported({str(dres.folder)!r})
        pd = d.predict(np.load({str(tmp_path / 'digits.npy')!r})).probabilities.tolist()
        t = autoft.load_exported({str(sres.folder)!r}, backend="onnx")
        pt = t.predict(json.load(open({str(tmp_path / 'texts.json')!r}))).probabilities.tolist()
        mods = sorted(m for m in sys.modules if m == "autoft" or m.startswith("autoft."))
        print(json.dumps({{"digits": pd, "sms": pt, "modules": mods}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mods = set(out["modules"])
    for training in ("autoft.core", "autoft.zoo", "autoft.engines", "autoft.data", "autoft.task"):
        assert not any(m == training or m.startswith(training + ".") for m in mods), mods
    assert mods <= ALLOWED_AUTOFT_MODULES, mods
    assert np.allclose(out["digits"], load_exported(dres.folder).predict(images).probabilities, atol=1e-6)
    assert np.allclose(out["sms"], load_exported(sres.folder).predict(texts).probabilities, atol=1e-5)


# --------------------------------------------------------------------------------------------
@pytest.fixture
def broken_copy(digits_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(digits_export[3].folder, dst)
    return dst


def test_missing_file_is_a_clear_error(broken_copy, capsys):
    (broken_copy / "classes.json").unlink()
    with pytest.raises(ExportError, match=r"incomplete: missing file\(s\) classes.json"):
        load_exported(broken_copy)
    assert main(["predict", "--model", str(broken_copy), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "missing file(s) classes.json" in err and "Traceback" not in err


def test_altered_file_is_a_clear_error(broken_copy):
    data = bytearray((broken_copy / "model.ts").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken_copy / "model.ts").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model.ts changed since the export \(sha256 differs"):
        load_exported(broken_copy)


def test_not_an_export_is_a_clear_error(broken_copy, tmp_path):
    (broken_copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not an autoft export: manifest.json is missing"):
        load_exported(broken_copy)
    with pytest.raises(ExportError, match="does not exist"):
        load_exported(tmp_path / "nowhere")


def test_missing_onnxruntime_is_a_clear_error(digits_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ExportError, match="backend 'onnx' needs the onnxruntime package.*pip install onnxruntime"):
        load_exported(digits_export[3].folder, backend="onnx")
    assert load_exported(digits_export[3].folder).backend == "pt2"  # the default needs no onnxruntime


def test_export_input_errors(digits_export, tmp_path):
    task, td, study, res, root = digits_export
    with pytest.raises(ConfigError, match="no trial #99"):
        export_trial(task, tmp_path / "a", study=study, trial=99, task_data=td)
    with pytest.raises(ConfigError, match="no study 'nope'"):
        export_trial(task, tmp_path / "a", study="nope", results_dir=root / "results", task_data=td)
    with pytest.raises(ConfigError, match="Run 'autoft search --task digits"):
        export_trial(task, tmp_path / "a", results_dir=tmp_path / "empty", task_data=td)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and holds no previous export"):
        export_trial(task, tmp_path / "busy", study=study, task_data=td)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["export", "--task", "digits", "--results-dir", str(root / "results"), "--trial", "99",
                 "--out", str(tmp_path / "b")]) == 2


def test_text_export_tokenizer_files_must_be_listed_and_inside(sms_export, tmp_path):
    from autoft.export.runtime import sha256_file

    dst = tmp_path / "sms"
    shutil.copytree(sms_export[3].folder, dst)
    original = (dst / "manifest.json").read_text()
    # an unlisted file in the tokenizer folder would change tokenization: refused, not just a warning
    (dst / "tokenizer" / "added_tokens.json").write_text('{"free": 0}')
    with pytest.raises(ExportError, match=r"tokenizer/added_tokens.json.*not listed in manifest.json"):
        load_exported(dst)
    (dst / "tokenizer" / "added_tokens.json").unlink()
    manifest = json.loads(original)
    del manifest["files"]["tokenizer/vocab.txt"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"tokenizer/vocab.txt.*not listed in manifest.json"):
        load_exported(dst)
    # a tokenizer outside the folder, even with every hash updated
    shutil.copytree(dst / "tokenizer", tmp_path / "elsewhere")
    pre = json.loads((dst / "preprocessing.json").read_text())
    pre["tokenizer"] = "../elsewhere"
    (dst / "preprocessing.json").write_text(json.dumps(pre))
    manifest = json.loads(original)
    manifest["files"]["preprocessing.json"]["sha256"] = sha256_file(dst / "preprocessing.json")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"\.\./elsewhere.*outside the folder"):
        load_exported(dst)
