"""Evaluate a model on labelled examples and write the results to a folder.

:func:`evaluate_predictions` is the engine: from the logits of the evaluated examples (and of the
validation split, to fit calibration) it writes

* ``per_class.csv`` — precision, recall, F1, support and predicted count per class, then macro and
  weighted averages;
* ``confusion.csv`` / ``confusion.png`` — counts, row = true class;
* ``reliability.png`` — reliability diagram before and after temperature scaling;
* ``calibration.json`` — the temperature (and the binary decision threshold) fitted on validation,
  in the form an export carries (:class:`~autoft.evaluation.calibration.Calibration`);
* ``fairness.csv`` — per-group metrics, when a group attribute is given;
* ``explanations.png`` (images) or ``explanations.html`` (text), ``confused_pairs.csv`` (+
  ``confused_pairs.png`` for images);
* ``predictions.csv`` — one row per example: id, true and predicted class, probabilities;
* ``summary.json`` — everything above in one document (headline metric with its bootstrap interval,
  metrics with the argmax and with the calibrated decision, ECE, fairness gaps, file names).

:func:`evaluate_winner` evaluates a trained :class:`~autoft.core.model.Classifier` (what
``fine_tune_and_score(..., return_model=True)`` returns) on a split of its task;
:func:`evaluate_trial` refits a trial of a study first; :func:`evaluate_export` evaluates an exported
folder with the stand-alone runtime.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from autoft.errors import ConfigError, DataError
from autoft.evaluation.calibration import Calibration, ece, fit_calibration, reliability_diagram
from autoft.evaluation.metrics import (all_metrics, bootstrap_ci, confusion_matrix, most_confused, per_class_table,
                                       predictions)

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
SPLITS = ("train", "val", "test")


@dataclass
class ModelAccess:
    """What explanations need beyond logits: the PyTorch model and how to encode evaluated rows."""

    model: torch.nn.Module
    encode: Callable[[list[int]], Any]  # positions among the evaluated examples -> encoded state
    modality: str
    tokenizer: Any = None
    preprocessing: Any = None


@dataclass
class Evaluation:
    folder: Path
    split: str
    metric: str
    summary: dict
    per_class: pd.DataFrame
    confusion: np.ndarray
    calibration: Calibration | None = None
    fairness: Any = None  # FairnessResult
    files: list[Path] = field(default_factory=list)

    @property
    def headline(self) -> dict:
        return self.summary["headline"]


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False, float_format="%.6g")
    return path


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def json_clean(v):
    """``v`` with NaN/inf as None and NumPy scalars as Python numbers (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_clean(x) for x in v]
    if isinstance(v, np.generic):
        return json_clean(v.item())
    return v


