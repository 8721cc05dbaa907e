"""Calibration: expected calibration error, reliability diagrams, temperature scaling, and the
decision threshold of a binary task.

* **ECE** is torchmetrics' ``multiclass_calibration_error`` (top-label, ``n_bins`` equal-width bins, L1);
* the **reliability diagram** is scikit-learn's ``calibration_curve`` of "the top label is right"
  against the top label's probability (the same bins);
* **temperature scaling** (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): one
  scalar ``T`` dividing the logits, fitted on the validation split by minimising the cross-entropy
  (SciPy's bounded scalar minimiser over log T).  Argmax predictions do not change;
* the **threshold** of a binary task: the probability of the positive class (after temperature
  scaling) from which an example is called positive, chosen on the validation split to maximise the
  task's metric (ties: the threshold closest to 0.5).

What an export needs to apply both is :class:`Calibration`, written as ``calibration.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from autoft.evaluation.metrics import THRESHOLD_METRICS, as_tensor, metric_value, predictions

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "autoft-calibration"


@dataclass
class Calibration:
    """How to turn a model's logits into calibrated probabilities and a decision.

    ``probabilities = softmax(logits / temperature)``; for a binary task with ``threshold``, the
    prediction is ``positive_class`` when its probability is at least ``threshold``, else the other
    class; otherwise the argmax."""

    temperature: float = 1.0
    threshold: float | None = None
    positive_class: str | None = None
    positive_index: int | None = None
    metric: str | None = None  # the metric the threshold was tuned for
    fitted_on: str = "val"
    examples: int = 0
    validation: dict = field(default_factory=dict)  # ECE / NLL before and after; metric at 0.5 and at the threshold
    test: dict | None = None  # metrics of this decision on the test split, when recorded (an export's refit)
    format: str = CALIBRATION_FORMAT
    format_version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def probabilities(self, logits) -> torch.Tensor:
        return torch.softmax(as_tensor(logits, torch.float32) / self.temperature, dim=1)

    def predict(self, logits) -> torch.Tensor:
        return predictions(self.probabilities(logits), self.positive_index, self.threshold)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, classes: list[str] | None = None) -> "Calibration":
        """Read ``calibration.json`` (a file, or a folder holding one), checking its values."""
        from autoft.errors import ExportError

        path = Path(path)
        path = path / CALIBRATION_FILE if path.is_dir() else path
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: cannot read the calibration ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise ExportError(f"{path} is not an autoft calibration file (format '{CALIBRATION_FORMAT}')")
        known = set(cls.__dataclass_fields__)
        cal = cls(**{k: v for k, v in doc.items() if k in known})
        t = cal.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t > 0):
            raise ExportError(f"{path}: temperature must be a number above 0, got {t!r}")
        if cal.threshold is not None:
            th = cal.threshold
            if not isinstance(th, (int, float)) or isinstance(th, bool) or not 0 <= th <= 1:
                raise ExportError(f"{path}: threshold must be a probability in [0, 1], got {th!r}")
            if classes is not None:
                if len(classes) != 2:
                    raise ExportError(f"{path}: a threshold needs a binary model, this one has {len(classes)} classes")
                if cal.positive_class not in classes:
                    raise ExportError(f"{path}: positive_class {cal.positive_class!r} is not one of {classes}")
                cal.positive_index = classes.index(cal.positive_class)
        return cal


def ece(probs, target, n_bins: int = 15) -> float:
    """Expected calibration error of the top label (torchmetrics, L1 over ``n_bins`` equal-width bins)."""
    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)
    if len(t) == 0:
        return float("nan")
    return float(multiclass_calibration_error(p, t, p.shape[1], n_bins=n_bins, norm="l1"))


def nll(logits, target, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(as_tensor(logits, torch.float32) / temperature, as_tensor(target, torch.long)))


def fit_temperature(logits, target, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the cross-entropy of ``logits / T`` on these (validation) examples."""
    from scipy.optimize import minimize_scalar

    z, y = as_tensor(logits, torch.float64), as_tensor(target, torch.long)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: float(F.cross_entropy(z / math.exp(lt), y)),
                          bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    t = math.exp(float(res.x))
    # never worse than no scaling (a flat objective can stop anywhere inside the bounds)
    return t if float(F.cross_entropy(z / t, y)) <= float(F.cross_entropy(z, y)) else 1.0


