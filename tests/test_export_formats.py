"""The model formats of an export: model.pt2 (torch.export, primary), model.onnx (dynamo exporter,
legacy exporter as a stated fallback) and model.ts (TorchScript, legacy).

One real digits search (resnet20, last stage unfrozen, 1 trial, 1 epoch) for the module, exported
three ways: by default (with torch.jit.load made to fail), with torch.export and the dynamo ONNX
exporter made to fail (the fallbacks), and as model.pt2 only.  The safe .pt2 loader is tested on
archives of a tiny network with one thing changed each.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import shutil
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from autoft.cli import main
from autoft.engines.base import build_request
from autoft.engines.optuna_engine import run_study
from autoft.errors import ExportError
from autoft.export import export_trial, load_exported
from autoft.export import export as export_mod
from autoft.export import runtime
from autoft.export.runtime import BACKENDS, FORMAT_VERSION, load_pt2, sha256_file
from autoft.task import load_task

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _no_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load was called on the default path")


@pytest.fixture(scope="module")
def exp(tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp("formats")
    task = load_task("digits")
    td = task.prepare()
    req = build_request(task, overrides={"backbone": ["resnet20"], "unfreeze": 1, "epochs": 1, "batch_size": 64},
                        results_dir=root / "results", n_trials=1, pruner="none")
    study = run_study(req, task_data=td, cache=feature_cache)
    # the default export must not call torch.jit.load (its runtime check uses the preferred backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.jit, "load", _no_jit_load)
        res = export_trial(task, root / "export", study=study, task_data=td, cache=feature_cache)
    images = np.stack([td.data.inputs[i] for i in td.splits.test[:40]])
    return types.SimpleNamespace(task=task, td=td, study=study, res=res, root=root, cache=feature_cache,
                                 images=images)


def _info(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _relist(folder: Path, names, drop=()) -> None:
    """Re-hash ``names`` in the manifest and drop ``drop`` from it (what an older export, or a forger, has)."""
    doc = _manifest(folder)
    for n in drop:
        doc["files"].pop(n, None)
    for n in names:
        doc["files"][n] = {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2))


# ============================================================================================
# 1. the default export: pt2 + ONNX (dynamo) + TorchScript (legacy), each checked, each served alike
def test_default_export_writes_every_format_and_checks_each(exp):
    folder = exp.res.folder
    info = _info(folder)
    assert info["files"] == {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts",
                             "state_dict": "model.pt"}
    assert info["formats"] == ["pt2", "onnx", "torchscript"] and info["preferred_backend"] == "pt2"
    assert info["legacy_formats"] == ["torchscript"]
    assert info["onnx_exporter"] == "dynamo" and info["onnx_opset"] >= 18
    assert info["export_errors"] == {} and info["fallbacks"] == []
    assert info["dynamic_dims"] == {"batch": {"min": 1, "max": None}}
    assert info["torch_version"] == torch.__version__
    assert set(info["export_seconds"]) == {"pt2", "onnx", "torchscript"}
    ver = info["verification"]
    for fmt in ("pt2", "onnx", "torchscript"):
        assert 0 <= ver[f"{fmt}_max_abs_diff"] < 1e-4, fmt
    assert ver["runtime_pt2_max_abs_diff"] < 1e-4  # the runtime check used the preferred backend
    assert exp.res.info["formats"] == info["formats"]
    manifest = _manifest(folder)
    assert manifest["format_version"] == 1  # model.ts / model.onnx are there: older autoft still serves it
    assert list(manifest["requires"]["backends"]) == ["pt2", "onnx", "torchscript"]
    assert manifest["requires"]["backend_order"] == ["pt2", "onnx", "torchscript"]
    assert "torch.export" in manifest["requires"]["backends"]["pt2"]
    assert "legacy" in manifest["requires"]["backends"]["torchscript"]
    card = (folder / "README.md").read_text()
    files_section = card.split("## Files and use")[1]
    for needle in ("`model.pt2`: torch.export program", "`model.onnx`: ONNX opset", "dynamo-based exporter",
                   "`model.ts`: TorchScript, **legacy**", "backend 'auto'", "dynamic batch"):
        assert needle in files_section, needle
    assert files_section.index("model.pt2") < files_section.index("model.onnx") < files_section.index("model.ts")


def test_every_backend_predicts_the_same(exp):
    probs = {}
    for backend in ("pt2", "onnx", "torchscript"):
        model = load_exported(exp.res.folder, backend)
        assert model.backend == backend
        probs[backend] = model.predict(exp.images).probabilities
    assert load_exported(exp.res.folder).backend == "pt2"  # "auto" prefers the torch.export program
    for backend in ("onnx", "torchscript"):
        assert np.abs(probs[backend] - probs["pt2"]).max() < 1e-5, backend
        assert (probs[backend].argmax(1) == probs["pt2"].argmax(1)).all()
    # the refit PyTorch model agrees, and the accuracy is the one the export reported
    labels = exp.td.data.labels[exp.td.splits.test]
    inputs = [exp.td.data.inputs[i] for i in exp.td.splits.test]
    acc = np.mean(load_exported(exp.res.folder).predict(inputs).indices == labels)
    assert acc == pytest.approx(exp.res.test_metrics["accuracy"], abs=1e-6)


def test_default_load_and_predict_never_use_torch_jit(exp, monkeypatch):
    # pyproject ignores DeprecationWarning for the suite: record every warning explicitly here
    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_exported(exp.res.folder)
        preds = model.predict(exp.images)
    assert model.backend == "pt2" and len(preds) == len(exp.images)
    assert not [str(w.message) for w in caught if "torch.jit" in str(w.message)]


def test_predict_cli_backend_choices_follow_backends(exp, tmp_path, capsys):
    assert BACKENDS == ("auto", "pt2", "onnx", "torchscript")
    np.save(tmp_path / "x.npy", exp.images[:10])
    rows = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.csv"
        assert main(["predict", "--model", str(exp.res.folder), str(tmp_path / "x.npy"), "--backend", backend,
                     "--out", str(out)]) == 0
        assert f"(backend {'pt2' if backend == 'auto' else backend})" in capsys.readouterr().out
        rows[backend] = [r["prediction"] for r in csv.DictReader(out.open())]
    assert all(r == rows["pt2"] for r in rows.values())
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(exp.res.folder), str(tmp_path / "x.npy"), "--backend", "tflite"])
    assert "invalid choice" in capsys.readouterr().err


# ============================================================================================
# 2. fallbacks are stated: pt2 -> torchscript, dynamo ONNX exporter -> legacy exporter
@pytest.fixture(scope="module")
def fallback(exp, tmp_path_factory):
    out = tmp_path_factory.mktemp("fallback") / "export"

    def cannot_capture(*args, **kwargs):
        raise RuntimeError("simulated: torch.export cannot capture data-dependent control flow")

    def dynamo_fails(*args, **kwargs):
        raise RuntimeError("simulated: the dynamo-based ONNX exporter failed")

    capture = io.StringIO()
    handler = logging.StreamHandler(capture)
    logging.getLogger("autoft").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(export_mod, "_export_pt2", cannot_capture)
            mp.setattr(export_mod, "_export_onnx_dynamo", dynamo_fails)
            import contextlib

            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):  # the command's own output (rich console)
                rc = main(["export", "--task", "digits", "--results-dir", str(exp.root / "results"), "--out",
                           str(out), "--formats", "pt2,onnx"])
    finally:
        logging.getLogger("autoft").removeHandler(handler)
    return types.SimpleNamespace(rc=rc, folder=out, log=capture.getvalue(), stdout=stdout.getvalue())


def test_torch_export_failure_falls_back_to_torchscript_and_says_so(fallback):
    assert fallback.rc == 0
    info = _info(fallback.folder)
    # torchscript was not asked for: it is the stated fallback of pt2
    assert info["files"]["pt2"] is None and not (fallback.folder / "model.pt2").exists()
    assert info["files"]["torchscript"] == "model.ts" and info["formats"] == ["onnx", "torchscript"]
    assert "simulated: torch.export cannot capture" in info["export_errors"]["pt2"]
    assert any(f.startswith("torch.export could not capture this model") and "torchscript" in f
               for f in info["fallbacks"])
    assert "torch.export could not capture the model" in fallback.log and "pt2 -> torchscript" in fallback.log
    assert "fallback" in fallback.stdout and "torch.export could not capture" in fallback.stdout
    card = (fallback.folder / "README.md").read_text()
    assert "- fallback: torch.export could not capture this model" in card
    assert info["verification"]["torchscript_max_abs_diff"] < 1e-4


def test_dynamo_onnx_failure_falls_back_to_the_legacy_exporter_and_says_so(fallback):
    info = _info(fallback.folder)
    assert info["files"]["onnx"] == "model.onnx" and info["onnx_exporter"] == "legacy"
    assert info["onnx_opset"] == export_mod.LEGACY_ONNX_OPSET
    assert "simulated: the dynamo-based ONNX exporter failed" in info["export_errors"]["onnx_dynamo"]
    assert "onnx" not in info["export_errors"]  # model.onnx exists
    assert "Falling back to the legacy TorchScript-based exporter" in fallback.log
    assert "via the legacy exporter" in fallback.stdout
    card = (fallback.folder / "README.md").read_text()
    assert "the legacy TorchScript-based exporter (fallback" in card
    assert info["verification"]["onnx_max_abs_diff"] < 1e-4
    manifest = _manifest(fallback.folder)
    assert list(manifest["requires"]["backends"]) == ["onnx", "torchscript"]
    model = load_exported(fallback.folder)
    assert model.backend == "onnx"  # no model.pt2: auto takes ONNX before TorchScript


# ============================================================================================
# 3. folder layouts: a pt2-only folder needs this autoft; an old model.ts-only folder still loads
def test_pt2_only_export_needs_format_version_2(exp, tmp_path, monkeypatch):
    res = export_trial(exp.task, tmp_path / "pt2", study=exp.study, task_data=exp.td, cache=exp.cache,
                       formats=("pt2",))
    manifest = _manifest(res.folder)
    assert manifest["format_version"] == 2 == FORMAT_VERSION
    assert set(manifest["files"]) >= {"model.pt2", "model.pt"} and "model.ts" not in manifest["files"]
    assert load_exported(res.folder).predict(exp.images).probabilities.shape == (len(exp.images), 10)
    doc = manifest
    del doc["files"]["model.pt2"]
    (res.folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=r"model.pt2.*not listed in manifest.json"):
        load_exported(res.folder)
    monkeypatch.setattr(runtime, "FORMAT_VERSION", 1)  # an autoft from before model.pt2
    with pytest.raises(ExportError, match="format version 2; this autoft reads up to 1: upgrade autoft"):
        load_exported(res.folder)


def test_format_1_export_with_model_ts_only_still_loads(exp, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exp.res.folder, old)
    info = _info(old)
    for key in ("formats", "preferred_backend", "legacy_formats", "fallbacks", "dynamic_dims", "onnx_exporter",
                "torch_version", "export_seconds"):
        del info[key]
    info["files"] = {"torchscript": "model.ts", "onnx": None, "state_dict": "model.pt"}
    (old / "model.json").write_text(json.dumps(info))
    (old / "model.pt2").unlink()
    (old / "model.onnx").unlink()
    _relist(old, ["model.json"], drop=["model.pt2", "model.onnx"])
    doc = _manifest(old)
    doc["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(doc))
    model = load_exported(old)
    assert model.backend == "torchscript"
    expected = load_exported(exp.res.folder).predict(exp.images).probabilities
    assert np.abs(model.predict(exp.images).probabilities - expected).max() < 1e-5
    with pytest.raises(ExportError, match="has no pt2 model; available: torchscript"):
        load_exported(old, "pt2")


# ============================================================================================
# 4. model.pt2 is loaded only when it cannot run code (torch.export.load unpickles and evaluates)
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).relu()


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model.pt2"
    torch.manual_seed(0)
    net = _Tiny().eval()
    program = torch.export.export(net, (torch.randn(5, 4),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(path))
    return path


def _entries(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        root = names[0].split("/")[0]
        return root, {n.split("/", 1)[1]: zf.read(n) for n in names}


def _write(path: Path, root: str, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(f"{root}/{name}", data)
    return path


class _Payload:
    """Unpickling it creates the file ``target``: what a malicious pickle could do instead."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def _edit_program(entries: dict, fn) -> None:
    doc = json.loads(entries["models/model.json"])
    fn(doc)
    entries["models/model.json"] = json.dumps(doc).encode()


