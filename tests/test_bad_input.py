"""The bad-input catalogue: every case is a one-paragraph error naming file/field/value, exit code 2,
no traceback (``--debug`` shows one)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoft.cli import main
from autoft.errors import ConfigError
from autoft.task import parse_task

SMS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "data" / "sms_spam" / "SMSSpamCollection"


def _task(tmp_path, **doc) -> Path:
    base = {"name": "t", "modality": "image", "data": {"source": "digits"}, "budget": {"n_trials": 1, "max_epochs": 1}}
    base.update(doc)
    f = tmp_path / "task.yaml"
    f.write_text(yaml.safe_dump(base))
    return f


def _run(capsys, tmp_path, task: Path, *extra) -> str:
    code = main(["search", "--task", str(task), "--results-dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("autoft: error: ")
    assert len(err.strip().splitlines()) == 1  # one paragraph
    return err


def _csv(tmp_path, text: str, name="d.csv", encoding="utf-8") -> Path:
    f = tmp_path / name
    f.write_bytes(text.encode(encoding))
    return f


CASES = {
    "malformed yaml": (lambda p: (p / "task.yaml", (p / "task.yaml").write_text("name: [x\n"))[0],
                       ["malformed YAML at line"]),
    "misspelt key": (lambda p: _task(p, metrc="accuracy"), ["field 'metrc'", "did you mean 'metric'"]),
    "unknown nested key": (lambda p: _task(p, split={"vall": 0.2}), ["split.vall", "did you mean 'val'"]),
    "wrong type": (lambda p: _task(p, budget={"n_trials": "ten"}), ["budget.n_trials", "integer"]),
    "out of range": (lambda p: _task(p, split={"val": 0.5, "test": 0.6}), ["test", "sum below 1"]),
    "unknown metric": (lambda p: _task(p, metric="acc"), ["metric", "expected one of"]),
    "missing data path": (lambda p: _task(p, modality="text", data={"source": "csv", "path": "nope.csv"}),
                          ["nope.csv does not exist"]),
    "empty dataset": (lambda p: _task(p, modality="text", data={"source": "csv", "path": str(_csv(p, "text,label\n"))}),
                      ["dataset is empty"]),
    "single class": (lambda p: _task(p, modality="text", data={"source": "csv", "path": str(
        _csv(p, "text,label\n" + "".join(f"m{i},ham\n" for i in range(20))))}), ["same label ('ham')", "at least 2 classes"]),
    "too few per class": (lambda p: _task(p, modality="text", data={"source": "csv", "path": str(
        _csv(p, "text,label\n" + "".join(f"m{i},ham\n" for i in range(20)) + "x,spam\n"))}), ["class 'spam' has only 1 example"]),
    "missing label column": (lambda p: _task(p, modality="text", data={"source": "csv", "label_column": "lable",
                                                                         "path": str(_csv(p, "text,label\na,b\n"))}),
                             ["no column 'lable'", "did you mean 'label'"]),
    "bad encoding": (lambda p: _task(p, modality="text", data={"source": "csv", "path": str(
        _csv(p, "text,label\ncaf\u00e9,a\n", encoding="latin-1"))}), ["not valid utf-8", "data.encoding"]),
    "data not a folder": (lambda p: _task(p, data={"source": "image_folder", "path": str(p / "imgs")}), ["does not exist"]),
    "bad npz key": (lambda p: (np.savez(p / "a.npz", images=np.zeros((4, 8, 8)), y=np.arange(4) % 2),
                               _task(p, data={"source": "npz", "path": str(p / "a.npz")}))[1], ["no array 'x'", "data.x_key"]),
    "modality mismatch": (lambda p: _task(p, modality="text"), ["holds images", "modality: image"]),
    "positive class unknown": (lambda p: _task(p, modality="text", positive_class="spamm", data={
        "source": "csv", "path": str(_csv(p, "text,label\n" + "".join(f"m{i},{'ham' if i % 2 else 'spam'}\n" for i in range(40))))}),
        ["positive_class 'spamm'", "['ham', 'spam']"]),
    "unknown search space": (lambda p: _task(p, search_space="cifar_resnet"), ["did you mean 'cifar_resnets'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_task_input(case, tmp_path, capsys):
    make, words = CASES[case]
    err = _run(capsys, tmp_path, make(tmp_path))
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("extra, words", [
    (["--set", "lr=-0.1"], ["field 'lr'", "greater than 0"]),
    (["--set", "unfreeze=40", "--backbones", "resnet20"], ["unfreeze 40 is above the 10 stages of backbone 'resnet20'"]),
    (["--backbones", "resnet20,resnet_32"], ["unknown backbone 'resnet_32'", "did you mean"]),
    (["--set", "optimiser=sgd"], ["did you mean 'optimizer'"]),
    (["--set", "lr"], ["NAME=VALUE"]),
])
def test_bad_command_line(extra, words, tmp_path, capsys):
    err = _run(capsys, tmp_path, _task(tmp_path), *extra)
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("extra, field", [
    (["--n-trials", "0"], "--n-trials"), (["--n-trials", "-3"], "--n-trials"),
    (["--timeout", "0"], "--timeout"), (["--timeout", "-5"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--n-jobs", "0"], "--n-jobs"), (["--n-jobs", "-1"], "--n-jobs"),
])
def test_bad_budget_options(extra, field, tmp_path, capsys):
    """Checked before anything runs, as the task file's budget is; the message names the option."""
    err = _run(capsys, tmp_path, _task(tmp_path), *extra)
    assert f"field '{field}'" in err and extra[1] in err, err
    assert not (tmp_path / "r").exists()


