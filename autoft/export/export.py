"""Export a trial of a study as a self-contained folder a user can ship.

:func:`export_trial` takes the best (or a chosen) completed trial, refits its exact configuration
and seed (on the training split, or on training + validation), scores the refit once on the test
split, and writes::

    config.yaml          the TrialConfig (``autoft train --config`` reads it)
    classes.json         class names, in the order of the model's outputs
    preprocessing.json   input size and normalisation (image) / tokenizer and max_length (text)
    tokenizer/           text only: tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
    metrics.json         validation metrics from the search, test metrics from the refit
    model.pt2            torch.export program (torch.export.save): encoded input → logits, dynamic batch
                         (and sequence length for text); the primary PyTorch format
    model.onnx           ONNX from the dynamo-based exporter (torch.onnx.export(..., dynamo=True)); the legacy
                         TorchScript-based exporter only as a fallback, named in model.json 'onnx_exporter'
    model.ts             TorchScript (legacy, torch.jit is deprecated: written for one more release)
    model.pt             plain state_dict of the Classifier (architecture in model.json)
    model.json           architecture, inputs/outputs, files, provenance, export self-check
    README.md            model card
    manifest.json        sha256 of every file; loading checks it

Where torch.export cannot capture the model, the PyTorch format falls back in the order of
:data:`PYTORCH_FALLBACK` (pt2 → torchscript): a warning is logged, the card and ``model.json``
('fallbacks', 'export_errors') say so, and model.ts is written even when ``formats`` did not ask for it.

Before the folder is written, every model file written (read back from disk, except TorchScript, which
is checked as traced: reading it back needs the deprecated torch.jit.load) and the stand-alone runtime
(:mod:`autoft.export.runtime`, which re-implements preprocessing, with the backend ``"auto"`` prefers)
are checked against the PyTorch model on test examples: any difference above ``1e-4`` is an
:class:`ExportError` (for pt2 and the dynamo ONNX exporter: a fallback, as for a capture that failed).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoft.core import FeatureCache, TrialConfig, fine_tune_and_score
from autoft.core.train import TaskData
from autoft.study.record import ATTR_CONFIG, ATTR_METRICS, metric_value
from autoft.errors import ConfigError, ExportError
from autoft.export.runtime import (FORMAT, LEGACY_FORMATS, MANIFEST, MODEL_FORMATS, MODEL_INFO, load_exported,
                                   load_pt2, min_format_version, sha256_file)
from autoft.task import Task, load_task

log = logging.getLogger(__name__)

FORMATS = MODEL_FORMATS  # ("pt2", "onnx", "torchscript"): all written by default
MODEL_FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}
PYTORCH_FALLBACK = ("pt2", "torchscript")  # the PyTorch format, in order, when torch.export cannot capture a model
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
ONNX_OPSET: int | None = None  # dynamo exporter: torch's default (20 in torch 2.14); model.json records the opset
LEGACY_ONNX_OPSET = 17  # the legacy TorchScript-based exporter (fallback)
# float32 on a GPU against float32 on the CPU: cuDNN convolutions use TF32 by default (10-bit mantissa)
DEVICE_ATOL = 2e-2
ATOL = 1e-4  # exported outputs must match the PyTorch model's within this (absolute, on logits)
VERIFY_EXAMPLES = 64


# --------------------------------------------------------------------------------------------
# the exported network: encoded input → logits, as plain tensors (what TorchScript / ONNX need)
class ImageNet(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


class TextNet(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model((input_ids, attention_mask))


def wrap(model: nn.Module, modality: str) -> nn.Module:
    return (TextNet(model) if modality == "text" else ImageNet(model)).eval()


def input_names(modality: str) -> list[str]:
    return ["input_ids", "attention_mask"] if modality == "text" else ["pixel_values"]


# --------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    folder: Path
    trial: int
    config: dict
    metric: str
    validation_score: float | None
    validation_metrics: dict
    test_metrics: dict
    refit_validation_metrics: dict | None
    trained_on: tuple[str, ...]
    verification: dict
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)  # the refit PyTorch Classifier (eval mode)
    # model.json's model part: files, formats (in backend 'auto' order), export_errors, fallbacks, onnx_exporter,
    # export_seconds per format, ...
    info: dict = field(default_factory=dict, repr=False)
    calibration: dict | None = None  # calibration.json: temperature (+ binary threshold) fitted on validation


def open_study(task: Task, study_name: str = "default", results_dir: str | Path = "results",
               storage: str | None = None) -> optuna.Study:
    """Load the study a search left (same storage rules as ``autoft search``)."""
    from autoft.study import StudyLocation

    return StudyLocation(task.name, study_name, Path(results_dir), storage, task_file=task.file).load()


def select_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    done = [t.number for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        if not done:
            raise ConfigError(f"study '{study.study_name}' has no completed trial to export "
                              f"({len(trials)} trial(s), none complete)")
        from autoft.results.tables import best_trial

        trial = best_trial(study)  # a multi-objective study: the most accurate member of its Pareto set
    else:
        by_number = {t.number: t for t in trials}
        if number not in by_number:
            raise ConfigError(f"study '{study.study_name}' has no trial #{number} (trials 0..{len(trials) - 1})",
                              field="trial")
        trial = by_number[number]
        if trial.state != TrialState.COMPLETE:
            raise ConfigError(f"trial #{number} of study '{study.study_name}' is {trial.state.name.lower()}; only "
                              f"completed trials can be exported (completed: {_ranges(done) or 'none'})",
                              field="trial")
    if ATTR_CONFIG not in trial.user_attrs:
        raise ConfigError(f"trial #{trial.number} has no recorded configuration (user attribute '{ATTR_CONFIG}'); "
                          "was it run by autoft?")
    return trial


def _latency_lines(ft: FrozenTrial) -> list[str]:
    """The model card's line on the trial's recorded latency and size (autoft.core.latency), if any."""
    a = ft.user_attrs
    b1, b64 = a.get("latency_cpu_b1_ms"), a.get("latency_cpu_b64_ms")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (b1, b64)):
        return []
    gpu = a.get("latency_gpu_b1_ms")
    extra = (f"; GPU {a['latency_gpu_b1_ms']:.2f} ms / {a.get('latency_gpu_b64_ms', float('nan')):.1f} ms"
             if isinstance(gpu, (int, float)) else "")
    size = (f", {a['n_params']:,} parameters, {a['size_mb']:.1f} MB"
            if isinstance(a.get("n_params"), int) and isinstance(a.get("size_mb"), (int, float)) else "")
    return [f"- its model's forward latency, measured during the search: CPU {b1:.2f} ms at batch 1, {b64:.1f} ms "
            f"at batch 64{extra}{size}"]


def _ranges(nums: list[int]) -> str:
    return ", ".join(str(n) for n in nums[:20]) + (" ..." if len(nums) > 20 else "")


def search_summary(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail", "running")}
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    trial_seconds = sum(t.duration.total_seconds() for t in trials if t.duration)
    return {"study": study.study_name, "trials": len(trials), **counts,
            "wall_seconds": None if wall is None else round(wall, 1), "trial_seconds": round(trial_seconds, 1),
            "backbones_tried": sorted({str(t.user_attrs.get(ATTR_CONFIG, {}).get("backbone", t.params.get("backbone")))
                                       for t in trials if t.state != TrialState.RUNNING})}


def library_versions(modality: str) -> dict[str, str]:
    names = ["autoft", "torch", "numpy", "optuna", "onnx", "onnxscript", "onnxruntime"]
    names += ["transformers", "tokenizers"] if modality == "text" else ["torchvision", "pillow"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------------
def export_trial(task: str | Path | Task, out: str | Path, *, study: str | optuna.Study = "default",
                 trial: int | None = None, train_val: bool = False, results_dir: str | Path = "results",
                 storage: str | None = None, formats: tuple[str, ...] = FORMATS,
                 task_data: TaskData | None = None, cache: FeatureCache | None = None,
                 overwrite: bool = True, calibrate: bool = True) -> ExportResult:
    """Refit a trial (the best by default) and write a self-contained folder to ``out``.

    ``formats``: some of :data:`FORMATS` (``"pt2"``, ``"onnx"``, ``"torchscript"``; all by default).  When
    torch.export cannot capture the model, ``"torchscript"`` is written instead of ``"pt2"`` (logged as a
    warning and stated in the card and ``model.json``).
    ``train_val`` refits on training + validation data (same epochs, seed and recipe).  ``study`` is
    a study name (loaded from ``results_dir`` / ``storage``) or an ``optuna.Study``.  An existing
    export in ``out`` is replaced when ``overwrite``: a folder whose ``manifest.json`` (format
    'autoft-export') lists exactly the files it holds.  Any other non-empty folder is never touched,
    and only files the previous export listed are ever deleted.
    ``calibrate`` writes ``calibration.json``: a temperature fitted on the validation split and, for a binary
    task, the decision threshold tuned there for the task's metric (not when the refit trained on validation).
    """
    t0 = time.perf_counter()
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"unknown export format(s) {bad or formats}; expected some of {', '.join(FORMATS)}",
                          field="formats")
    task = task if isinstance(task, Task) else load_task(task)
    out = Path(out)
    _check_target(out, overwrite)
    study_obj = study if isinstance(study, optuna.Study) else open_study(task, study, results_dir, storage)
    ft = select_trial(study_obj, trial)
    cfg = TrialConfig(**ft.user_attrs[ATTR_CONFIG])
    td = task_data or task.prepare()
    trained_on = ("train", "val") if train_val else ("train",)
    log.info("refitting trial #%d (%s, unfreeze %d, %d epochs, seed %d) on %s", ft.number, cfg.backbone,
             cfg.unfreeze, cfg.epochs, cfg.seed, " + ".join(trained_on))
    res = fine_tune_and_score(cfg, td, cache=cache, train_on=trained_on, test=len(td.splits.test) > 0,
                              return_model=True)
    if not len(td.splits.test):
        log.warning("task '%s' has no test split: the export records no test metrics", task.name)
    model = res.model.cpu().eval()
    calibration = fit_export_calibration(model, td, cache, trained_on) if calibrate else None
    backbone = model.backbone
    pre = backbone.preprocessing
    refit_val = None if train_val else res.metrics
    if refit_val is not None and metric_value(ft) is not None and abs(res.score - metric_value(ft)) > 1e-6:
        log.warning("the refit's validation %s (%.6f) differs from the search's (%.6f): the data or the "
                    "code changed since the search", td.metric, res.score, metric_value(ft))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        info, verification = _write_models(model, pre, td, tmp, formats)
        if calibration is not None:
            calibration.save(tmp)  # calibration.json: listed in the manifest and hash-checked like every file
        card = _write_metadata(tmp, task, td, study_obj, ft, cfg, res, trained_on, refit_val, backbone, info,
                               verification)
        hashes: dict = {}
        write_manifest(tmp, pre.modality, hashes)
        # the stand-alone runtime (its own preprocessing) must give the same logits
        verification.update(_check_runtime(tmp, model, td, pre.modality))
        _update_json(tmp / MODEL_INFO, {"verification": verification})
        card()
        files = write_manifest(tmp, pre.modality, hashes)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported trial #%d to %s", ft.number, out)
    return ExportResult(folder=out, trial=ft.number, config=cfg.model_dump(), metric=td.metric,
                        validation_score=metric_value(ft), validation_metrics=dict(ft.user_attrs.get(ATTR_METRICS) or {}),
                        test_metrics=res.test_metrics or {}, refit_validation_metrics=refit_val,
                        trained_on=trained_on, verification=verification, files=files,
                        seconds=time.perf_counter() - t0, model=model, info=info,
                        calibration=None if calibration is None else calibration.to_dict())


def fit_export_calibration(model: nn.Module, td: TaskData, cache: FeatureCache | None, trained_on):
    """Temperature (and, for a binary task, the threshold for its metric) fitted on the validation split;
    None when the refit trained on validation (it would be fitted on training data) or there is none."""
    if "val" in trained_on or not len(td.splits.val):
        return None
    from autoft.evaluation.calibration import fit_calibration
    from autoft.evaluation.evaluate import split_logits

    from autoft.evaluation.metrics import all_metrics

    names = ("val", "test") if len(td.splits.test) else ("val",)
    logits = split_logits(model, td, names, cache)
    y = torch.from_numpy(td.data.labels[np.sort(td.splits.val)])
    cal = fit_calibration(logits["val"], y, td.data.class_names, td.metric, td.positive_index)
    if "test" in logits:  # what predict's decision (temperature, threshold) scores on the test split
        yt = torch.from_numpy(td.data.labels[np.sort(td.splits.test)])
        cal.test = all_metrics(cal.probabilities(logits["test"]), yt, td.data.num_classes, cal.positive_index,
                               cal.threshold)
    log.info("calibration: temperature %.3f%s", cal.temperature,
             f", threshold {cal.threshold:.4f} on P({cal.positive_class})" if cal.threshold is not None else "")
    return cal


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def rebuild_model(folder: str | Path) -> nn.Module:
    """The PyTorch Classifier from an export's ``model.pt`` + ``model.json`` + ``config.yaml``.

    Uses autoft's zoo (the architecture, without pretrained weights); for serving use
    :func:`autoft.load_exported`, which needs no autoft training code.
    """
    from autoft.core.model import Classifier, build_head
    from autoft.export.runtime import verify_folder
    from autoft.zoo import get_backbone

    folder = Path(folder)
    verify_folder(folder)
    info = json.loads((folder / MODEL_INFO).read_text(encoding="utf-8"))
    cfg = TrialConfig(**yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))
    backbone = get_backbone(info["architecture"], pretrained=False)
    backbone.set_unfreeze(cfg.unfreeze)
    model = Classifier(backbone, build_head(backbone.feature_dim, info["num_classes"], cfg))
    state = torch.load(folder / info["files"]["state_dict"], map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _names(names, n: int = 10) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def previous_export(out: Path) -> set[str]:
    """The files (relative names, ``manifest.json`` included) of the autoft export in the folder
    ``out``, which may then be replaced; an :class:`ExportError` naming the folder and why when ``out``
    is not exactly such an export: no manifest, a manifest that is not an autoft export's, files or
    folders the manifest does not list (the export did not write them), or listed files missing."""
    where = f"--out {out}"
    path = out / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise ExportError(f"{where} is not empty and holds no previous export (no {MANIFEST}); refusing to write "
                          "into it (choose a new or empty folder)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{where} is not an autoft export: its {MANIFEST} cannot be read ({exc}); refusing to "
                          "replace the folder (nothing was changed). Choose a new or empty folder.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise ExportError(f"{where} is not an autoft export: its {MANIFEST} is not an autoft export manifest "
                          f"(format '{FORMAT}' with a 'files' map), so the folder belongs to something else; "
                          "refusing to replace it (nothing was changed). Choose a new or empty folder.")
    listed = {n for n in doc["files"] if isinstance(n, str)}
    parents = {p.as_posix() for n in listed for p in Path(n).parents if p.as_posix() != "."}
    present, foreign = set(), []
    for dirpath, dirnames, filenames in os.walk(out):  # links are not followed
        base = Path(dirpath)
        for d in dirnames:
            rel = (base / d).relative_to(out).as_posix()
            if (base / d).is_symlink() or (rel not in parents and not any((base / d).iterdir())):
                foreign.append(rel)  # a link, or an empty folder the export did not make
        for f in filenames:
            rel = (base / f).relative_to(out).as_posix()
            if rel == MANIFEST:
                continue
            if rel in listed and (base / f).is_file() and not (base / f).is_symlink():
                present.add(rel)
            else:
                foreign.append(rel)
    if foreign:
        raise ExportError(f"{where} is not (only) an autoft export: it holds files the previous export did not "
                          f"write: {_names(sorted(foreign))}; refusing to replace it (nothing was changed). Move "
                          "them elsewhere, or choose a new or empty folder.")
    missing = sorted(listed - present)  # names outside the folder ('../x', '/x') are never 'present'
    if missing:
        raise ExportError(f"{where} is not an intact autoft export: file(s) its {MANIFEST} lists are missing: "
                          f"{_names(missing)}; refusing to replace it (nothing was changed). Delete the folder "
                          "yourself, or choose a new or empty folder.")
    return present | {MANIFEST}


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        previous_export(out)
        if not overwrite:
            raise ExportError(f"{out} already holds an export (pass overwrite=True to replace it)")


def _replace(tmp: Path, out: Path) -> None:
    """Move the new export ``tmp`` to ``out``; a previous export there is checked again (the refit took
    a while) and then only the files its manifest listed are deleted."""
    old, listed = None, set()
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out} is a file; give a folder")
        if any(out.iterdir()):
            listed = previous_export(out)
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        _remove_export(old, listed)


def _remove_export(folder: Path, files: set[str]) -> None:
    """Delete ``files`` (relative names) and then the folders they leave empty; anything else stays."""
    for name in sorted(files):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s of the previous export: %s", folder / name, exc)
    dirs = sorted({folder / p for n in files for p in Path(n).parents if p.as_posix() != "."} | {folder},
                  key=lambda d: len(d.parts), reverse=True)
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass
    if folder.exists():
        log.warning("kept %s: it holds files the previous export did not write", folder)


# --------------------------------------------------------------------------------------------
def _example_indices(td: TaskData, n: int) -> np.ndarray:
    idx = td.splits.test if len(td.splits.test) else td.splits.train
    return np.asarray(idx[:n])


def _encode(td: TaskData, idx, pre) -> tuple[torch.Tensor, ...]:
    from autoft.data.encode import encode

    state = encode([td.data.inputs[i] for i in idx], pre)
    return tuple(state) if isinstance(state, tuple) else (state,)


@torch.no_grad()
def _batched(fn, tensors: tuple[torch.Tensor, ...], batch: int = 64) -> np.ndarray:
    n = len(tensors[0])
    return np.concatenate([np.asarray(fn(tuple(t[i:i + batch] for t in tensors)), dtype=np.float32)
                           for i in range(0, n, batch)])


def _parity_inputs(inputs: tuple[torch.Tensor, ...], modality: str) -> list[tuple[torch.Tensor, ...]]:
    """The encoded test examples in batches of 64, and a few alone: batch size 1, and for text each at its own
    length (padding removed), so that the dynamic dimensions are exercised, not only the example's shape."""
    out = [tuple(t[i:i + 64] for t in inputs) for i in range(0, len(inputs[0]), 64)]
    for i in range(min(4, len(inputs[0]))):
        one = tuple(t[i:i + 1] for t in inputs)
        if modality == "text":
            n = max(1, int(one[1].sum()))
            one = tuple(t[:, :n] for t in one)
        out.append(one)
    return out


