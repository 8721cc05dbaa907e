"""Plots of a study as PNG files (matplotlib, headless)."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    from autoft.results.tables import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)
    return path


def optimisation_history(df: pd.DataFrame, metric: str, direction: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    done = df[df.state == "complete"].sort_values("number")
    for state, colour in (("complete", "tab:blue"), ("pruned", "tab:grey")):
        d = df[df.state == state]
        ax.scatter(d.number, d.score, s=18, c=colour, label=state, alpha=0.8)
    if not done.empty:
        best = done.score.cummax() if direction == "maximize" else done.score.cummin()
        ax.step(done.number, best, where="post", c="tab:red", label="best so far")
    ax.set_xlabel("trial"); ax.set_ylabel(f"validation {metric}"); ax.set_title("Optimisation history")
    ax.legend(); ax.grid(alpha=0.3)
    return _save(fig, path)


def param_importances(study: optuna.Study, path: Path) -> Path | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a multi-objective study (metric and latency): the importances for the metric
            target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            imp = optuna.importance.get_param_importances(study, target=target)
    except Exception as exc:  # needs enough completed trials with varying parameters
        log.info("parameter importances not available: %s", exc)
        return None
    if not imp:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(imp) + 1.2))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)"); ax.set_title("Parameter importances")
    return _save(fig, path)


def best_per_backbone(lb: pd.DataFrame, metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(lb), 1) + 1.2))
    d = lb.dropna(subset=["best_score"]).iloc[::-1]
    # a trial without a configuration (failed before sampling, or written by another process) has no backbone
    names = [("(unknown)" if pd.isna(b) else str(b)) if not isinstance(b, str) else b for b in d.backbone]
    ax.barh(names, d.best_score, color="tab:green")
    for y, v in enumerate(d.best_score):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    ax.set_xlabel(f"best validation {metric}"); ax.set_title("Best score per backbone")
    if not d.empty:
        lo = d.best_score.min()
        ax.set_xlim(max(0.0, lo - (1 - lo) * 0.5 - 0.02), 1.0 if d.best_score.max() <= 1 else None)
    return _save(fig, path)


def learning_curves(study: optuna.Study, metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        curve = t.intermediate_values or _history(t)  # a multi-objective study reports no intermediate values
        if not curve:
            continue
        steps = sorted(curve)
        pruned = t.state == TrialState.PRUNED
        label = ("pruned" if pruned else "complete") if (pruned not in shown) else None
        shown.add(pruned)
        ax.plot(steps, [curve[s] for s in steps], c="tab:grey" if pruned else "tab:blue",
                alpha=0.5 if pruned else 0.8, lw=1, marker=".", label=label)
    ax.set_xlabel("epoch"); ax.set_ylabel(f"validation {metric}"); ax.set_title("Learning curves")
    if shown:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _history(t) -> dict[int, float]:
    """The metric after every epoch from the trial's ``history`` attribute (epoch 1 first)."""
    from autoft.study.record import ATTR_HISTORY

    h = t.user_attrs.get(ATTR_HISTORY)
    if not isinstance(h, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in h):
        return {}
    return {i + 1: float(v) for i, v in enumerate(h)}


def write_plots(study: optuna.Study, df: pd.DataFrame, lb: pd.DataFrame, metric: str, direction: str,
                folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = [optimisation_history(df, metric, direction, folder / "history.png"),
           best_per_backbone(lb, metric, folder / "backbones.png"),
           learning_curves(study, metric, folder / "learning_curves.png")]
    imp = param_importances(study, folder / "importances.png")
    return [p for p in [*out, imp] if p is not None]