def test_bad_budget_options_of_a_worker(tmp_path, capsys):
    for extra, field in ([["--n-trials", "0"], "--n-trials"], [["--timeout", "-1"], "--timeout"],
                         [["--threads", "0"], "--threads"]):
        code = main(["worker", "--task", str(_task(tmp_path)), "--storage", f"sqlite:///{tmp_path / 'w.db'}",
                     "--study-name", "s", *extra])
        err = capsys.readouterr().err
        assert code == 2 and f"field '{field}'" in err, err
    assert not (tmp_path / "w.db").exists()


def test_bad_space_file(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("backbone: []\n")
    err = _run(capsys, tmp_path, _task(tmp_path, search_space=str(space)))
    assert "space.yaml" in err and "backbone" in err


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "search", "--task", str(_task(tmp_path, metrc="x")), "--results-dir", str(tmp_path)])


def test_corrupt_and_odd_images_are_converted_or_skipped(tmp_path, caplog):
    from PIL import Image

    from autoft.data import load_image_folder

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (10, 12), 100).save(tmp_path / cls / "grey.png")
        Image.new("RGBA", (16, 16), (1, 2, 3, 4)).save(tmp_path / cls / "rgba.png")
        Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / cls / "rgb.jpg")
        (tmp_path / cls / "broken.png").write_bytes(b"not a png")
    d = load_image_folder(tmp_path)
    assert len(d) == 6 and all(x.shape[-1] == 3 for x in d.inputs)
    notes = " ".join(d.notes)
    assert "converted 2 L image(s)" in notes and "converted 2 RGBA image(s)" in notes
    assert "skipped 2 unreadable image(s)" in notes and "different sizes" in notes


# -- safe loading ------------------------------------------------------------------------------
PKG = Path(__file__).resolve().parents[1] / "autoft"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_no_unsafe_loading_in_the_package():
    files = list(PKG.rglob("*.py"))
    assert len(files) > 10
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names), f
        for node, owner, name in _calls(tree):
            bare = isinstance(node.func, ast.Name)  # eval(...) / exec(...), not module.eval()
            assert not (bare and name in ("eval", "exec", "compile", "__import__")), f"{f}:{node.lineno} calls {name}"
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{f}:{node.lineno} torch.load without weights_only=True"
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                raise AssertionError(f"{f}:{node.lineno} yaml.{name}: use yaml.safe_load")
            if owner == "np" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                assert getattr(kw.get("allow_pickle"), "value", None) is False, f"{f}:{node.lineno} np.load pickles"


def test_task_yaml_cannot_construct_python_objects(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo hacked']\nmodality: image\ndata: {source: digits}\n")
    from autoft.task import load_task

    with pytest.raises(ConfigError, match="malformed YAML"):
        load_task(f)


# -- property-based: generated task documents --------------------------------------------------
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(-1, 2, allow_nan=False),
                    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=2))
_valid = st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True), "modality": st.just("image"),
     "data": st.just({"source": "digits"})},
    optional={"metric": st.sampled_from(["accuracy", "f1_macro", "precision_macro", "recall_macro", "loss"]),
              "split": st.fixed_dictionaries({}, optional={"val": st.floats(0.05, 0.4), "test": st.floats(0.0, 0.4),
                                                           "seed": st.integers(0, 10)}),
              "budget": st.fixed_dictionaries({}, optional={"n_trials": st.integers(1, 500),
                                                            "max_epochs": st.integers(1, 50),
                                                            "timeout": st.floats(1, 1e5)}),
              "pruner": st.sampled_from(["hyperband", "median", "successive_halving", "none"]),
              "seed": st.integers(0, 1000), "device": st.sampled_from(["cpu", "auto", "cuda:1"])})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid)
def test_valid_generated_tasks_are_accepted(doc):
    t = parse_task(doc, "gen.yaml")
    assert t.name == doc["name"] and t.direction in ("maximize", "minimize")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid, st.sampled_from(["name", "modality", "data", "metric", "split", "budget", "pruner", "seed", "device",
                                "extra_key"]), _values)
def test_mutated_tasks_never_crash(doc, key, value):
    doc = {**doc, key: value}
    try:
        t = parse_task(doc, "gen.yaml")
    except ConfigError as exc:  # the documented error: names the file and what was wrong
        assert str(exc).startswith("gen.yaml: ") and "field '" in str(exc)
        return
    assert isinstance(t.name, str)


@pytest.mark.parametrize("device, expected", [("tpu", "not one of cpu, auto, cuda, cuda:N, mps"),
                                              ("cuda:99", "cuda:99")])
def test_device_option_is_checked_before_anything_runs(capsys, tmp_path, device, expected):
    """`autoft search --device` replaces the task's device; a device that is not there is an error naming it."""
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    err = _run(capsys, tmp_path, _task(tmp_path), "--device", device)
    assert "device" in err and expected in err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_device_option_replaces_the_tasks_device(tmp_path, monkeypatch):
    import autoft.api

    seen = {}

    def fake_search(task, **kw):
        seen["device"] = task.device
        raise SystemExit(0)  # stop here: only the device handed to the search matters

    monkeypatch.setattr(autoft.api, "search", fake_search)
    with pytest.raises(SystemExit):
        main(["search", "--task", str(_task(tmp_path, device="cuda")), "--results-dir", str(tmp_path / "r"),
              "--device", "cpu"])
    assert seen["device"] == "cpu"