def _max_diff(fn, batches: list, ref: list[np.ndarray]) -> float:
    with torch.no_grad():
        return max(float(np.abs(np.asarray(fn(b), dtype=np.float32) - r).max()) for b, r in zip(batches, ref))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def dynamic_shapes(modality: str, pre) -> dict:
    """torch.export dynamic dimensions: batch (>= 1), and for text the sequence (1 .. max_length)."""
    batch = torch.export.Dim("batch", min=1)
    if modality == "text":
        seq = torch.export.Dim("sequence", min=1, max=int(pre.max_length))
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return {"pixel_values": {0: batch}}


def _write_models(model: nn.Module, pre, td: TaskData, folder: Path, formats) -> tuple[dict, dict]:
    modality = pre.modality
    net = wrap(model, modality)
    names = input_names(modality)
    idx = _example_indices(td, VERIFY_EXAMPLES)
    inputs = _encode(td, idx, pre)
    example = tuple(t[:8] for t in inputs)  # batch > 1 so that no dimension is specialised to 1
    batches = _parity_inputs(inputs, modality)
    with torch.no_grad():
        ref = [net(*b).numpy() for b in batches]
    files: dict[str, str | None] = {"pt2": None, "onnx": None, "torchscript": None, "state_dict": "model.pt"}
    errors: dict[str, str] = {}
    fallbacks: list[str] = []
    seconds: dict[str, float] = {}
    onnx_exporter = opset = None
    verification: dict = {"examples": int(len(idx)), "atol": ATOL}
    want = [f for f in FORMATS if f in formats]

    torch.save(model.state_dict(), folder / "model.pt")
    if "pt2" in want:
        t0 = time.perf_counter()
        try:
            _export_pt2(net, example, dynamic_shapes(modality, pre), folder / MODEL_FILES["pt2"])
            program = load_pt2(folder / MODEL_FILES["pt2"]).module()  # as served: the checked file, read back
            diff = _max_diff(lambda b: program(*b).numpy(), batches, ref)
            if not diff <= ATOL:
                raise ExportError(f"the torch.export program's logits differ from the PyTorch model's by {diff:.3g} "
                                  f"(> {ATOL})")
            verification["pt2_max_abs_diff"] = diff
            files["pt2"] = MODEL_FILES["pt2"]
        except Exception as exc:  # record why; the PyTorch format falls back (PYTORCH_FALLBACK), never silently
            errors["pt2"] = _error(exc)
            (folder / MODEL_FILES["pt2"]).unlink(missing_ok=True)
            nxt = PYTORCH_FALLBACK[PYTORCH_FALLBACK.index("pt2") + 1]
            fallbacks.append(f"torch.export could not capture this model ({errors['pt2'][:300]}): no model.pt2; "
                             f"the PyTorch format is {nxt} ({MODEL_FILES[nxt]}, legacy) instead")
            log.warning("torch.export could not capture the model: %s. Falling back (%s): writing %s (%s) instead "
                        "of model.pt2", errors["pt2"], " -> ".join(PYTORCH_FALLBACK), nxt, MODEL_FILES[nxt])
            if nxt not in want:
                want.append(nxt)
        seconds["pt2"] = round(time.perf_counter() - t0, 2)
    if "onnx" in want:
        t0 = time.perf_counter()
        path = folder / MODEL_FILES["onnx"]
        try:
            ort = _onnxruntime_or_none()
            try:
                _export_onnx_dynamo(net, example, names, dynamic_shapes(modality, pre), path)
                diff = _onnx_diff(ort, path, names, batches, ref)
                if diff is not None and not diff <= ATOL:
                    raise ExportError(f"its logits differ from the PyTorch model's by {diff:.3g} (> {ATOL})")
                onnx_exporter = "dynamo"
            except Exception as exc:  # the legacy exporter, named in model.json, never silently
                errors["onnx_dynamo"] = _error(exc)
                path.unlink(missing_ok=True)
                fallbacks.append(f"the dynamo-based ONNX exporter failed ({errors['onnx_dynamo'][:300]}): model.onnx "
                                 "comes from the legacy TorchScript-based exporter")
                log.warning("the dynamo-based ONNX exporter failed: %s. Falling back to the legacy TorchScript-based "
                            "exporter for model.onnx", errors["onnx_dynamo"])
                _export_onnx_legacy(net, example, names, path)
                diff = _onnx_diff(ort, path, names, batches, ref)
                onnx_exporter = "legacy"
            files["onnx"] = MODEL_FILES["onnx"]
            opset = _onnx_opset(path)
            verification["onnx_max_abs_diff"] = diff
            if diff is None:
                log.warning("onnxruntime is not installed: the ONNX file was written but not checked")
        except Exception as exc:
            errors["onnx"] = _error(exc)
            log.warning("ONNX export failed: %s", errors["onnx"])
            path.unlink(missing_ok=True)
            files["onnx"], onnx_exporter, opset = None, None, None
        seconds["onnx"] = round(time.perf_counter() - t0, 2)
    if "torchscript" in want:
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is deprecated
                traced = torch.jit.trace(net, example, check_trace=False)
                torch.jit.save(traced, str(folder / MODEL_FILES["torchscript"]))
                # checked as traced: reading model.ts back needs the deprecated torch.jit.load
                verification["torchscript_max_abs_diff"] = _max_diff(lambda b: traced(*b).numpy(), batches, ref)
            files["torchscript"] = MODEL_FILES["torchscript"]
        except Exception as exc:  # record why, keep the other formats
            errors["torchscript"] = _error(exc)
            log.warning("TorchScript export failed: %s", errors["torchscript"])
            (folder / MODEL_FILES["torchscript"]).unlink(missing_ok=True)
        seconds["torchscript"] = round(time.perf_counter() - t0, 2)
    written = [f for f in FORMATS if files.get(f)]
    if not written:
        raise ExportError("no model format could be exported: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    for key in ("torchscript_max_abs_diff", "onnx_max_abs_diff"):
        diff = verification.get(key)
        if diff is not None and not diff <= ATOL:
            raise ExportError(f"the exported {key.split('_')[0]} model's logits differ from the PyTorch model's "
                              f"by {diff:.3g} (> {ATOL}) on {len(idx)} test examples; not exporting a model that "
                              "behaves differently")
    shape = ["batch", "sequence"] if modality == "text" else ["batch", pre.channels, pre.input_size, pre.input_size]
    dims = {"batch": {"min": 1, "max": None}}
    if modality == "text":
        dims["sequence"] = {"min": 1, "max": int(pre.max_length)}
    info = {"files": files, "formats": written, "preferred_backend": written[0],
            "legacy_formats": [f for f in written if f in LEGACY_FORMATS],
            "export_errors": errors, "fallbacks": fallbacks, "inputs": names,
            "input_shapes": {n: shape for n in names}, "dynamic_dims": dims,
            "input_dtypes": {n: ("int64" if modality == "text" else "float32") for n in names},
            "outputs": ["logits"], "onnx_opset": opset, "onnx_exporter": onnx_exporter,
            "torch_version": torch.__version__, "export_seconds": seconds}
    return info, verification


def _export_pt2(net: nn.Module, example: tuple, dynamic: dict, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, example, dynamic_shapes=dynamic, strict=False)
        torch.export.save(program, str(path))


def _onnxruntime_or_none():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _onnx_diff(ort, path: Path, names: list[str], batches: list, ref: list) -> float | None:
    if ort is None:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return _max_diff(lambda b: sess.run(None, {n: t.numpy() for n, t in zip(names, b)})[0], batches, ref)


def _onnx_opset(path: Path) -> int | None:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # onnx not installed: the opset is only informative
        return None


def _export_onnx_dynamo(net: nn.Module, example: tuple, names: list[str], dynamic: dict, path: Path) -> None:
    """The torch.export-based ONNX exporter (needs onnxscript); one self-contained file (no external data)."""
    import contextlib
    import io

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("the dynamo-based ONNX exporter needs the onnxscript package: pip install onnxscript "
                          "(or pip install 'autoft[onnx]')") from None
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), dynamo=True, dynamic_shapes=dynamic, input_names=names,
                          output_names=["logits"], opset_version=ONNX_OPSET, external_data=False, verbose=False,
                          optimize=True)


