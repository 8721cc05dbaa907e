"""Security audit of export / predict: what ``autoft export --out`` may delete, what ``predict``'s
integrity check covers, decompression bombs, unreadable files in folders, and the model card.

One real digits export (resnet20, 1 trial, 1 epoch) for the module; every tampering test works on a
copy of it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import struct
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import optuna
import pytest

from autoft.cli import main
from autoft.engines.base import build_request
from autoft.engines.optuna_engine import run_study
from autoft.errors import ExportError
from autoft.export import export_trial, load_exported
from autoft.export.export import _replace, model_card
from autoft.export.runtime import DEFAULT_MAX_IMAGE_PIXELS, read_image, sha256_file
from autoft.task import load_task

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def exp(tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp("safety")
    task = load_task("digits")
    td = task.prepare()
    req = build_request(task, overrides={"backbone": ["resnet20"], "unfreeze": 1, "epochs": 1, "batch_size": 64},
                        results_dir=root / "results", n_trials=1, pruner="none")
    study = run_study(req, task_data=td, cache=feature_cache)
    res = export_trial(task, root / "export", study=study, task_data=td, cache=feature_cache)
    return types.SimpleNamespace(task=task, td=td, study=study, res=res, root=root, cache=feature_cache)


@pytest.fixture
def folder(exp, tmp_path) -> Path:
    """A fresh copy of the export, to tamper with."""
    dst = tmp_path / "copy"
    shutil.copytree(exp.res.folder, dst)
    return dst


def tree(root: Path) -> dict:
    """Every entry under root: relative path → bytes (files) or None (folders)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def web_app(root: Path) -> Path:
    """A folder that is not an export but happens to hold a manifest.json (a progressive web app)."""
    (root / "src").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"name": "My PWA"}))
    (root / "index.html").write_text("<html><script src='src/app.js'></script></html>")
    (root / "src" / "app.js").write_text("console.log('hi')")
    return root


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, doc: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2))


def relist(folder: Path, name: str, path: Path | None = None) -> None:
    """List ``name`` in the manifest with the sha256 of ``path`` (default folder/name), as a forger would."""
    doc = manifest(folder)
    p = path or folder / name
    doc["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_manifest(folder, doc)


def png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grey PNG of zeros, written row block by row block: tiny on disk whatever its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, height - i)) for i in range(0, height, 1000)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def digit_pngs(exp, folder: Path, n: int = 3) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, i in enumerate(exp.td.splits.test[:n]):
        p = folder / f"{k}.png"
        Image.fromarray(exp.td.data.inputs[i][..., 0], mode="L").save(p)
        out.append(p)
    return out


# ============================================================================================
# 1. export --out never deletes what the export did not write
def test_export_refuses_a_folder_with_a_foreign_manifest_api(exp, tmp_path):
    app = web_app(tmp_path / "pwa")
    before = tree(app)
    with pytest.raises(ExportError, match=r"pwa.*not an autoft export"):
        export_trial(exp.task, app, study=exp.study, task_data=exp.td, cache=exp.cache)
    assert tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pwa"]  # no temporary folder left behind


def test_export_refuses_a_folder_with_a_foreign_manifest_cli(exp, tmp_path, capsys):
    app = web_app(tmp_path / "pwa")
    before = tree(app)
    assert main(["export", "--task", "digits", "--results-dir", str(exp.root / "results"), "--out", str(app)]) == 2
    err = capsys.readouterr().err
    assert str(app) in err and "not an autoft export" in err and "Traceback" not in err
    assert tree(app) == before


def test_export_refuses_an_autoft_manifest_that_does_not_list_the_files(exp, tmp_path):
    app = web_app(tmp_path / "pwa")
    (app / "manifest.json").write_text(json.dumps({"format": "autoft-export", "format_version": 1, "files": {}}))
    before = tree(app)
    with pytest.raises(ExportError, match=r"files the previous export did not write: index.html, src/app.js"):
        export_trial(exp.task, app, study=exp.study, task_data=exp.td, cache=exp.cache)
    assert tree(app) == before


def test_export_refuses_an_export_with_an_extra_user_file(exp, folder):
    (folder / "notes.txt").write_text("my notes")
    (folder / "mine").mkdir()
    (folder / "mine" / "data.csv").write_text("a,b\n")
    before = tree(folder)
    with pytest.raises(ExportError, match=r"copy.*did not write: mine/data.csv, notes.txt"):
        export_trial(exp.task, folder, study=exp.study, task_data=exp.td, cache=exp.cache)
    assert tree(folder) == before


def test_export_refuses_an_export_with_an_empty_user_folder_or_missing_files(exp, folder):
    (folder / "empty").mkdir()
    with pytest.raises(ExportError, match="did not write: empty"):
        export_trial(exp.task, folder, study=exp.study, task_data=exp.td, cache=exp.cache)
    (folder / "empty").rmdir()
    (folder / "model.onnx").unlink()
    before = tree(folder)
    with pytest.raises(ExportError, match="missing.*model.onnx"):
        export_trial(exp.task, folder, study=exp.study, task_data=exp.td, cache=exp.cache)
    assert tree(folder) == before


