"""What ``autoft evaluate`` evaluates: a trial of a study (refitted with its exact configuration and
seed) or an exported folder, on a split of its task or on a new labelled file or folder; and where
group values for the fairness section come from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from autoft.data.lazy import Rows
from autoft.errors import ConfigError, DataError
from autoft.evaluation.evaluate import (SPLITS, Evaluation, ModelAccess, data_logits, evaluate_predictions,
                                        evaluate_winner, split_logits)

log = logging.getLogger(__name__)


# -- new labelled data ----------------------------------------------------------------------------
def load_labelled(path: str | Path, modality: str, classes: list[str], *, text_column: str = "text",
                  label_column: str = "label", sep: str | None = None, encoding: str = "utf-8"):
    """A labelled file (text: CSV/TSV with a text and a label column) or folder (images: one
    sub-folder per class), with labels renumbered to the model's ``classes``.  Labels the model does
    not know are an error (the model cannot predict them)."""
    from autoft.data import LabelledData, load_csv, load_image_folder

    path = Path(path)
    if modality == "text":
        if path.is_dir():
            raise DataError(f"--data {path} is a folder; a text model is evaluated on a CSV/TSV file "
                            "(--text-column, --label-column)")
        data = load_csv(path, text_column, label_column, sep, encoding)
    else:
        if not path.is_dir():
            raise DataError(f"--data {path} is not a folder; an image model is evaluated on a folder with one "
                            "sub-folder per class")
        data = load_image_folder(path)
    unknown = sorted(set(data.class_names) - set(classes))
    if unknown:
        raise DataError(f"{path}: label(s) {', '.join(map(repr, unknown[:10]))} are not classes of the model "
                        f"({', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[data.class_names[i]] for i in data.labels], dtype=np.int64)
    return LabelledData(data.inputs, labels, list(classes), data.modality, data.source, data.notes)


def resolve_groups(data, *, source: str | Path | None = None, group_column: str | None = None,
                   groups_file: str | Path | None = None, length_bands: list[int] | None = None,
                   text_column: str = "text", label_column: str = "label", sep: str | None = None,
                   encoding: str = "utf-8") -> tuple[np.ndarray | None, str]:
    """One group value per example of ``data`` (a LabelledData loaded from ``source``), and the
    attribute's name; (None, "") when no group option is given.  At most one of: ``group_column`` (a
    column of the text table ``source``), ``groups_file`` (a table: ``path`` / ``text`` / ``index`` and
    ``group``), ``length_bands`` (text length in characters, e.g. ``[60]``: <=60 and >60)."""
    from autoft.evaluation import fairness as F

    given = [o for o in (group_column, groups_file, length_bands) if o]
    if not given:
        return None, ""
    if len(given) > 1:
        raise ConfigError("give one group attribute: --group-column, --groups or --length-bands", field="--groups")
    if group_column:
        if data.modality != "text" or source is None or Path(source).is_dir():
            raise ConfigError("--group-column names a column of a text table; for images give --groups FILE "
                              "(a table of image paths and groups)", field="--group-column")
        return F.groups_from_column(Path(source), group_column, data.inputs, text_column=text_column,
                                    label_column=label_column, sep=sep, encoding=encoding), group_column
    if length_bands:
        if data.modality != "text":
            raise ConfigError("--length-bands groups texts by their length; this data holds images",
                              field="--length-bands")
        edges = sorted(int(e) for e in length_bands)
        return F.length_bands(data.inputs, edges), f"length (chars, bands at {','.join(map(str, edges))})"
    paths = None
    if data.modality == "image" and source is not None and Path(source).is_dir():
        paths = F.image_paths(Path(source), data.class_names, data.labels)
    return F.groups_from_file(Path(groups_file), len(data), paths=paths, root=source,
                              texts=data.inputs if data.modality == "text" else None), "group"


def task_groups(task, data, *, group_column: str | None = None, groups_file: str | Path | None = None,
                length_bands: list[int] | None = None) -> tuple[np.ndarray | None, str]:
    """:func:`resolve_groups` for a task's own data (its table, its columns).  Without options, the
    task file's ``fairness`` section when it has one (``group_column``, ``groups_file`` relative to the
    task file, or ``length_bands``)."""
    d = task.data
    spec = getattr(task, "fairness", None)
    if spec is not None and not (group_column or groups_file or length_bands):
        group_column = getattr(spec, "group_column", None)
        length_bands = getattr(spec, "length_bands", None)
        groups_file = getattr(spec, "groups_file", None)
        if groups_file:
            from autoft.task import expand_vars

            groups_file = expand_vars(str(groups_file), task.file, "fairness.groups_file")
    source = task.data_path() if d.path else None
    return resolve_groups(data, source=source, group_column=group_column, groups_file=groups_file,
                          length_bands=length_bands, text_column=d.text_column, label_column=d.label_column,
                          sep=d.sep, encoding=d.encoding)


# -- a trial of a study -----------------------------------------------------------------------------
def evaluate_trial(task, *, study: str = "default", trial: int | None = None, results_dir: str | Path = "results",
                   storage: str | None = None, split: str = "test", data: str | Path | None = None,
                   text_column: str | None = None, label_column: str | None = None,
                   group_column: str | None = None, groups_file: str | Path | None = None,
                   length_bands: list[int] | None = None, out: str | Path | None = None, explain: int = 4,
                   n_boot: int = 1000, n_bins: int = 15, seed: int = 0, calibrate: bool = True, cache=None,
                   html: bool = True) -> Evaluation:
    """Refit a trial of a study (the best by default) with its exact configuration and seed and evaluate
    it on ``split`` of its task, or on the labelled file/folder ``data`` (calibration is then still
    fitted on the task's validation split).  Default folder: ``results/<task>/<study>/evaluation``
    for the best trial on the test split (what the search's final check writes), else
    ``evaluation-trial<N>-<split or data name>`` beside it.  ``html`` also writes the study's
    ``report.html``."""
    from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
    from autoft.core.train import memory_budget
    from autoft.export.export import open_study, select_trial
    from autoft.study import ensure_inside, validate_name
    from autoft.study.record import metric_value
    from autoft.task import Task, load_task

    task = task if isinstance(task, Task) else load_task(task)
    validate_name(study, "--study")
    study_obj = open_study(task, study, results_dir, storage)
    ft = select_trial(study_obj, trial)
    best = select_trial(study_obj, None).number
    cfg = TrialConfig(**ft.user_attrs["config"])  # select_trial checked that the trial records it
    td = task.prepare()
    cache = cache or FeatureCache()
    study_dir = Path(results_dir) / task.name / study
    if out is None:
        name = "evaluation" if ft.number == best and data is None and split == "test" else \
            f"evaluation-trial{ft.number}-{Path(data).stem if data else split}"
        out = study_dir / name
        ensure_inside(out, Path(results_dir), "--study")
    log.info("refitting trial #%d (%s) to evaluate it", ft.number, cfg.backbone)
    res = fine_tune_and_score(cfg, td, cache=cache, test=len(td.splits.test) > 0, return_model=True)
    ctx = {"study": study, "trial": ft.number, "best_trial": best, "config": cfg.model_dump(),
           "validation_score_search": metric_value(ft)}
    if data is None:
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}", field="--split")
        groups, gname = task_groups(task, td.data, group_column=group_column, groups_file=groups_file,
                                    length_bands=length_bands)
        ev = evaluate_winner(res, td, out, cache=cache, split=split, groups=groups, group_name=gname or "group",
                             calibrate=calibrate, explain=explain, n_boot=n_boot, n_bins=n_bins, seed=seed,
                             context=ctx)
    else:
        model = res.model
        tc = text_column or task.data.text_column
        lc = label_column or task.data.label_column
        new = load_labelled(data, td.data.modality, td.data.class_names, text_column=tc, label_column=lc)
        groups, gname = resolve_groups(new, source=data, group_column=group_column, groups_file=groups_file,
                                       length_bands=length_bands, text_column=tc, label_column=lc)
        budget = memory_budget(td)
        logits = data_logits(model, new, cache, budget=budget)
        val = split_logits(model, td, ("val",), cache)["val"] if calibrate else None
        val_y = torch.from_numpy(td.data.labels[np.sort(td.splits.val)]) if calibrate else None
        access = _new_data_access(model, new, cache, budget) if explain > 0 else None
        ev = evaluate_predictions(logits, torch.from_numpy(new.labels), new.class_names, out, metric=td.metric,
                                  positive_index=td.positive_index, split=f"data {Path(data).name}",
                                  val_logits=val, val_target=val_y, groups=groups, group_name=gname or "group",
                                  raw_inputs=new.inputs, ids=_ids(new, data), access=access, explain=explain,
                                  n_boot=n_boot, n_bins=n_bins, seed=seed, title=f"{task.name}: {cfg.backbone}",
                                  context={"task": task.name, **ctx, "data": str(data)})
    if html:
        from autoft.evaluation.report_html import write_study_report

        write_study_report(study_dir, evaluation_dir=out, task=task)
    return ev


def _ids(data, source) -> list[str]:
    if data.modality == "image" and Path(source).is_dir():
        try:
            from autoft.evaluation.fairness import image_paths

            return image_paths(Path(source), data.class_names, data.labels)
        except DataError:
            pass
    return [f"row {i}" for i in range(len(data))]


def _new_data_access(model, data, cache, budget: int | None = None) -> ModelAccess:
    from autoft.evaluation.evaluate import _classifier_access

    return _classifier_access(model, data, torch.arange(len(data)), cache, budget)


# -- an exported folder -------------------------------------------------------------------------------
def export_calibration(folder: Path, classes: list[str], manifest: dict):
    """The export's ``calibration.json`` when it has one listed in its manifest (hash-checked by loading)."""
    from autoft.evaluation.calibration import CALIBRATION_FILE, Calibration

    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    if CALIBRATION_FILE not in manifest.get("files", {}):
        log.warning("%s is not listed in %s/manifest.json: not checked, so not used", path, folder)
        return None
    return Calibration.load(path, classes)


def evaluate_export(folder: str | Path, *, task=None, split: str = "test", data: str | Path | None = None,
                    text_column: str | None = None, label_column: str | None = None,
                    group_column: str | None = None, groups_file: str | Path | None = None,
                    length_bands: list[int] | None = None, out: str | Path | None = None, explain: int = 4,
                    n_boot: int = 1000, n_bins: int = 15, seed: int = 0, calibrate: bool = True,
                    backend: str = "auto", html: bool = True) -> Evaluation:
    """Evaluate an exported folder (predictions from :mod:`autoft.export.runtime`, as in production).

    On ``split`` of its task (``task``, or the task file recorded in ``model.json``) or on the labelled
    file/folder ``data``.  Calibration: the export's ``calibration.json`` when it has one (temperature
    and threshold as shipped); otherwise, with ``calibrate`` and a task, fitted on the task's
    validation split.  Explanations rebuild the PyTorch model from ``model.pt``."""
    from autoft.export.runtime import load_exported
    from autoft.task import Task, load_task

    folder = Path(folder)
    model = load_exported(folder, backend)
    classes = model.classes
    calibration = export_calibration(folder, classes, model.manifest)
    if task is None and model.info.get("task_file") and Path(model.info["task_file"]).is_file():
        task = model.info["task_file"]
    if task is not None and not isinstance(task, Task):
        task = load_task(task)
    if data is None and task is None:
        raise ConfigError(f"{folder} does not say which task it was trained on (its task file is not here): give "
                          "--task, or --data FILE_OR_FOLDER to evaluate on", field="--task")
    td = None
    if task is not None and (data is None or (calibration is None and calibrate)):
        td = task.prepare()
        if list(td.data.class_names) != list(classes):
            raise ConfigError(f"task '{task.name}' has classes {td.data.class_names}, the export {classes}: not "
                              "the task this model was trained on", field="--task")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    metric = td.metric if td is not None else metrics.get("metric", "accuracy")
    pos_name = metrics.get("positive_class")
    pos = classes.index(pos_name) if pos_name in classes else (1 if len(classes) == 2 else None)
    if data is None:
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}", field="--split")
        ev_data = td.data
        rows = np.sort(getattr(td.splits, split))
        groups, gname = task_groups(task, td.data, group_column=group_column, groups_file=groups_file,
                                    length_bands=length_bands)
        groups = groups[rows] if groups is not None else None
        ids = [f"row {i}" for i in rows]
        label = split
    else:
        tc = text_column or (task.data.text_column if task else "text")
        lc = label_column or (task.data.label_column if task else "label")
        ev_data = load_labelled(data, model.modality, classes, text_column=tc, label_column=lc)
        rows = np.arange(len(ev_data))
        groups, gname = resolve_groups(ev_data, source=data, group_column=group_column, groups_file=groups_file,
                                       length_bands=length_bands, text_column=tc, label_column=lc)
        ids = _ids(ev_data, data)
        label = f"data {Path(data).name}"
    items = Rows(ev_data.inputs, rows)  # images are decoded per chunk, never all at once
    logits = torch.from_numpy(_export_logits(model, items))
    val_logits = val_y = None
    if calibration is None and calibrate and td is not None and split != "val":
        vrows = np.sort(td.splits.val)
        val_logits = torch.from_numpy(_export_logits(model, Rows(td.data.inputs, vrows)))
        val_y = torch.from_numpy(td.data.labels[vrows])
    access = _export_access(folder, model, items) if explain > 0 else None
    out = Path(out) if out is not None else Path("evaluation") / f"{folder.name}-{label.replace(' ', '-')}"
    ev = evaluate_predictions(
        logits, torch.from_numpy(ev_data.labels[rows]), classes, out, metric=metric, positive_index=pos,
        split=label, val_logits=val_logits, val_target=val_y, calibration=calibration, groups=groups,
        group_name=gname or "group", raw_inputs=items, ids=ids, access=access, explain=explain, n_boot=n_boot,
        n_bins=n_bins, seed=seed, title=f"{folder.name}: {model.info.get('architecture')}",
        context={"model": str(folder), "backend": model.backend, "task": model.info.get("task"),
                 "trial": model.info.get("trial"), "study": model.info.get("study"),
                 "calibration_source": "export" if calibration is not None else
                 ("fitted on the task's validation split" if val_logits is not None else None)})
    if html:
        from autoft.evaluation.report_html import write_html_report

        write_html_report(out / "report.html", evaluation_dir=out, title=f"Evaluation of {folder.name}")
    return ev


def _export_logits(model, items, chunk: int = 256) -> np.ndarray:
    """The exported model's logits for ``items``: texts in one call (its length bucketing), images a chunk
    of decoded images at a time."""
    if model.modality == "text":
        return model.logits(list(items))
    parts = [model.logits([items[j] for j in range(i, min(i + chunk, len(items)))]) for i in range(0, len(items), chunk)]
    return np.concatenate(parts) if parts else model.logits([])


def _export_access(folder: Path, model, items) -> ModelAccess | None:
    try:
        from autoft.export.export import rebuild_model

        net = rebuild_model(folder)
    except Exception as exc:  # explanations are optional: a folder whose architecture is not in this zoo
        log.warning("explanations skipped: cannot rebuild the PyTorch model of %s (%s)", folder, exc)
        return None
    tok = None
    if model.modality == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder / model.preprocessing.get("tokenizer", "tokenizer")))

    def encode(pos):
        t = model.encode([items[i] for i in pos])
        return t if model.modality == "text" else t[0]

    return ModelAccess(net, encode, model.modality, tok, model.preprocessing)