def _export_onnx_legacy(net: nn.Module, example: tuple, names: list[str], path: Path) -> None:
    dyn = {n: ({0: "batch", 1: "sequence"} if len(names) == 2 else {0: "batch"}) for n in names}
    dyn["logits"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes=dyn, opset_version=LEGACY_ONNX_OPSET, do_constant_folding=True)


def _check_runtime(folder: Path, model: nn.Module, td: TaskData, modality: str) -> dict:
    """Load the written folder with the stand-alone runtime and compare its logits from *raw* inputs.

    The backend is the one ``load_exported`` picks by default ("auto": pt2, then onnx, then torchscript):
    every backend runs the same preprocessing, and each format was already compared with the PyTorch model
    on encoded inputs."""
    idx = _example_indices(td, 32)
    raw = [td.data.inputs[i] for i in idx]
    pre = model.backbone.preprocessing
    net = wrap(model, modality)
    ref = _batched(lambda ts: net(*ts).numpy(), _encode(td, idx, pre))
    try:
        rt = load_exported(folder, "auto", verify=False)  # files were hashed a moment ago
    except ExportError as exc:  # e.g. only an ONNX file and no onnxruntime: nothing to compare
        log.info("runtime check skipped: %s", exc)
        return {}
    diff = float(np.abs(rt.logits(raw) - ref).max())
    if not diff <= ATOL:
        raise ExportError(f"autoft.export.runtime ({rt.backend}) gives logits that differ from the PyTorch model's "
                          f"by {diff:.3g} (> {ATOL}) on raw test inputs: its preprocessing does not match training")
    checks = {f"runtime_{rt.backend}_max_abs_diff": diff}
    dev = torch.device(td.device or "cpu")
    if dev.type == "cuda" and rt.backend in ("pt2", "torchscript"):  # the search's GPU: predict runs there too
        on_dev = load_exported(folder, rt.backend, verify=False, device=str(dev))
        gdiff = float(np.abs(on_dev.logits(raw) - ref).max())
        if not gdiff <= DEVICE_ATOL:
            raise ExportError(f"autoft.export.runtime ({rt.backend}) on {dev} gives logits that differ from the "
                              f"PyTorch model's on the CPU by {gdiff:.3g} (> {DEVICE_ATOL})")
        checks[f"runtime_{rt.backend}_{dev.type}_max_abs_diff"] = gdiff
    return checks