def tune_threshold(probs, target, metric: str, positive_index: int = 1,
                   max_candidates: int = 512) -> tuple[float, float]:
    """The threshold on the positive class's probability that maximises ``metric`` on these examples,
    and that maximum.  Candidates: midpoints between the distinct probabilities (at most
    ``max_candidates``, by quantile) and 0.5; ties go to the candidate closest to 0.5."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold tuning supports {', '.join(THRESHOLD_METRICS)}, not '{metric}'")
    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)
    pos = p[:, positive_index].double().numpy()
    u = np.unique(pos)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else u
    if len(mids) > max_candidates:
        mids = np.unique(np.quantile(mids, np.linspace(0, 1, max_candidates)))
    cands = np.unique(np.concatenate([mids, [0.5]]))
    scores = np.array([metric_value(metric, p, predictions(p, positive_index, float(c)), t, 2, positive_index)
                       for c in cands])
    best = scores.max()
    ok = np.flatnonzero(scores >= best - 1e-12)
    choice = ok[np.argmin(np.abs(cands[ok] - 0.5))]
    return float(cands[choice]), float(scores[choice])


def fit_calibration(val_logits, val_target, class_names: list[str], metric: str,
                    positive_index: int | None = None, *, temperature: bool = True, threshold: bool = True,
                    n_bins: int = 15) -> Calibration:
    """Temperature (and, for a binary task whose metric a threshold changes, the threshold) fitted on
    validation logits; ``validation`` records what each step did there."""
    z, y = as_tensor(val_logits, torch.float32), as_tensor(val_target, torch.long)
    c = len(class_names)
    pos = (1 if positive_index is None else positive_index) if c == 2 else None
    t = fit_temperature(z, y) if temperature and len(y) else 1.0
    cal = Calibration(temperature=t, positive_class=class_names[pos] if pos is not None else None,
                      positive_index=pos, fitted_on="val", examples=int(len(y)))
    p0, p1 = torch.softmax(z, 1), torch.softmax(z / t, 1)
    cal.validation = {"ece_before": ece(p0, y, n_bins), "ece_after": ece(p1, y, n_bins),
                      "nll_before": nll(z, y), "nll_after": nll(z, y, t)}
    if threshold and pos is not None and metric in THRESHOLD_METRICS and len(y):
        th, score = tune_threshold(p1, y, metric, pos)
        cal.threshold, cal.metric = th, metric
        cal.validation |= {f"{metric}_at_0.5": metric_value(metric, p1, predictions(p1, pos, None), y, 2, pos),
                           f"{metric}_at_threshold": score}
    return cal


def reliability_diagram(probs, target, path: str | Path, n_bins: int = 15, title: str = "",
                        compare: tuple | None = None) -> Path:
    """Accuracy against confidence of the top label (scikit-learn's ``calibration_curve``), bar widths
    = bins, with the share of examples per bin below.  ``compare = (probs, label)`` overlays a second
    curve (e.g. before temperature scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    path = Path(path)
    p, t = as_tensor(probs, torch.float32), as_tensor(target, torch.long)

    def curve(pr):
        conf, pred = pr.max(1)
        correct = (pred == t).numpy().astype(int)
        if len(np.unique(correct)) < 2:  # all right (or all wrong): calibration_curve needs both
            edges = np.linspace(0, 1, n_bins + 1)
            b = np.clip(np.digitize(conf.numpy(), edges[1:-1]), 0, n_bins - 1)
            mids = np.array([conf.numpy()[b == i].mean() for i in np.unique(b)])
            return np.full(len(mids), correct[0], dtype=float), mids, conf.numpy()
        acc, mean_conf = calibration_curve(correct, conf.numpy(), n_bins=n_bins, strategy="uniform")
        return acc, mean_conf, conf.numpy()

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.2, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    if compare is not None:
        acc2, conf2, _ = curve(as_tensor(compare[0], torch.float32))
        ax.plot(conf2, acc2, marker="s", ms=4, c="tab:grey", alpha=0.7,
                label=f"{compare[1]} (ECE {ece(compare[0], t, n_bins):.3f})")
    acc, mean_conf, conf = curve(p)
    ax.plot(mean_conf, acc, marker="o", ms=5, c="tab:blue",
            label=f"{'calibrated' if compare is not None else 'model'} (ECE {ece(p, t, n_bins):.3f})")
    ax.set_ylabel("accuracy of the top label"); ax.set_xlim(0, 1); ax.set_ylim(0, 1.02)
    ax.set_title(title or "Reliability diagram"); ax.legend(loc="upper left", fontsize=8); ax.grid(alpha=0.3)
    hx.hist(conf, bins=np.linspace(0, 1, n_bins + 1), color="tab:blue", alpha=0.7)
    hx.set_xlabel("confidence (probability of the top label)"); hx.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
