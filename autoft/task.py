"""Task files: what to learn from, how to score it, and how much search to spend.

A task file is YAML validated by :class:`Task`; every error names the file and the field.
``${VAR}`` in paths expands from the environment (``${AUTOFT_HOME}`` defaults to autoft's cache
folder).  ``find_task(name_or_path)`` looks in ``./tasks/NAME.yaml``, then the built-in tasks
(``autoft/builtin/tasks``, shipped inside the package).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoft.core.metrics import ALL as METRICS
from autoft.core.metrics import BINARY_ONLY, MINIMIZE
from autoft.data.datasets import DEFAULT_MAX_IMAGE_PIXELS
from autoft.errors import ConfigError, did_you_mean
from autoft.study.names import NAME_PATTERN

# built-in task files and search spaces are package data: found the same way from a wheel and a checkout
BUILTIN = Path(__file__).resolve().parent / "builtin"
BUILTIN_TASKS = BUILTIN / "tasks"
BUILTIN_SPACES = BUILTIN / "search_spaces"
PRUNERS = ("hyperband", "median", "successive_halving", "none")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Model):
    source: Literal["digits", "image_folder", "image_table", "csv", "npz"] = Field(description=(
        "digits; image_folder (one sub-folder per class); image_table (CSV/TSV/Parquet of image paths and "
        "labels); csv (a text table: CSV/TSV/JSONL/Parquet by its suffix); npz"))
    path: str | None = None
    test_path: str | None = Field(None, description=(
        "a fixed test set in the same form as data.path (a folder or table): never split, never searched on; "
        "data.path is then split into train and validation only"))
    path_column: str = Field("path", description="image_table: the column of image paths")
    text_column: str = "text"
    label_column: str = "label"
    sep: str | None = None
    encoding: str = "utf-8"
    x_key: str = "x"
    y_key: str = "y"
    max_length: int = Field(128, ge=8, le=4096, description="text: tokens kept per example")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, description=(
        "image_folder: images whose header declares more pixels are skipped, not decoded "
        "(decompression bombs)"))
    num_workers: int | None = Field(None, ge=0, description=(
        "DataLoader worker processes that decode and transform streamed images (default: the CPU cores but "
        "one, AUTOFT_NUM_WORKERS)"))
    memory_budget_mb: float | None = Field(None, gt=0, description=(
        "images are encoded once into memory when that takes at most this many MB (and augment is none), "
        "else streamed from their files per batch (default 1024, AUTOFT_MEMORY_BUDGET_MB)"))

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.source '{self.source}' needs data.path")
        if self.test_path and self.source == "digits":
            raise ValueError("data.test_path needs a data.source read from files")
        return self


class SplitSpec(_Model):
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    train_per_class: int | None = Field(None, ge=1)
    val_per_class: int | None = Field(None, ge=1)


class FairnessSpec(_Model):
    """The group attribute the evaluation reports fairness across (one of the three)."""

    group_column: str | None = Field(None, description="csv: a column of data.path holding each example's group")
    groups_file: str | None = Field(None, description=(
        "a CSV with a 'group' column and 'path' (image files, relative to data.path), 'text' or 'index'; "
        "relative to this task file"))
    length_bands: list[int] | None = Field(None, description="text: groups by length in characters, e.g. [60]")

    @model_validator(mode="after")
    def _one(self):
        if sum(bool(v) for v in (self.group_column, self.groups_file, self.length_bands)) != 1:
            raise ValueError("fairness needs exactly one of group_column, groups_file, length_bands")
        return self


class BudgetSpec(_Model):
    n_trials: int = Field(30, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds (see timeout_mode)")
    timeout_mode: Literal["command", "trials"] = Field("command", description=(
        "command: the timeout bounds the whole search command (ranking, trials, final check); "
        "trials: no new trial starts after it (a running trial and the final check run to their end)"))
    max_epochs: int = Field(8, ge=1)
    # the finalists (autoft.study.finalists): the top configurations re-run before the winner is chosen by the mean
    finalists: int = Field(3, ge=0, description="distinct configurations re-run before choosing (0: off)")
    finalist_seeds: int = Field(3, ge=0, description="folds per finalist (cv), or seeds (its own + the rest)")
    finalist_mode: Literal["seeds", "cv"] = Field("cv", description=(
        "cv: stratified folds of train+validation at the search's split sizes (the default: the winner's "
        "validation-to-test gap was the smallest this way); seeds: re-run with more seeds"))


class Task(_Model):
    # a folder name under the results folder: no separators, and no leading dot ('.', '..', hidden)
    name: str = Field(pattern=rf"^{NAME_PATTERN.pattern}$")
    modality: Literal["image", "text"]
    data: DataSpec
    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] | None = None
    positive_class: str | None = None
    split: SplitSpec = SplitSpec()
    budget: BudgetSpec = BudgetSpec()
    search_space: str | None = None  # default: cifar_resnets for images, text_minilm for text
    pruner: Literal["hyperband", "median", "successive_halving", "none"] = "hyperband"
    seed: int = 0
    device: str = "cpu"
    description: str = ""
    fairness: FairnessSpec | None = None  # the group attribute of the evaluation's fairness section
    track: str | None = Field(None, description="MLflow tracking URI: every search of this task is recorded there")
    objectives: list[str] | None = Field(None, description=(
        "accuracy (the task's metric alone, the default) or accuracy,latency: a multi-objective search of the "
        "metric and the model's CPU latency at batch 1 (latency_cpu_b64, latency_gpu_b1, latency_gpu_b64: the "
        "others); --objectives overrides it"))

    # where the file was read from (not a field of the file)
    _file: Path | None = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric '{v}'{did_you_mean(v, METRICS)}; expected one of {sorted(METRICS)}")
        return v

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError(f"device '{v}' is not one of cpu, auto, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.direction is None:
            self.direction = "minimize" if self.metric in MINIMIZE else "maximize"
        if self.data.source == "csv" and self.modality != "text":
            raise ValueError("data.source 'csv' holds texts: set modality: text")
        if self.data.source in ("digits", "image_folder", "image_table", "npz") and self.modality != "image":
            raise ValueError(f"data.source '{self.data.source}' holds images: set modality: image")
        if self.split.val == 0 and self.split.train_per_class is None:
            raise ValueError("split.val must be above 0: the search scores trials on the validation split")
        return self

    @property
    def file(self) -> Path | None:
        return self._file

    def data_path(self) -> Path | None:
        return Path(expand_vars(self.data.path, self._file, "data.path")) if self.data.path else None

    def test_path(self) -> Path | None:
        return Path(expand_vars(self.data.test_path, self._file, "data.test_path")) if self.data.test_path else None

    def search_space_path(self) -> Path:
        default = "text_minilm" if self.modality == "text" else "cifar_resnets"
        return find_search_space(self.search_space or default, self._file)

    # -- loading data -------------------------------------------------------------------------
    def load_data(self, path: Path | None = None):
        from autoft import data as D

        path, d = path or self.data_path(), self.data
        if d.source == "digits":
            ld = D.load_digits_data()
        elif d.source == "image_folder":
            ld = D.load_image_folder(path, max_image_pixels=d.max_image_pixels)
        elif d.source == "image_table":
            ld = D.load_image_table(path, d.path_column, d.label_column, d.sep, max_image_pixels=d.max_image_pixels)
        elif d.source == "csv":
            ld = D.load_csv(path, d.text_column, d.label_column, d.sep, d.encoding)
        else:
            ld = D.load_npz(path, d.x_key, d.y_key)
        return ld.validate()

    def prepare(self, device: str | None = None):
        """Load the data and split it: the :class:`TaskData` the core runs on."""
        from autoft.core.train import TaskData
        from autoft.data import stratified_split

        ld = self.load_data()
        s = self.split
        fixed = self.test_path()
        splits = stratified_split(ld.labels, val=s.val, test=0.0 if fixed else s.test, seed=s.seed,
                                  train_per_class=s.train_per_class, val_per_class=s.val_per_class,
                                  source=str(self.data_path() or self.data.source), class_names=ld.class_names)
        if fixed:
            ld, splits = self._with_test_set(ld, splits, fixed)
        pos = None
        if ld.num_classes == 2:
            if self.positive_class is not None:
                if self.positive_class not in ld.class_names:
                    raise ConfigError(f"positive_class '{self.positive_class}' is not a class of the data; "
                                      f"classes are {ld.class_names}", file=self._file, field="positive_class")
                pos = ld.class_names.index(self.positive_class)
            else:
                pos = 1
        elif self.metric in BINARY_ONLY:
            raise ConfigError(f"metric '{self.metric}' is for binary tasks, but the data has "
                              f"{ld.num_classes} classes; use accuracy or f1_macro", file=self._file, field="metric")
        budget = self.data.memory_budget_mb
        return TaskData(ld, splits, self.metric, pos, device or self.device, self.name,
                        max_length=self.data.max_length if self.modality == "text" else None,
                        num_workers=self.data.num_workers,
                        memory_budget=int(budget * (1 << 20)) if budget is not None else None)

    def _with_test_set(self, ld, splits, path: Path):
        """Append the fixed test set (data.test_path) to the data: its examples are the test split."""
        import numpy as np

        from autoft.data import LabelledData, Splits

        test = self.load_data(path)
        unknown = sorted(set(test.class_names) - set(ld.class_names))
        if unknown:
            raise ConfigError(f"the test set {path} has classes the training data lacks: {unknown[:5]}; "
                              f"training classes are {ld.class_names}", file=self._file, field="data.test_path")
        index = {c: i for i, c in enumerate(ld.class_names)}
        labels = np.array([index[test.class_names[y]] for y in test.labels.tolist()], dtype=np.int64)
        inputs = ld.inputs + test.inputs if not isinstance(ld.inputs, list) else list(ld.inputs) + list(test.inputs)
        n = len(ld)
        merged = LabelledData(inputs, np.concatenate([ld.labels, labels]), ld.class_names, ld.modality, ld.source,
                              ld.notes + [f"test set {path}: {note}" for note in test.notes])
        return merged, Splits(splits.train, splits.val, np.arange(n, n + len(test), dtype=np.int64))


_VAR = re.compile(r"\$\$|\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# task files may read only these variables (a value lands in messages, reports and the export's card,
# so a task file from elsewhere must not be able to pull arbitrary secrets out of the environment)
ALLOWED_VARS = ("AUTOFT_HOME", "HOME", "TMPDIR", "USER", "XDG_CACHE_HOME", "XDG_DATA_HOME")
ALLOWED_PREFIX = "AUTOFT_"


def expand_vars(value: str, file: Path | None = None, field: str = "") -> str:
    """Expand ``${VAR}``/``$VAR`` from the environment; relative paths are relative to the task file.

    Only :data:`ALLOWED_VARS` and names starting with ``AUTOFT_`` are expanded; ``$$`` is a literal
    ``$``."""
    from autoft.home import autoft_home

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        var = m.group(1) or m.group(2)
        if var not in ALLOWED_VARS and not var.startswith(ALLOWED_PREFIX):
            raise ConfigError(f"environment variable {var} in '{value}' is not one a task file may use: allowed are "
                              f"{', '.join(ALLOWED_VARS)} and names starting with {ALLOWED_PREFIX} "
                              "(write $$ for a literal $)", file=file, field=field)
        if var in os.environ:
            return os.environ[var]
        if var == "AUTOFT_HOME":
            return str(autoft_home())
        raise ConfigError(f"environment variable {var} used in '{value}' is not set", file=file, field=field)

    out = os.path.expanduser(_VAR.sub(sub, value))
    if file is not None and not os.path.isabs(out):
        cand = (file.parent / out)
        if cand.exists() or not Path(out).exists():
            out = str(cand)
    return out


def _format_validation_error(exc: ValidationError, file: Path | str) -> ConfigError:
    lines = []
    first_field = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        first_field = first_field or loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = Task
            for part in err["loc"][:-1]:
                ann = parent.model_fields.get(str(part))
                parent = ann.annotation if ann is not None and isinstance(ann.annotation, type) else parent
            key = str(err["loc"][-1])
            known = list(getattr(parent, "model_fields", {}))
            msg = f"unknown key '{key}'{did_you_mean(key, known)}; allowed keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "is required but missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg += f" (got {err['input']!r})"
        lines.append(f"field '{loc}': {msg}")
    return ConfigError("; ".join(lines), file=str(file), field=None) if len(lines) > 1 else \
        ConfigError(lines[0].split(": ", 1)[1], file=str(file), field=first_field)


def read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file does not exist", file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file is not UTF-8 text", file=str(path)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"malformed YAML{where}: {problem}", file=str(path)) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"a {what} file must be a YAML mapping (key: value lines), got "
                          f"{type(doc).__name__}", file=str(path))
    return doc


def parse_task(doc: dict, file: Path | str = "<task>") -> Task:
    try:
        task = Task.model_validate(doc)
    except ValidationError as exc:
        raise _format_validation_error(exc, file) from None
    task._file = Path(file) if file != "<task>" else None
    return task


def find_named_yaml(name_or_path: str | Path, local: Path, builtin: Path, what: str, plural: str) -> Path:
    """A YAML file given by path, or by name: ``local/NAME.yaml`` first, then ``builtin/NAME.yaml``;
    an unknown name lists the known ones with a did-you-mean (tasks, suites)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file() or os.sep in str(name_or_path):
        if not p.is_file():
            raise ConfigError(f"{what} file {p} does not exist")
        return p
    for folder in (local, builtin):
        for ext in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{ext}").is_file():
                return folder / f"{name_or_path}{ext}"
    known = sorted({f.stem for d in (local, builtin) if d.is_dir() for f in d.glob("*.y*ml")})
    raise ConfigError(f"no {what} named '{name_or_path}'{did_you_mean(str(name_or_path), known)}: looked for "
                      f"{name_or_path}.yaml in ./{local.name}/ and in the built-in {plural} ({builtin}). "
                      f"Known {plural}: {', '.join(known) or 'none'}")


def find_task(name_or_path: str | Path) -> Path:
    return find_named_yaml(name_or_path, Path.cwd() / "tasks", BUILTIN_TASKS, "task", "tasks")


def load_task(name_or_path: str | Path) -> Task:
    path = find_task(name_or_path)
    return parse_task(read_yaml(path, "task"), path)


def find_search_space(name_or_path: str, task_file: Path | None = None) -> Path:
    p = Path(expand_vars(name_or_path, None))
    candidates = [p] if p.suffix in (".yaml", ".yml") else []
    if task_file is not None and p.suffix in (".yaml", ".yml"):
        candidates.append(task_file.parent / p)
    for folder in (Path.cwd() / "search_spaces", BUILTIN_SPACES):
        candidates += [folder / f"{name_or_path}.yaml", folder / p.name]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({f.stem for d in (Path.cwd() / "search_spaces", BUILTIN_SPACES) if d.is_dir()
                    for f in d.glob("*.yaml")})
    raise ConfigError(f"search space '{name_or_path}' not found{did_you_mean(name_or_path, known)} "
                      f"(looked in ./search_spaces/ and {BUILTIN_SPACES}); known: {', '.join(known)}",
                      file=str(task_file) if task_file else None, field="search_space")