def _first(doc, key):
    """The first dict in ``doc`` that has ``key``."""
    if isinstance(doc, dict):
        if key in doc:
            return doc
        items = doc.values()
    elif isinstance(doc, list):
        items = doc
    else:
        return None
    for v in items:
        hit = _first(v, key)
        if hit is not None:
            return hit
    return None


def _pickled_weight(entries, sentinel):
    cfg = json.loads(entries["data/weights/model_weights_config.json"])
    meta = next(iter(cfg["config"].values()))
    meta["use_pickle"] = True
    entries["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    buf = io.BytesIO()
    torch.save(_Payload(sentinel), buf)
    entries[f"data/weights/{meta['path_name']}"] = buf.getvalue()


def _pickled_sample_inputs(entries, sentinel):
    buf = io.BytesIO()
    torch.save((_Payload(sentinel),), buf)  # fails weights_only=True; torch then retries weights_only=False
    entries["data/sample_inputs/model.pt"] = buf.getvalue()


def _opaque_constant(entries, sentinel):
    entries["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(sentinel))


def _guard_code(entries, sentinel):
    _edit_program(entries, lambda doc: doc["guards_code"].append(
        f"open({str(sentinel)!r}, 'w').write('ran') > 0"))


def _shape_expression(entries, sentinel):
    _edit_program(entries, lambda doc: _first(doc, "expr_str").__setitem__(
        "expr_str", f"Symbol(open({str(sentinel)!r}, 'w').write('ran'))"))


def _parameter_name(entries, sentinel):
    evil = f'lin")or open({str(sentinel)!r},"w").write("ran")or getattr(self,"lin'
    for name in ("models/model.json", "data/weights/model_weights_config.json"):
        entries[name] = entries[name].replace(b'"lin.', json.dumps(evil)[:-1].encode() + b".")


def _operator(entries, sentinel):
    _edit_program(entries, lambda doc: _first(doc, "target").__setitem__("target", "builtins.exec"))


def _compiled_code(entries, sentinel):
    entries["data/aotinductor/model/model.so"] = b"\x7fELF"


def _compressed(entries, sentinel):
    return "deflate"


UNSAFE = {
    "pickled weight": (_pickled_weight, "stored with pickle"),
    "pickled sample inputs": (_pickled_sample_inputs, "sample inputs are not plain tensors"),
    "opaque constant": (_opaque_constant, "opaque_obj_0"),
    "guard code": (_guard_code, "guard .* is not a comparison of input sizes"),
    "shape expression": (_shape_expression, "shape expression .* not a plain sympy expression|Symbol\\(\\) of"),
    "parameter name": (_parameter_name, "is not a dotted name|is not a name"),
    "operator": (_operator, "builtins.exec' is not an ATen operator"),
    "compiled code": (_compiled_code, "data/aotinductor/model/model.so"),
    "compressed entries": (_compressed, "compressed entries"),
}


def test_a_plain_program_loads_after_rewriting(tiny_pt2, tmp_path):
    root, entries = _entries(tiny_pt2)
    copy = _write(tmp_path / "copy.pt2", root, entries)  # rewritten by zipfile, nothing changed
    x = torch.randn(7, 4)
    with torch.no_grad():
        assert torch.equal(load_pt2(copy).module()(x), load_pt2(tiny_pt2).module()(x))


@pytest.mark.parametrize("case", list(UNSAFE))
def test_a_pt2_that_could_run_code_is_refused(tiny_pt2, tmp_path, case):
    edit, message = UNSAFE[case]
    sentinel = tmp_path / "ran"
    root, entries = _entries(tiny_pt2)
    if edit(entries, sentinel) == "deflate":
        path = tmp_path / "bad.pt2"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries.items():
                zf.writestr(f"{root}/{name}", data)
    else:
        path = _write(tmp_path / "bad.pt2", root, entries)
    with pytest.raises(ExportError, match=rf"refusing to load .*bad.pt2: .*({message})"):
        load_pt2(path)
    assert not sentinel.exists()


def test_an_unsafe_pt2_in_an_export_is_refused_and_auto_uses_onnx(exp, tmp_path, caplog):
    folder = tmp_path / "copy"
    shutil.copytree(exp.res.folder, folder)
    sentinel = tmp_path / "ran"
    root, entries = _entries(folder / "model.pt2")
    _guard_code(entries, sentinel)
    _write(folder / "model.pt2", root, entries)
    _relist(folder, ["model.pt2"])  # a forger rewrites the manifest too: it is not signed
    with pytest.raises(ExportError, match="refusing to load .*model.pt2"):
        load_exported(folder, "pt2")
    with caplog.at_level(logging.WARNING, logger="autoft"):
        model = load_exported(folder)
    assert model.backend == "onnx"
    assert any("backend 'auto' uses onnx" in r.getMessage() and "refusing to load" in r.getMessage()
               for r in caplog.records)
    assert not sentinel.exists()