def confusion_png(cm: np.ndarray, class_names: list[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(class_names)
    size = min(2.0 + 0.55 * c, 14)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7 if c > 12 else 9,
                            color="white" if norm[i, j] > 0.55 else "black")
    labels = [n if len(n) <= 14 else n[:12] + ".." for n in class_names]
    ax.set_xticks(range(c), labels, rotation=45 if c > 4 else 0, ha="right" if c > 4 else "center", fontsize=8)
    ax.set_yticks(range(c), labels, fontsize=8)
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title(title or "Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_predictions(logits, target, class_names: list[str], folder: str | Path, *, metric: str,
                         positive_index: int | None = None, split: str = "test",
                         val_logits=None, val_target=None, calibration: Calibration | None = None,
                         fit_temperature: bool = True, tune_threshold: bool = True,
                         groups=None, group_name: str = "group", raw_inputs: list | None = None,
                         ids: list[str] | None = None, access: ModelAccess | None = None, explain: int = 4,
                         n_boot: int = 1000, n_bins: int = 15, seed: int = 0, top_confused: int = 5,
                         title: str = "", context: dict | None = None) -> Evaluation:
    """Evaluate ``logits`` (N, C) against ``target`` and write the files listed in the module
    docstring to ``folder``.

    Calibration: ``calibration`` when given (an export's ``calibration.json``), else fitted on
    ``val_logits``/``val_target`` when given (temperature; for a binary task whose ``metric`` a threshold
    changes, the threshold too), else none.  ``groups``: one group value per evaluated example (the
    fairness section); ``raw_inputs``: the inputs (images or texts) for the example tables;
    ``access`` + ``explain`` > 0: attributions of the ``explain`` most confident right and wrong
    predictions.  ``context`` is copied into ``summary.json`` (task, study, trial, model folder...).
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).float()
    y = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).long()
    c = len(class_names)
    if z.ndim != 2 or z.shape[1] != c or len(z) != len(y):
        raise DataError(f"logits of shape {tuple(z.shape)} do not fit {len(y)} labels of {c} classes")
    if len(y) == 0:
        raise DataError(f"the {split} split has no examples to evaluate")
    pos = (1 if positive_index is None else positive_index) if c == 2 else None
    ids = ids or [str(i) for i in range(len(y))]
    files: list[Path] = []

    # calibration -----------------------------------------------------------------------------
    if calibration is None and val_logits is not None and val_target is not None and len(val_target):
        calibration = fit_calibration(val_logits, val_target, class_names, metric, pos,
                                      temperature=fit_temperature, threshold=tune_threshold, n_bins=n_bins)
    if calibration is not None:
        files.append(calibration.save(folder))
    p_raw = torch.softmax(z, 1)
    p_cal = calibration.probabilities(z) if calibration is not None else p_raw
    threshold = calibration.threshold if calibration is not None else None
    # the deployed decision: calibrated probabilities, and the threshold when there is one
    preds = predictions(p_cal, pos, threshold)
    preds_argmax = p_raw.argmax(1)
    metrics_argmax = all_metrics(p_raw, y, c, pos)
    metrics_deployed = all_metrics(p_cal, y, c, pos, threshold)

    # headline metric with bootstrap intervals (same resamples for both decisions: same seed) -----------
    ci_argmax = bootstrap_ci(p_raw, y, metric, c, pos, None, n_boot=n_boot, seed=seed)
    ci_deployed = bootstrap_ci(p_cal, y, metric, c, pos, threshold, n_boot=n_boot, seed=seed) \
        if calibration is not None else ci_argmax

    # per class, confusion -------------------------------------------------------------------------
    per_class = per_class_table(preds, y, class_names)
    files.append(_write_csv(per_class, folder / "per_class.csv"))
    cm = confusion_matrix(preds, y, c)
    cm_df = pd.DataFrame(cm, columns=[f"pred:{n}" for n in class_names])
    cm_df.insert(0, "true", class_names)
    files.append(_write_csv(cm_df, folder / "confusion.csv"))
    files.append(confusion_png(cm, class_names, folder / "confusion.png",
                               f"Confusion matrix ({split}, {len(y)} examples)"))

    # calibration plot --------------------------------------------------------------------------
    ece_raw, ece_cal = ece(p_raw, y, n_bins), ece(p_cal, y, n_bins)
    files.append(reliability_diagram(
        p_cal, y, folder / "reliability.png", n_bins,
        title=f"Reliability ({split})" + (f", temperature {calibration.temperature:.2f}" if calibration else ""),
        compare=(p_raw, "before temperature scaling") if calibration is not None else None))

    # predictions table ----------------------------------------------------------------------------
    conf = p_cal.gather(1, preds[:, None])[:, 0]
    pred_df = pd.DataFrame({"id": ids, "true": [class_names[i] for i in y.tolist()],
                            "predicted": [class_names[i] for i in preds.tolist()],
                            "correct": (preds == y).numpy(), "probability": conf.numpy()})
    if groups is not None:
        pred_df.insert(1, group_name if group_name not in pred_df.columns else f"group:{group_name}", list(groups))
    for k, name in enumerate(class_names if c <= 20 else []):
        pred_df[f"p_{name}"] = p_cal[:, k].numpy()
    files.append(_write_csv(pred_df, folder / "predictions.csv"))

    # fairness ---------------------------------------------------------------------------------------
    fairness = None
    if groups is not None:
        from autoft.evaluation.fairness import group_fairness

        fairness = group_fairness(y, p_cal, groups, class_names, metric, pos, threshold, group_name)
        files.append(_write_csv(fairness.table, folder / "fairness.csv"))

    # most confused pairs, with examples ----------------------------------------------------------------
    pairs = most_confused(cm, class_names, top_confused)
    image_rows = []
    for pair in pairs:
        rows = torch.nonzero((y == pair["true_index"]) & (preds == pair["predicted_index"])).flatten()
        rows = rows[torch.argsort(conf[rows], descending=True, stable=True)][:3].tolist()
        pair["example_ids"] = [ids[r] for r in rows]
        if raw_inputs is not None:
            if isinstance(raw_inputs[0], str):
                from autoft.evaluation.explain import snippet

                pair["examples"] = [snippet(raw_inputs[r]) for r in rows]
            else:
                image_rows.append((f"{pair['true']} -> {pair['predicted']} ({pair['count']}x)",
                                   [raw_inputs[r] for r in rows]))
    if pairs:
        files.append(_write_csv(pd.DataFrame([{k: (" | ".join(v) if isinstance(v, list) else v)
                                               for k, v in p.items()} for p in pairs]),
                                folder / "confused_pairs.csv"))
    if image_rows:
        from autoft.evaluation.explain import thumbnails

        files.append(thumbnails(image_rows, folder / "confused_pairs.png", "Most confused pairs (true -> predicted)"))

    # explanations ----------------------------------------------------------------------------------
    explanations = None
    if access is not None and explain > 0:
        try:
            explanations = _explain(access, p_cal, preds, y, class_names, raw_inputs, ids, explain, folder)
            files.append(folder / explanations["file"])
        except Exception as exc:  # an explanation must never cost the user the evaluation
            log.warning("explanations skipped: %s", exc)
            explanations = {"error": str(exc)}

    headline = {"metric": metric, "value": ci_deployed.value, "ci_low": ci_deployed.low,
                "ci_high": ci_deployed.high, "level": ci_deployed.level, "resamples": ci_deployed.resamples,
                "decision": "calibrated" + (f", threshold {threshold:.4f}" if threshold is not None else "")
                if calibration is not None else "argmax",
                "argmax": ci_argmax.to_dict()}
    summary = {
        "title": title, **(context or {}), "split": split, "examples": int(len(y)), "classes": list(class_names),
        "metric": metric, "positive_class": class_names[pos] if pos is not None else None,
        "headline": headline,
        "metrics": metrics_deployed, "metrics_argmax": metrics_argmax,
        "calibration": None if calibration is None else {
            **calibration.to_dict(), "ece_before": ece_raw, "ece_after": ece_cal, "bins": n_bins,
            "nll_before": metrics_argmax["loss"], "nll_after": metrics_deployed["loss"]},
        "ece": {"before": ece_raw, "after": ece_cal, "bins": n_bins},
        "per_class": per_class.to_dict(orient="records"),
        "confused_pairs": pairs,
        "fairness": None if fairness is None else fairness.to_dict(),
        "explanations": explanations,
        "changed_by_decision": int((preds != preds_argmax).sum()),
        "seconds": round(time.perf_counter() - t0, 2),
        "files": sorted({p.name for p in files} | {SUMMARY}),
    }
    (folder / SUMMARY).write_text(json.dumps(json_clean(summary), indent=2, default=_json_default) + "\n",
                                  encoding="utf-8")
    files.append(folder / SUMMARY)
    log.info("evaluation of %d %s examples written to %s in %.1fs", len(y), split, folder, summary["seconds"])
    return Evaluation(folder, split, metric, summary, per_class, cm, calibration, fairness, files)


def _explain(access: ModelAccess, probs, preds, target, class_names, raw_inputs, ids, k: int, folder: Path) -> dict:
    from autoft.evaluation import explain as E

    picked = E.pick_examples(probs, preds, target, k)
    rows = picked["correct"] + picked["wrong"]
    if not rows:
        return {"examples": 0}
    kinds = ["correct"] * len(picked["correct"]) + ["wrong"] * len(picked["wrong"])
    captions = [f"{kind}: true {class_names[int(target[r])]}, predicted {class_names[int(preds[r])]} "
                f"(p={float(probs[r, preds[r]]):.2f}) · {ids[r]}" for r, kind in zip(rows, kinds)]
    state = access.encode(rows)
    targets = preds[rows]
    if access.modality == "text":
        ids_t, mask = state
        toks = E.text_attributions(access.model, ids_t, mask, targets, access.tokenizer)
        examples = [{"caption": cap, "tokens": t, "correct": kind == "correct"}
                    for cap, t, kind in zip(captions, toks, kinds)]
        E.write_token_html(examples, folder / "explanations.html")
        return {"method": "layer integrated gradients (token embeddings)", "file": "explanations.html",
                "examples": len(rows), "correct": len(picked["correct"]), "wrong": len(picked["wrong"]),
                "items": [{"caption": e["caption"], "correct": e["correct"],
                           "tokens": [[t, round(s, 4)] for t, s in e["tokens"]]} for e in examples]}
    attr = E.image_attributions(access.model, state, targets, baseline=E.black_baseline(access.preprocessing))
    images = [raw_inputs[r] for r in rows] if raw_inputs is not None else [np.zeros((8, 8), np.uint8)] * len(rows)
    E.attribution_grid(images, attr, captions, folder / "explanations.png",
                       "Integrated Gradients for the predicted class (from a black image)")
    return {"method": "integrated gradients (black-image baseline)", "file": "explanations.png",
            "examples": len(rows), "correct": len(picked["correct"]), "wrong": len(picked["wrong"]),
            "items": [{"caption": cap, "correct": kind == "correct"} for cap, kind in zip(captions, kinds)]}


# -- a trained model on its task -------------------------------------------------------------------
def _split_index(task_data, name: str) -> torch.Tensor:
    if name not in SPLITS:
        raise ConfigError(f"unknown split '{name}'; expected one of {', '.join(SPLITS)}", field="--split")
    return torch.from_numpy(np.sort(getattr(task_data.splits, name))).long()


def split_logits(model, task_data, names: tuple[str, ...] = ("val", "test"), cache=None) -> dict[str, torch.Tensor]:
    """Logits of a trained Classifier for the examples of each split in ``names`` (dataset order).

    Frozen-prefix outputs come from ``cache`` with the same rows as the search and its final check
    (train + validation, then the test examples), so after ``fine_tune_and_score(..., test=True)``
    with the same cache nothing but the trainable stages and the head runs again."""
    from autoft.core.cache import FeatureCache
    from autoft.core.train import memory_budget, predict_logits, resolve_device
    from autoft.data.encode import streamed

    cache = cache or FeatureCache(disk=False)
    device = resolve_device(task_data.device) if task_data.device != "cpu" else torch.device("cpu")
    bb = model.backbone
    if streamed(len(task_data.data), bb.preprocessing, memory_budget(task_data)):
        return _streamed_split_logits(model, task_data, names, cache, device)
    encoded, digest = cache.encoded(task_data.data, bb.preprocessing)
    model = model.to(device)
    out = {}
    try:
        split = bb.split
        if split == 0:
            for n in names:
                out[n] = predict_logits(model, encoded, _split_index(task_data, n), 0, device)
            return out
        start = split + 1 if split == bb.num_stages else split
        train = _split_index(task_data, "train")
        search_rows = torch.unique(torch.cat([train, _split_index(task_data, "val")]))
        test = _split_index(task_data, "test")
        extra = test[~torch.isin(test, search_rows)]
        feats = []  # (rows, their frozen-prefix outputs), as the search and the final check cached them
        for rows in [search_rows] + ([extra] if len(extra) else []):
            if any(torch.isin(_split_index(task_data, n), rows).any() for n in names):
                feats.append((rows, cache.prefix(bb, encoded, digest, split, device, rows=rows)))
        for n in names:
            idx = _split_index(task_data, n)
            logits = torch.empty((len(idx), task_data.data.num_classes))
            for rows, state in feats:
                inside = torch.isin(idx, rows)
                if inside.any():
                    pos = torch.searchsorted(rows, idx[inside])
                    logits[inside] = predict_logits(model, state, pos, start, device)
            out[n] = logits
        return out
    finally:
        model.cpu()


def _streamed_split_logits(model, task_data, names: tuple[str, ...], cache, device) -> dict[str, torch.Tensor]:
    """:func:`split_logits` for images too many to encode in memory: batch by batch.  Rows whose
    frozen-prefix features the search (or its final check) wrote to disk (same rows, same key:
    :meth:`FeatureCache.stream_prefix`) are read from there; the others are streamed through the whole
    model with the evaluation transform (DataLoader workers)."""
    from autoft.core.train import _predict_batches

    bb = model.backbone
    split = bb.split
    start = split + 1 if split == bb.num_stages else split
    train = _split_index(task_data, "train")
    search_rows = torch.unique(torch.cat([train, _split_index(task_data, "val")]))
    test = _split_index(task_data, "test")
    extra = test[~torch.isin(test, search_rows)]
    parts = [search_rows] + ([extra] if len(extra) else [])
    model = model.to(device)
    out = {}
    try:
        for n in names:
            idx = _split_index(task_data, n)
            logits = torch.empty((len(idx), task_data.data.num_classes))
            done = torch.zeros(len(idx), dtype=torch.bool)
            for rows in parts if split > 0 else []:
                inside = torch.isin(idx, rows)
                arr = cache.stream_prefix(bb, task_data.data, split, rows, device, task_data.num_workers,
                                          compute=False) if inside.any() else None
                if arr is not None:
                    pos = torch.searchsorted(rows, idx[inside])
                    batches = ((arr.read(pos[i:i + 256]),) for i in range(0, len(pos), 256))
                    logits[inside] = _predict_batches(model, batches, start, device, "fp32", False)
                    done |= inside
            if not done.all():
                logits[~done] = _stream_logits(model, task_data.data, idx[~done], device, task_data.num_workers)
            out[n] = logits
        return out
    finally:
        model.cpu()


def _stream_logits(model, data, idx: torch.Tensor, device, num_workers: int | None = None) -> torch.Tensor:
    """Logits of the examples ``idx`` of ``data``, decoded and transformed per batch in DataLoader workers."""
    from autoft.core.train import _predict_batches
    from autoft.data.stream import StreamDataset, eval_keys, eval_transform, loader

    ds = StreamDataset(data.inputs, data.labels, eval_transform(model.backbone.preprocessing))
    return _predict_batches(model.to(device), loader(ds, eval_keys(idx), num_workers), 0, device, "fp32", False)


def data_logits(model, data, cache=None, device: str = "cpu", budget: int | None = None) -> torch.Tensor:
    """Logits of a trained Classifier for every example of ``data`` (a LabelledData); images that would
    exceed the memory ``budget`` (bytes; default :func:`autoft.core.train.memory_budget`) encoded are
    streamed batch by batch."""
    from autoft.core.cache import FeatureCache
    from autoft.core.train import predict_logits
    from autoft.data.encode import streamed

    dev = torch.device(device)
    try:
        if streamed(len(data), model.backbone.preprocessing, _budget(budget)):
            return _stream_logits(model, data, torch.arange(len(data)), dev)
        cache = cache or FeatureCache(disk=False)
        encoded, _ = cache.encoded(data, model.backbone.preprocessing)
        return predict_logits(model.to(dev), encoded, torch.arange(len(data)), 0, dev)
    finally:
        model.cpu()


def _budget(budget: int | None = None, task_data=None) -> int:
    from autoft.core.train import TaskData, memory_budget

    if budget is not None:
        return int(budget)
    return memory_budget(task_data if task_data is not None else TaskData(None, None))


def _classifier_access(model, data, rows: torch.Tensor, cache, budget: int | None = None) -> ModelAccess:
    """Encoded rows for explanations: from the cache's encoding when the data is held in memory, else
    only the few rows explained, encoded when asked."""
    from autoft.core.cache import trim_text
    from autoft.data.encode import encode, streamed
    from autoft.zoo.base import index_state

    pre = model.backbone.preprocessing
    tok = None
    if pre.modality == "text":
        from autoft.data.encode import load_tokenizer

        tok = load_tokenizer(pre.tokenizer)
    if streamed(len(data), pre, _budget(budget)):
        def encode_rows(pos):
            return encode([data.inputs[int(i)] for i in rows[torch.as_tensor(pos)].tolist()], pre)
    else:
        encoded, _ = cache.encoded(data, pre)

        def encode_rows(pos):
            return trim_text(index_state(encoded, rows[torch.as_tensor(pos)]))
    return ModelAccess(model.cpu().eval(), encode_rows, pre.modality, tok, pre)


def evaluate_winner(result, task_data, folder: str | Path, *, cache=None, split: str = "test",
                    groups=None, group_name: str = "group", calibrate: bool = True, explain: int = 4,
                    n_boot: int = 1000, n_bins: int = 15, seed: int = 0, context: dict | None = None) -> Evaluation:
    """Evaluate a trained model on a split of its task and write the evaluation to ``folder``.

    ``result``: the :class:`~autoft.core.train.FineTuneResult` of ``fine_tune_and_score(cfg, task_data,
    cache=cache, test=True, return_model=True)`` (or its ``.model``, a Classifier).  Calibration
    (temperature, and the threshold for binary tasks) is fitted on the validation split.  ``groups``: one
    group value per example of ``task_data.data`` (or per example of the split) for the fairness
    section.  Pass the search's ``cache`` so that frozen-prefix features are reused.
    """
    from autoft.core.cache import FeatureCache
    from autoft.core.train import memory_budget
    from autoft.data.lazy import Rows

    model = getattr(result, "model", result)
    if model is None:
        raise ConfigError("evaluate_winner needs the trained model: call fine_tune_and_score(..., return_model=True)")
    cache = cache or FeatureCache(disk=False)
    data = task_data.data
    names = tuple(dict.fromkeys(("val", split))) if calibrate else (split,)
    logits = split_logits(model, task_data, names, cache)
    idx = _split_index(task_data, split)
    val_idx = _split_index(task_data, "val")
    g = None
    if groups is not None:
        g = np.asarray(list(groups), dtype=object)
        if len(g) == len(data):
            g = g[idx.numpy()]
        elif len(g) != len(idx):
            raise DataError(f"groups has {len(g)} values; expected one per example ({len(data)}) or per "
                            f"{split} example ({len(idx)})")
    raw = Rows(data.inputs, idx)  # read when shown (a few confused pairs and explanations), never all at once
    access = _classifier_access(model, data, idx, cache, memory_budget(task_data)) if explain > 0 else None
    ctx = {"task": task_data.name, "examples_total": len(data), **(context or {})}
    if getattr(result, "test_metrics", None):
        ctx["search_test_metrics"] = result.test_metrics
    return evaluate_predictions(
        logits[split], torch.from_numpy(data.labels[idx.numpy()]), data.class_names, folder,
        metric=task_data.metric, positive_index=task_data.positive_index, split=split,
        val_logits=logits.get("val") if calibrate and split != "val" else None,
        val_target=torch.from_numpy(data.labels[val_idx.numpy()]) if calibrate and split != "val" else None,
        groups=g, group_name=group_name, raw_inputs=raw, ids=[f"row {i}" for i in idx.tolist()], access=access,
        explain=explain, n_boot=n_boot, n_bins=n_bins, seed=seed,
        title=f"{task_data.name}: {getattr(model.backbone, 'name', '')}", context=ctx)
