"""Fairness across groups: per-group metrics and the largest gaps between groups.

A group attribute names, for every example, the group it belongs to: a column of the task's text
table (:func:`groups_from_column`), or a table mapping examples to groups (:func:`groups_from_file`:
image paths, texts or row indices).  :func:`group_fairness` computes per group the number of examples,
accuracy, the task's metric, and for the positive class (binary tasks; every class one-vs-rest
otherwise) the selection rate, true and false positive rates, then

* **demographic parity difference**: the largest difference in selection rate between two groups;
* **equalised odds difference**: the larger of the largest TPR difference and the largest FPR difference;
* the largest accuracy and task-metric differences.

The per-group table and the two gaps come from fairlearn (``MetricFrame``,
``demographic_parity_difference``, ``equalized_odds_difference``; ``pip install fairlearn``) when it is
installed, else from scikit-learn's recall and pandas, with the same definitions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autoft.errors import DataError
from autoft.evaluation.metrics import as_tensor, metric_value

log = logging.getLogger(__name__)
MISSING = "(missing)"
SMALL_GROUP = 30  # groups with fewer examples get a warning: their rates move a lot with one example


def _fairlearn():
    try:
        import fairlearn.metrics as fm
    except ImportError:
        return None
    return fm


@dataclass
class FairnessResult:
    attribute: str
    table: pd.DataFrame  # one row per group
    gaps: dict  # the largest differences between groups
    positive_class: str | None = None
    backend: str = "fairlearn"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "positive_class": self.positive_class, "backend": self.backend,
                "gaps": self.gaps, "groups": self.table.to_dict(orient="records"), "notes": self.notes}


def _rates(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, fm) -> tuple[pd.DataFrame, float, float]:
    """Per group selection rate, TPR, FPR of binary (0/1) labels, and the DPD / EOD gaps."""
    if fm is not None:
        mf = fm.MetricFrame(metrics={"selection_rate": fm.selection_rate, "tpr": fm.true_positive_rate,
                                     "fpr": fm.false_positive_rate},
                            y_true=y_true, y_pred=y_pred, sensitive_features=pd.Series(groups, name="group"))
        dpd = fm.demographic_parity_difference(y_true, y_pred, sensitive_features=groups)
        eod = fm.equalized_odds_difference(y_true, y_pred, sensitive_features=groups)
        return mf.by_group, float(dpd), float(eod)
    from sklearn.metrics import recall_score

    rows = {}
    for g in pd.unique(groups):
        m = groups == g
        yt, yp = y_true[m], y_pred[m]
        rows[g] = {"selection_rate": float(yp.mean()) if len(yp) else np.nan,
                   "tpr": recall_score(yt, yp, pos_label=1, zero_division=0) if yt.any() else np.nan,
                   "fpr": 1 - recall_score(yt, yp, pos_label=0, zero_division=0) if (~yt.astype(bool)).any()
                   else np.nan}
    df = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    df.index.name = "group"
    spread = lambda s: float(np.nanmax(s) - np.nanmin(s)) if np.isfinite(s).any() else np.nan  # noqa: E731
    dpd = spread(df.selection_rate.to_numpy(float))
    eod = max(spread(df.tpr.to_numpy(float)), spread(df.fpr.to_numpy(float)))
    return df, dpd, eod


def group_fairness(target, probs, groups, class_names: list[str], metric: str, positive_index: int | None = None,
                   threshold: float | None = None, attribute: str = "group", *,
                   use_fairlearn: bool = True) -> FairnessResult:
    """Per-group metrics and gaps for predictions from ``probs`` (argmax, or ``threshold`` on the
    positive class of a binary task).  ``groups``: one group value per example (None/NaN/"" are put
    in a group named ``(missing)``)."""
    from autoft.evaluation.metrics import predictions

    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)
    g = np.array([MISSING if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
                  else str(v) for v in list(groups)], dtype=object)
    if len(g) != len(t):
        raise DataError(f"group attribute '{attribute}' has {len(g)} values for {len(t)} examples")
    c = len(class_names)
    preds = predictions(p, positive_index, threshold)
    fm = _fairlearn() if use_fairlearn else None
    names = sorted(pd.unique(g))
    rows = []
    for name in names:
        m = torch.from_numpy(g == name)
        row = {"group": name, "examples": int(m.sum()), "accuracy": metric_value("accuracy", p[m], preds[m], t[m], c)}
        if metric != "accuracy":
            row[metric] = metric_value(metric, p[m], preds[m], t[m], c, positive_index)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("group")
    notes = []
    small = [f"{n} ({int(table.loc[n, 'examples'])})" for n in names if table.loc[n, "examples"] < SMALL_GROUP]
    if small:
        notes.append(f"group(s) with fewer than {SMALL_GROUP} examples, whose rates are noisy: {', '.join(small)}")
    if len(names) > 50:
        notes.append(f"{len(names)} groups: is the attribute a category? (a continuous value can be banded, "
                     "e.g. --length-bands for texts)")
    gaps: dict = {"groups": len(names)}
    spread = lambda col: float(table[col].max() - table[col].min()) if table[col].notna().any() else None  # noqa: E731
    pos_name = None
    if c == 2:
        pos = 1 if positive_index is None else positive_index
        pos_name = class_names[pos]
        yt, yp = (t == pos).numpy().astype(int), (preds == pos).numpy().astype(int)
        rates, dpd, eod = _rates(yt, yp, g, fm)
        rates.index = rates.index.astype(str)
        table = table.join(rates)
        table.insert(1, "positives", [int(yt[g == n].sum()) for n in table.index])
        gaps |= {"demographic_parity_difference": dpd, "equalized_odds_difference": eod}
    else:  # every class one-vs-rest: the largest gap over classes, and which class
        worst = {"demographic_parity_difference": (-1.0, None), "equalized_odds_difference": (-1.0, None)}
        for k in range(c):
            yt, yp = (t == k).numpy().astype(int), (preds == k).numpy().astype(int)
            if not yt.any():
                continue
            _, dpd, eod = _rates(yt, yp, g, fm)
            for key, v in (("demographic_parity_difference", dpd), ("equalized_odds_difference", eod)):
                if np.isfinite(v) and v > worst[key][0]:
                    worst[key] = (v, class_names[k])
        for key, (v, cls) in worst.items():
            gaps[key] = v if cls is not None else None
            gaps[f"{key}_class"] = cls
        notes.append("multi-class: selection rates and error rates are per class, one-vs-rest; each gap is the "
                     "largest over classes")
    gaps["accuracy_difference"] = spread("accuracy")
    if metric != "accuracy":
        gaps[f"{metric}_difference"] = spread(metric)
    table = table.reset_index()
    return FairnessResult(attribute, table, {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                             for k, v in gaps.items()},
                          pos_name, "fairlearn" if fm is not None else "scikit-learn", notes)


# -- where group values come from --------------------------------------------------------------------
def read_text_table(path: Path, columns: list[str], sep: str | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """Columns of a CSV/TSV read exactly as :func:`autoft.data.load_csv` reads the task's table
    (strings, no NA conversion, tab files unquoted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    if sep is None:
        with open(path, encoding=encoding, errors="replace") as f:
            first = f.readline()
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in first else ","
    try:
        df = pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False,
                         quoting=3 if sep == "\t" else 0)
    except Exception as exc:
        raise DataError(f"could not read {path} as a table separated by {sep!r}: {exc}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        from autoft.errors import did_you_mean

        raise DataError(f"{path}: no column '{missing[0]}'{did_you_mean(missing[0], df.columns)}; columns are "
                        f"{list(df.columns)}")
    return df


def groups_from_column(path: str | Path, column: str, texts: list[str], *, text_column: str = "text",
                       label_column: str = "label", sep: str | None = None, encoding: str = "utf-8") -> np.ndarray:
    """The ``column`` of the text table ``path``, one value per example of the data loaded from it
    (rows with an empty label are skipped, as loading does).  The table's texts must be exactly
    ``texts`` (the loaded data's inputs, in order), so that groups cannot be misaligned."""
    df = read_text_table(Path(path), [text_column, label_column, column], sep, encoding)
    df = df[df[label_column].str.strip() != ""]
    if len(df) != len(texts) or df[text_column].tolist() != list(texts):
        raise DataError(f"{path}: the rows of the table do not match the loaded data ({len(df)} rows with a label, "
                        f"{len(texts)} examples); the group column must come from the task's own data file")
    return df[column].to_numpy(dtype=object)


def image_paths(root: str | Path, class_names: list[str], labels: np.ndarray) -> list[str]:
    """The files of an image folder in the order :func:`autoft.data.load_image_folder` loads them,
    relative to ``root`` (checked: same count, and each file's class folder is its label)."""
    from autoft.data.datasets import IMAGE_SUFFIXES

    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [f for d in class_dirs for f in sorted(d.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    rel = [f.relative_to(root).as_posix() for f in files]
    ok = len(rel) == len(labels) and all(r.split("/", 1)[0] == class_names[y] for r, y in zip(rel, labels))
    if not ok:
        raise DataError(f"{root}: {len(rel)} image files but {len(labels)} loaded images (some were skipped as "
                        "unreadable): groups by path need every image of the folder to be readable")
    return rel


def groups_from_file(path: str | Path, n: int, *, paths: list[str] | None = None, root: str | Path | None = None,
                     texts: list[str] | None = None, group_column: str = "group") -> np.ndarray:
    """Group values from a table with a ``group`` column and one key column: ``path`` (image files,
    relative to the data folder ``root``, as in ``paths``, or absolute), ``text`` (exact texts) or ``index`` (row of the
    data, 0-based).  Examples the table does not name get the group ``(missing)``."""
    path = Path(path)
    df = read_text_table(path, [group_column])
    key = next((k for k in ("path", "text", "index") if k in df.columns), None)
    if key is None:
        raise DataError(f"{path}: a groups table needs a key column 'path' (image files), 'text' or 'index' beside "
                        f"'{group_column}'; columns are {list(df.columns)}")
    mapping: dict = {}
    for k, v in zip(df[key], df[group_column]):
        if key == "index":
            try:
                k = int(k)
            except ValueError:
                raise DataError(f"{path}: index '{k}' is not a whole number") from None
        elif key == "path":
            p = Path(k)  # Path drops a leading './'
            if p.is_absolute() and root is not None and p.resolve().is_relative_to(Path(root).resolve()):
                p = p.resolve().relative_to(Path(root).resolve())
            k = p.as_posix()
        if k in mapping and mapping[k] != v:
            raise DataError(f"{path}: {key} {k!r} is given two groups ({mapping[k]!r} and {v!r})")
        mapping[k] = v
    if key == "index":
        keys = list(range(n))
    elif key == "path":
        if paths is None:
            raise DataError(f"{path}: groups by 'path' need image files (an image folder); use 'index' for this data")
        keys = paths
    else:
        if texts is None:
            raise DataError(f"{path}: groups by 'text' need text data")
        keys = list(texts)
    out = np.array([mapping.get(k, MISSING) for k in keys], dtype=object)
    named = int(sum(k in mapping for k in keys))
    if named == 0:
        raise DataError(f"{path}: none of the {n} examples is named in the '{key}' column")
    if named < n:
        log.warning("%s names %d of %d examples; the rest are in group %s", path, named, n, MISSING)
    return out


def length_bands(texts: list[str], edges: list[int]) -> np.ndarray:
    """A group per text from its length in characters: ``edges=[60]`` gives ``<=60`` and ``>60``."""
    edges = sorted(int(e) for e in edges)
    labels = [f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]}"]
    idx = np.searchsorted(np.array(edges), np.array([len(t) for t in texts]), side="left")
    return np.array([labels[i] for i in idx], dtype=object)
