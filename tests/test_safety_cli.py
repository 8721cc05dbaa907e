"""Security audit of the command line: where results may be written, what a storage URL shows, and
how the Ray engine treats what it finds on disk or on the network.

* a study name or task name never leads outside the results folder (``..``, absolute paths,
  separators, leading dots, symbolic links inside the results folder);
* a storage URL's password is never printed nor written (one redaction everywhere);
* a storage that cannot be opened is one clear error, at once, naming the redacted URL.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from autoft.cli import main
from autoft.errors import ConfigError
from autoft.study import redact_url, validate_name

PASSWORD = "s3cr3t-Pw"


def _task(tmp_path: Path, name: str = "t") -> Path:
    doc = {"name": name, "modality": "image", "data": {"source": "digits"}, "budget": {"n_trials": 1, "max_epochs": 1}}
    f = tmp_path / f"task-{abs(hash(name))}.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _search(capsys, task: Path, results: Path, *extra) -> tuple[int, str, str]:
    code = main(["search", "--task", str(task), "--results-dir", str(results), "--backbones", "resnet20",
                 "--set", "unfreeze=0", "--no-rank", "--no-final-check", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- 1. names and paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../x", "..", ".", ".hidden", "a/b", "a\\b", "", "x" * 300])
def test_validate_name_rejects_paths(name):
    with pytest.raises(ConfigError, match="--study-name"):
        validate_name(name, "--study-name")


@pytest.mark.parametrize("name", ["default", "sweep-1", "a.b_c", "Run.2"])
def test_validate_name_accepts_plain_names(name):
    assert validate_name(name, "--study-name") == name


@pytest.mark.parametrize("study", ["../../../x", "ABSOLUTE", "..", ".", "a/b"])
def test_study_name_cannot_leave_the_results_folder(study, tmp_path, capsys):
    results = tmp_path / "a" / "b" / "r"
    outside = tmp_path / "abs"
    if study == "ABSOLUTE":
        study = str(outside)
    code, out, err = _search(capsys, _task(tmp_path), results, "--study-name", study)
    assert code == 2, err
    assert err.startswith("autoft: error: ") and "--study-name" in err and "Traceback" not in err
    # nothing written anywhere (the results folder is not even created)
    assert _files_under(tmp_path / "a") == [] and not outside.exists()


@pytest.mark.parametrize("name", ["..", "."])
def test_task_name_cannot_leave_the_results_folder(name, tmp_path, capsys):
    task = _task(tmp_path, name)
    code, out, err = _search(capsys, task, tmp_path / "r")
    assert code == 2, err
    assert "field 'name'" in err and task.name in err
    assert not (tmp_path / "default").exists() and _files_under(tmp_path / "r") == []


def test_a_symlink_in_the_results_folder_is_not_followed_out(tmp_path, capsys):
    """A results folder received from elsewhere may hold a link to another place: nothing is written there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "r" / "t").mkdir(parents=True)
    (tmp_path / "r" / "t" / "default").symlink_to(outside, target_is_directory=True)
    code, out, err = _search(capsys, _task(tmp_path), tmp_path / "r")
    assert code == 2, err
    assert "outside the results folder" in err and "--study-name" in err
    assert list(outside.iterdir()) == []


# -- 2. redaction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("postgresql+psycopg2://user:secret@host:5432/db", "postgresql+psycopg2://user:***@host:5432/db"),
    ("mysql://root:secret@127.0.0.1/autoft?charset=utf8", "mysql://root:***@127.0.0.1/autoft?charset=utf8"),
    ("mysql+pymysql://u:secret@h/d", "mysql+pymysql://u:***@h/d"),
    ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
    ("postgresql://user:p@ss/w:rd@host/db", "postgresql://user:***@host/db"),  # unescaped @ / : in it
    ("postgresql://user:sec?ret@host/db", "postgresql://user:***@host/db"),
    ("postgresql://host/db?user=u&password=secret&sslmode=require",
     "postgresql://host/db?user=u&password=***&sslmode=require"),
    ("postgresql://u@host/db?PASSWORD=secret", "postgresql://u@host/db?PASSWORD=***"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
    ("sqlite:////tmp/x@y/optuna.db", "sqlite:////tmp/x@y/optuna.db"),
    ("journal:/tmp/study.log", "journal:/tmp/study.log"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url)


def test_search_never_prints_the_storage_password(tmp_path, capsys):
    url = f"postgresql://autoft:{PASSWORD}@127.0.0.1:1/autoft"
    t0 = time.perf_counter()
    code, out, err = _search(capsys, _task(tmp_path), tmp_path / "r", "--storage", url)
    took = time.perf_counter() - t0
    assert code == 2, err
    assert PASSWORD not in out + err
    assert "postgresql://autoft:***@127.0.0.1:1/autoft" in err and "Traceback" not in err
    assert took < 10, f"refused connection took {took:.1f}s to report"
    for f in _files_under(tmp_path):  # nor written to any file
        assert PASSWORD not in f.read_text(errors="replace"), f


@pytest.mark.parametrize("command", [["show"], ["report"], ["export", "--out", "EXPORT"],
                                     ["worker", "--n-trials", "1"]])
def test_other_commands_never_print_the_storage_password(command, tmp_path, capsys):
    url = f"postgresql+psycopg2://autoft:{PASSWORD}@127.0.0.1:1/autoft?sslmode=disable"
    argv = [command[0], "--task", str(_task(tmp_path)), "--storage", url, "--study-name", "s",
            "--results-dir", str(tmp_path / "r"), *[str(tmp_path / a) if a == "EXPORT" else a for a in command[1:]]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert PASSWORD not in out + err and "autoft:***@127.0.0.1:1" in err, err


def test_request_repr_hides_the_password():
    from autoft.engines.base import SearchRequest
    from autoft.task import load_task

    req = SearchRequest(task=load_task("digits"), space=None, storage=f"postgresql://u:{PASSWORD}@h/d")
    assert PASSWORD not in repr(req)


# -- 9. a storage that cannot be opened -----------------------------------------------------------
def test_sqlite_storage_in_a_missing_folder_is_one_quick_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'optuna.db'}"
    t0 = time.perf_counter()
    code, out, err = _search(capsys, _task(tmp_path), tmp_path / "r", "--storage", url)
    assert code == 2, err
    assert time.perf_counter() - t0 < 5
    assert err.startswith("autoft: error: ") and "Traceback" not in err
    assert url in err and "does not exist" in err and str(tmp_path / "missing") in err


def test_journal_storage_in_a_missing_folder_is_one_quick_error(tmp_path, capsys):
    url = f"journal:{tmp_path / 'missing' / 'study.log'}"
    code, out, err = _search(capsys, _task(tmp_path), tmp_path / "r", "--storage", url)
    assert code == 2, err
    assert url in err and "does not exist" in err and "Traceback" not in err


def test_the_study_package_does_not_import_the_engines():
    """autoft.study is the system of record the engines build on: it must not depend on them."""
    import ast

    for f in (Path(__file__).resolve().parents[1] / "autoft" / "study").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith("autoft.engines") for m in mods), f"{f.name} imports {mods}"