# --------------------------------------------------------------------------------------------
def _dump_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, default=_plain) + "\n", encoding="utf-8")


def _update_json(path: Path, update: dict) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(update)
    _dump_json(path, doc)


def _plain(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (Path, _dt.datetime)):
        return str(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_metadata(folder: Path, task: Task, td: TaskData, study: optuna.Study, ft: FrozenTrial, cfg: TrialConfig,
                    res, trained_on, refit_val, backbone, info: dict, verification: dict):
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), encoding="utf-8")
    _dump_json(folder / "classes.json", list(td.data.class_names))
    pre = backbone.preprocessing.to_dict()
    if pre["modality"] == "text":
        pre["tokenizer_source"] = pre["tokenizer"]
        pre["tokenizer"] = "tokenizer"
        copy_tokenizer(backbone.preprocessing.tokenizer, folder / "tokenizer")
    _dump_json(folder / "preprocessing.json", pre)
    sizes = td.splits.sizes()
    metrics = {
        "metric": td.metric, "direction": td.direction,
        "positive_class": td.data.class_names[td.positive_index] if td.positive_index is not None else None,
        "validation_score": metric_value(ft),
        "validation": dict(ft.user_attrs.get(ATTR_METRICS) or {}),
        "test": res.test_metrics,
        "refit": {"trained_on": list(trained_on), "epochs": res.epochs_run, "seconds": round(res.seconds, 2),
                  "validation": refit_val},
        "sizes": sizes,
    }
    _dump_json(folder / "metrics.json", metrics)
    summary = search_summary(study)
    model_info = {
        "format": FORMAT, "architecture": cfg.backbone, "modality": pre["modality"],
        "num_classes": td.data.num_classes,
        "backbone": {"name": backbone.name, "num_stages": backbone.num_stages, "feature_dim": backbone.feature_dim,
                     "unfreeze": cfg.unfreeze, "meta": {k: v for k, v in backbone.meta.items()
                                                        if isinstance(v, (str, int, float, bool, type(None)))}},
        "head": {k: getattr(cfg, k) for k in ("head", "head_width", "head_depth", "dropout", "activation")},
        **info,
        "task": task.name, "task_file": str(task.file) if task.file else None, "study": study.study_name,
        "trial": ft.number, "trained_on": list(trained_on), "epochs": cfg.epochs, "seed": cfg.seed,
        "data_fingerprint": td.data.fingerprint(), "created": created, "search": summary,
        "verification": verification,
    }
    _dump_json(folder / MODEL_INFO, model_info)

    def write_card() -> None:  # after the runtime check, so that the card shows every check
        (folder / "README.md").write_text(model_card(task, td, cfg, ft, res, trained_on, metrics, model_info,
                                                     library_versions(pre["modality"])), encoding="utf-8")

    write_card()
    return write_card