def test_export_replaces_a_previous_export(exp, folder):
    assert (folder / "model.onnx").is_file()
    res = export_trial(exp.task, folder, study=exp.study, task_data=exp.td, cache=exp.cache,
                       formats=("torchscript",))
    assert res.folder == folder and not (folder / "model.onnx").exists()
    assert set(manifest(folder)["files"]) | {"manifest.json"} == set(tree(folder))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["copy"]  # the old export is gone, nothing else
    load_exported(folder)


def test_replace_checks_again_and_keeps_files_added_during_the_refit(folder, tmp_path):
    new = tmp_path / ".new"
    new.mkdir()
    (new / "x").write_text("new")
    (folder / "late.txt").write_text("written while the refit ran")
    before = tree(folder)
    with pytest.raises(ExportError, match="late.txt"):
        _replace(new, folder)
    assert tree(folder) == before


# ============================================================================================
# 2. predict's integrity check: every file an export needs is listed, hashed and inside the folder
def test_swapped_classes_with_their_manifest_entry_removed_are_refused(folder):
    classes = json.loads((folder / "classes.json").read_text())
    classes[0], classes[1] = classes[1], classes[0]
    (folder / "classes.json").write_text(json.dumps(classes))
    doc = manifest(folder)
    del doc["files"]["classes.json"]
    write_manifest(folder, doc)
    with pytest.raises(ExportError, match=r"classes.json.*not listed in manifest.json"):
        load_exported(folder)


@pytest.mark.parametrize("name", ["config.yaml", "preprocessing.json", "metrics.json", "model.json", "README.md",
                                  "model.pt", "model.pt2", "model.ts", "model.onnx"])
def test_every_file_an_export_writes_must_be_listed(folder, name):
    doc = manifest(folder)
    del doc["files"][name]
    write_manifest(folder, doc)
    with pytest.raises(ExportError, match=rf"{name}.*not listed in manifest.json"):
        load_exported(folder)


