"""The wheel carries everything the main job needs: built-in tasks and search spaces are package data.

Builds the wheel, installs it (not editable) into a fresh virtual environment that borrows only the
third-party dependencies from this interpreter, and runs a 2-trial search of a built-in task from a
folder outside the repository."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, cwd=out)
    (whl,) = out.glob("autoft-*.whl")
    return whl


def test_wheel_ships_builtin_tasks_and_spaces(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("digits.yaml", "digits-fewshot.yaml", "sms-spam.yaml"):
        assert f"autoft/builtin/tasks/{f}" in names
    for f in ("cifar_resnets.yaml", "text_minilm.yaml", "imagenet_convnets.yaml"):
        assert f"autoft/builtin/search_spaces/{f}" in names


@pytest.mark.slow
def test_search_from_installed_wheel_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([str(py), "-c", "import autoft; print(autoft.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"autoft imported from {where}, not from the installed wheel"
    r = subprocess.run([str(venv / "bin" / "autoft"), "search", "--task", "digits", "--n-trials", "2",
                        "--set", "epochs=1", "--set", "backbone=resnet20", "--no-rank"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "best: trial #" in r.stdout
    study = work / "results" / "digits" / "default"
    assert (study / "trials.csv").is_file() and (work / "results" / "digits" / "optuna.db").is_file()