def copy_tokenizer(source: str | None, dest: Path) -> list[str]:
    """Copy the tokenizer files of a text backbone (a local folder) into ``dest``."""
    src = Path(source) if source else None
    if src is None or not src.is_dir():
        from transformers import AutoTokenizer  # a hub name: let transformers write the files

        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(str(dest))
        except Exception as exc:
            raise ExportError(f"could not save the tokenizer '{source}' into the export: {exc}") from None
        return sorted(p.name for p in dest.iterdir())
    dest.mkdir(parents=True, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if "tokenizer.json" not in copied and "vocab.txt" not in copied:
        raise ExportError(f"tokenizer folder {src} has neither tokenizer.json nor vocab.txt")
    for n in copied:
        shutil.copy2(src / n, dest / n)
    return copied


def write_manifest(folder: Path, modality: str, hashes: dict | None = None) -> list[str]:
    """Write ``manifest.json`` (sha256 and size of every file).  ``hashes`` memoises digests of
    unchanged files between calls: {name: ((size, mtime_ns), sha256)}."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    hashes = {} if hashes is None else hashes
    for f in files:
        st = (folder / f).stat()
        key = (st.st_size, st.st_mtime_ns)
        if f not in hashes or hashes[f][0] != key:
            hashes[f] = (key, sha256_file(folder / f))
    info = json.loads((folder / MODEL_INFO).read_text(encoding="utf-8"))
    requires = ["torch", "numpy"] + (["transformers or tokenizers"] if modality == "text" else ["pillow (image files)"])
    model_files = info.get("files") or {}
    backends = {"pt2": f"torch (torch.export.load; written with torch {info.get('torch_version')}, a .pt2 is tied "
                       "to torch versions)",
                "onnx": "onnxruntime",
                "torchscript": "torch (legacy: torch.jit.load is deprecated)"}
    manifest = {
        # the oldest layout that can serve the folder: 1 while model.ts or model.onnx is there (older autoft
        # loads those and ignores model.pt2), 2 for a folder with model.pt2 only
        "format": FORMAT, "format_version": min_format_version(model_files),
        "created": info.get("created"), "autoft_version": _version("autoft"),
        "requires": {"packages": requires,
                     "backends": {k: v for k, v in backends.items() if model_files.get(k)},
                     "backend_order": [k for k in backends if model_files.get(k)],
                     "load_with": "autoft.load_exported(DIR) or autoft.export.runtime.load_exported(DIR)"},
        "files": {f: {"sha256": hashes[f][1], "bytes": hashes[f][0][0]} for f in files},
    }
    _dump_json(folder / MANIFEST, manifest)
    return files + [MANIFEST]


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
_MD_SPECIAL = str.maketrans({"|": r"\|", "`": r"\`", "<": "&lt;", ">": "&gt;"})


def _md(value) -> str:
    """A user string (class name, task description, backbone, ...) as one line of Markdown that shows
    it as written: backslashes and control characters escaped (a newline becomes ``\\n``), ``|`` and
    backticks escaped, ``<`` / ``>`` as entities, so that it can break neither a line nor a table."""
    s = str(value).replace("\\", "\\\\")
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s.translate(_MD_SPECIAL)


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _refit_note(td: TaskData, ft: FrozenTrial, trained_on, metrics: dict) -> str:
    if "val" in trained_on:
        return "The refit trained on the validation data too, so only the test column is an unbiased estimate."
    got = (metrics["refit"]["validation"] or {}).get(td.metric)
    if got is not None and metric_value(ft) is not None and abs(got - metric_value(ft)) <= 1e-6:
        return (f"The refit reproduces the search's validation {td.metric} exactly ({_f(got)}): same "
                "configuration, seed and data.")
    return (f"The refit's validation {td.metric} is {_f(got)}, the search's was {_f(metric_value(ft))}: the data or the code "
            "changed since the search.")


def _model_file_lines(info: dict, modality: str) -> list[str]:
    """The model files of the card's "Files and use" section: what each is, how it was made, fallbacks, errors."""
    files = info.get("files") or {}
    dims = info.get("dynamic_dims") or {}
    seq = dims.get("sequence") or {}
    dynamic = "dynamic batch" + (f" and sequence length (1 to {seq.get('max')})" if modality == "text" else "")
    exporter = {"dynamo": "the dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`)",
                "legacy": "the legacy TorchScript-based exporter (fallback, see below)"}.get(info.get("onnx_exporter"),
                                                                                               "an unrecorded exporter")
    about = {
        "pt2": f"torch.export program (`torch.export.save`, torch {_md(info.get('torch_version'))}), the PyTorch "
               "format to use; `autoft.load_exported` reads it only after checking that it cannot run code "
               "(plain `torch.export.load` unpickles: use it on files you trust)",
        "onnx": f"ONNX opset {info.get('onnx_opset')} from {exporter}",
        "torchscript": "TorchScript, **legacy**: PyTorch deprecated `torch.jit`; autoft writes it for one more "
                       "release only, use `model.pt2` or `model.onnx`",
    }
    lines = [f"- model files (encoded input → logits; inputs {', '.join(info['inputs'])}; {dynamic}), in the "
             "order `autoft.load_exported` and `autoft predict` prefer them (backend 'auto'):"]
    lines += [f"  - `{files[k]}`: {about[k]}" for k in MODEL_FORMATS if files.get(k)]
    lines.append(f"- `model.pt`: state_dict of architecture '{_md(info['architecture'])}'")
    lines += [f"- fallback: {_md(f)}" for f in info.get("fallbacks") or []]
    covered = ("pt2", "onnx_dynamo")  # a failure there is a fallback, listed above
    lines += [f"- {k} export failed: {_md(v)}" for k, v in (info.get("export_errors") or {}).items()
              if k not in covered or not info.get("fallbacks")]
    return lines


def model_card(task: Task, td: TaskData, cfg: TrialConfig, ft: FrozenTrial, res, trained_on, metrics: dict,
               info: dict, versions: dict) -> str:
    sizes = metrics["sizes"]
    s = info["search"]
    bb = info["backbone"]
    counts = np.bincount(td.data.labels, minlength=td.data.num_classes)
    classes = ", ".join(f"{_md(c)} ({n})" for c, n in zip(td.data.class_names, counts))
    # every string a user or a data set chose goes through _md: it can break neither a line nor a table
    recipe = [("backbone", _md(cfg.backbone)), ("unfreeze", f"last {cfg.unfreeze} of {bb['num_stages']} stages"
                                            + (" (head only)" if cfg.unfreeze == 0 else "")),
              ("head", cfg.head if cfg.head == "linear" else
               f"mlp, {cfg.head_depth} x {cfg.head_width} {_md(cfg.activation)}, dropout {cfg.dropout:g}"),
              ("optimizer", _md(cfg.optimizer) + (f" (momentum {cfg.momentum:g})" if cfg.optimizer == "sgd" else "")),
              ("learning rate", f"{cfg.lr:.3g} (backbone), {cfg.head_lr:.3g} (head)"),
              ("weight decay", f"{cfg.weight_decay:.3g}"), ("batch size", cfg.batch_size),
              ("epochs", cfg.epochs), ("schedule", f"{_md(cfg.schedule)}, warmup {cfg.warmup:.3g}"),
              ("label smoothing", f"{cfg.label_smoothing:.3g}"), ("seed", cfg.seed)]
    val, test = metrics["validation"], metrics["test"] or {}
    names = [m for m in (td.metric, "accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_pos",
                         "precision_pos", "recall_pos", "auroc", "loss") if m in val or m in test]
    names = list(dict.fromkeys(names))
    wall = f"{s['wall_seconds']:.0f} s wall clock" if s.get("wall_seconds") is not None else "unknown time"
    ver = info["verification"]
    pre = td.data.modality
    model_lines = _model_file_lines(info, pre)
    example = ("autoft predict --model DIR texts.csv --text-column text" if pre == "text"
               else "autoft predict --model DIR image.png folder/ --out predictions.csv")
    py_in = '["free entry to win a prize", "see you at 6"]' if pre == "text" else '["image.png"]'
    lines = [
        f"# {_md(task.name)}: {_md(cfg.backbone)} fine-tuned by autoft",
        "",
        _md(task.description or f"{pre} classification") + f" — exported from study '{_md(s['study'])}', "
        f"trial #{ft.number}, "
        f"on {info['created']}.",
        "",
        "## Task and data",
        "",
        f"- modality: {pre}; {td.data.num_classes} classes: {classes}",
        f"- data: {_md(td.data.source or task.data.source)} — {len(td.data)} examples; split train {sizes['train']}, "
        f"validation {sizes['val']}, test {sizes['test']} (stratified, seed {task.split.seed})",
        f"- metric: {td.metric} ({td.direction})"
        + (f", positive class '{_md(metrics['positive_class'])}'" if metrics.get("positive_class") else ""),
        "",
        "## Model",
        "",
        "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in recipe],
        "",
        f"Refit with this exact configuration and seed on {' + '.join(trained_on)} ({res.epochs_run} epochs, "
        f"{res.seconds:.1f} s). Backbone: {_md(bb['name'])}, {bb['num_stages']} stages, {bb['feature_dim']}-d features"
        + (f", pretrained weights {_md(bb['meta'].get('weights') or bb['meta'].get('source'))}"
           if bb['meta'] else "") + ".",
        "",
        "## How the search went",
        "",
        f"- {s['trials']} trials: {s['complete']} complete, {s['pruned']} pruned, {s['fail']} failed; {wall} "
        f"({s['trial_seconds']:.0f} s summed over trials)",
        f"- backbones tried: {', '.join(_md(b) for b in s['backbones_tried'])}",
        f"- trial #{ft.number} won with validation {td.metric} {_f(metric_value(ft))}",
        *_latency_lines(ft),
        "",
        "## Scores",
        "",
        "| metric | validation (search) | test (refit, scored once) |", "|---|---|---|",
        *[f"| {m} | {_f(val.get(m))} | {_f(test.get(m))} |" for m in names],
        "",
        _refit_note(td, ft, trained_on, metrics),
        "",
        "## Files and use",
        "",
        *model_lines,
        "- `config.yaml`, `classes.json`, `preprocessing.json`"
        + (", `tokenizer/`" if pre == "text" else "") + ", `metrics.json`, `model.json`; `manifest.json` holds the "
        "sha256 of every file and is checked on loading.",
        f"- checked at export on {ver.get('examples')} test examples: largest absolute logit difference from the "
        f"PyTorch model " + ", ".join(f"{k.removesuffix('_max_abs_diff').replace('_', ' ')} {v:.2g}"
                                      for k, v in ver.items() if k.endswith("_max_abs_diff") and v is not None)
        + f" (limit {ATOL:g}; each file read back, TorchScript as traced; 'runtime' = autoft.export.runtime from "
        "raw inputs).",
        "",
        "```bash", example.replace("DIR", "."), "```",
        "",
        "```python", "import autoft",
        "model = autoft.load_exported(\".\")  # backend 'auto': model.pt2, else model.onnx, else model.ts",
        f"preds = model.predict({py_in})", "print(preds.labels, preds.probabilities)", "```",
        "",
        "## Library versions",
        "",
        ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    return "\n".join(lines)