@pytest.mark.parametrize("fmt, name", [("torchscript", "model.ts"), ("pt2", "model.pt2")])
def test_model_file_outside_the_folder_is_refused(folder, tmp_path, fmt, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = "evil" + Path(name).suffix
    shutil.copy(folder / name, outside / evil)
    for target in (f"../outside/{evil}", str(outside / evil)):
        info = json.loads((folder / "model.json").read_text())
        info["files"][fmt] = target
        (folder / "model.json").write_text(json.dumps(info))
        relist(folder, "model.json")
        relist(folder, target, outside / evil)  # even listed with the right hash
        with pytest.raises(ExportError, match=rf"{target}.*outside the folder"):
            load_exported(folder)
        with pytest.raises(ExportError, match="outside the folder"):
            load_exported(folder, verify=False)  # the model path is checked even without hashing


def test_manifest_entry_outside_the_folder_is_refused(folder, tmp_path):
    (tmp_path / "secret").write_text("x")
    relist(folder, "../secret", tmp_path / "secret")
    with pytest.raises(ExportError, match=r"\.\./secret.*outside the folder"):
        load_exported(folder)


def test_symlink_out_of_the_folder_is_refused(folder, tmp_path):
    shutil.copy(folder / "model.ts", tmp_path / "evil.ts")
    (folder / "model.ts").unlink()
    os.symlink(tmp_path / "evil.ts", folder / "model.ts")  # same bytes, same sha256, but elsewhere
    with pytest.raises(ExportError, match=r"model.ts.*outside the folder"):
        load_exported(folder)


def test_unlisted_extra_file_is_a_warning(folder, caplog):
    (folder / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="autoft"):
        model = load_exported(folder)
    assert model.classes
    assert any("notes.txt" in r.getMessage() and "not listed" in r.getMessage() for r in caplog.records)


def test_untampered_export_loads_without_warnings(exp, caplog):
    with caplog.at_level(logging.WARNING, logger="autoft"):
        load_exported(exp.res.folder)
    assert not caplog.records


# ============================================================================================
# 3. decompression bombs
def test_default_limit():
    assert 10_000 * 10_000 > DEFAULT_MAX_IMAGE_PIXELS >= 8000 * 6000  # refuses 100 MP, reads a 48 MP photo


def test_read_image_refuses_a_bomb_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    bomb = png(tmp_path / "bomb.png", 30_000, 30_000)
    assert bomb.stat().st_size < 200_000  # 900 million pixels in ~110 kB
    limit = Image.MAX_IMAGE_PIXELS
    # PIL's Image.open refuses it before its size can be read (more than twice PIL's limit): same message
    with pytest.raises(ExportError, match=r"bomb.png declares 900000000 pixels, more than the limit 50000000"):
        read_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global setting is left alone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the check does not depend on PIL's global
    with pytest.raises(ExportError, match=r"bomb.png.*declares 30000x30000"):
        read_image(bomb)
    big = png(tmp_path / "big.png", 10_000, 10_000)  # under PIL's error threshold, over ours
    with pytest.raises(ExportError, match=r"big.png.*declares 10000x10000.*100000000 pixels"):
        read_image(big)


def test_read_image_limit_is_configurable(tmp_path):
    small = png(tmp_path / "s.png", 11, 11)
    with pytest.raises(ExportError, match=r"s.png.*declares 11x11.*limit 100"):
        read_image(small, max_image_pixels=100)
    assert read_image(small, max_image_pixels=121).shape == (11, 11, 3)


def test_pil_bomb_checks_become_export_errors(tmp_path, monkeypatch):
    from PIL import Image

    # no limit of ours: PIL's own DecompressionBombError is still a clear error, not a traceback
    with pytest.raises(ExportError, match=r"bomb.png declares 900000000 pixels, more than PIL's limit"):
        read_image(png(tmp_path / "bomb.png", 30_000, 30_000), max_image_pixels=None)
    # PIL's warning zone (between its limit and twice it): allowed by our limit, so read without a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(png(tmp_path / "w.png", 12, 12)).shape == (12, 12, 3)


def test_predict_refuses_a_named_bomb(folder, tmp_path, capsys):
    bomb = png(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(ExportError, match=r"declares (30000x30000 \()?900000000 pixels"):
        load_exported(folder).predict(str(bomb))
    small = png(tmp_path / "s.png", 11, 11)
    with pytest.raises(ExportError, match="declares 11x11"):
        load_exported(folder, max_image_pixels=100).predict([small])
    assert main(["predict", "--model", str(folder), str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "declares 900000000 pixels" in err and "Traceback" not in err


# ============================================================================================
# 4. unreadable files in a folder are skipped and reported
def test_predict_on_a_folder_skips_unreadable_files(exp, tmp_path, caplog, capsys):
    d = tmp_path / "imgs"
    good = digit_pngs(exp, d)
    (d / "broken.png").write_bytes(b"not a png at all")
    png(d / "bomb.png", 30_000, 30_000)
    model = load_exported(exp.res.folder)
    with caplog.at_level(logging.WARNING, logger="autoft"):
        preds = model.predict(d)
    assert preds.inputs == [str(p) for p in good]
    assert [Path(f).name for f, _ in preds.skipped] == ["bomb.png", "broken.png"]
    assert "declares 900000000 pixels" in preds.skipped[0][1]
    for name in ("bomb.png", "broken.png"):
        assert any(name in r.getMessage() for r in caplog.records), name
    # the same images one by one give the same probabilities
    assert np.allclose(preds.probabilities, model.predict(good).probabilities)
    # a file named explicitly is still an error
    with pytest.raises(ExportError, match="broken.png"):
        model.predict([good[0], d / "broken.png"])
    # the command line says what it skipped
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(exp.res.folder), str(d), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped 2 unreadable file(s)" in text and "broken.png" in text
    assert len(out.read_text().splitlines()) == 1 + len(good)


def test_a_folder_with_no_readable_image_is_an_error(exp, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"junk")
    with pytest.raises(ExportError, match=r"no readable image.*a.png"):
        load_exported(exp.res.folder).predict(d)


# ============================================================================================
# 5. the model card escapes user strings
def test_model_card_escapes_newlines_and_pipes(exp):
    folder = exp.res.folder
    td = copy.copy(exp.td)
    td.data = copy.copy(exp.td.data)
    names = list(td.data.class_names)
    names[1] = "one\n# Injected heading"
    names[2] = "two|three"
    td.data.class_names = names
    task = exp.task.model_copy(update={"description": "line one\nline two | with a pipe"})
    ft = exp.study.best_trial
    from autoft.core import TrialConfig

    cfg = TrialConfig(**ft.user_attrs["config"])
    metrics = json.loads((folder / "metrics.json").read_text())
    info = json.loads((folder / "model.json").read_text())
    info["backbone"]["name"] = "evil|backbone\nname"
    info["search"]["study"] = "study\nname"
    res = types.SimpleNamespace(epochs_run=1, seconds=1.0)
    card = model_card(task, td, cfg, ft, res, ("train",), metrics, info, {"python": "3"})
    lines = card.splitlines()
    assert "# Injected heading" not in lines and not any(line.startswith("name") for line in lines)
    assert r"one\n# Injected heading" in card and r"two\|three" in card
    assert r"line one\nline two \| with a pipe" in card and r"evil\|backbone\nname" in card
    assert "\nline two" not in card
    # every table row still has its columns: count the pipes that are not escaped
    for line in lines:
        if line.startswith("|"):
            cells = line.replace(r"\|", "").count("|")
            assert cells in (3, 4), line
