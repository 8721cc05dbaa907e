"""Accuracy against latency: the Pareto set of a study's completed trials.

A completed trial is in the Pareto set when no other completed trial is at least as good on both the
task's metric (in its direction) and the latency (lower is better), and strictly better on one. The
latency is the study's second objective in a multi-objective study (``--objectives accuracy,latency``:
CPU, batch 1, unless another figure was named), else the CPU latency at batch 1 recorded for every
completed trial (:mod:`autoft.core.latency`): a single-objective study gets its Pareto set too.

* ``pareto.csv`` — one row per member, fastest first: ``number``, the metric (validation), the
  latencies (CPU batch 1 and 64, GPU when measured, ms), ``n_params``, ``size_mb``, ``backbone``,
  ``unfreeze``, ``head`` (``linear`` or ``mlp WIDTHxDEPTH ACTIVATION``);
* ``plots/pareto.png`` — the metric against the latency of every completed trial, the front highlighted;
* the Pareto section of ``report.md``.

Any member can be exported: ``autoft export --task T --trial N``.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from autoft.results.tables import GPU_LATENCY_COLUMNS

DEFAULT_LATENCY = "latency_cpu_b1_ms"
LATENCY_LABELS = {"latency_cpu_b1_ms": "CPU latency, batch 1 (ms)", "latency_cpu_b64_ms": "CPU latency, batch 64 (ms)",
                  "latency_gpu_b1_ms": "GPU latency, batch 1 (ms)", "latency_gpu_b64_ms": "GPU latency, batch 64 (ms)"}


def latency_column(study) -> str:
    """The latency the Pareto set is taken on: a multi-objective study's second objective, else CPU batch 1."""
    from autoft.study.record import ATTR_OBJECTIVES

    rec = study.user_attrs.get(ATTR_OBJECTIVES) if len(study.directions) > 1 else None
    if isinstance(rec, list) and len(rec) == 2 and rec[1] in LATENCY_LABELS:
        return rec[1]
    return DEFAULT_LATENCY


def dominates(a: tuple[float, float], b: tuple[float, float], maximize: bool) -> bool:
    """Whether ``a`` = (metric, latency) dominates ``b``: no worse on both, strictly better on one."""
    sa, sb = (a[0], b[0]) if maximize else (-a[0], -b[0])
    return sa >= sb and a[1] <= b[1] and (sa > sb or a[1] < b[1])


def candidates(df: pd.DataFrame, latency: str = DEFAULT_LATENCY) -> pd.DataFrame:
    """The completed trials of a trials table that have a finite score and ``latency``."""
    if df.empty or latency not in df.columns:
        return df.iloc[0:0]
    done = df[df.state == "complete"]
    score = pd.to_numeric(done.score, errors="coerce")
    lat = pd.to_numeric(done[latency], errors="coerce")
    ok = score.map(lambda v: math.isfinite(v) if pd.notna(v) else False) & lat.map(
        lambda v: math.isfinite(v) if pd.notna(v) else False)
    return done[ok]


def pareto_mask(df: pd.DataFrame, direction: str = "maximize", latency: str = DEFAULT_LATENCY) -> pd.Series:
    """For the rows of :func:`candidates`: True where no other row dominates."""
    pts = list(zip(df.score.astype(float), df[latency].astype(float)))
    maximize = direction == "maximize"
    return pd.Series([not any(dominates(q, p, maximize) for q in pts) for p in pts], index=df.index)


def head_label(row) -> str:
    head = row.get("cfg_head")
    if not isinstance(head, str):
        return ""
    if head != "mlp":
        return head
    try:
        return f"mlp {int(row.get('cfg_head_width'))}x{int(row.get('cfg_head_depth'))} {row.get('cfg_activation')}"
    except (TypeError, ValueError):
        return "mlp"


def pareto_table(df: pd.DataFrame, metric: str, direction: str = "maximize",
                 latency: str = DEFAULT_LATENCY) -> pd.DataFrame:
    """The Pareto set of a trials table (:func:`autoft.results.tables.trials_table`), fastest first."""
    lat_cols = ["latency_cpu_b1_ms", "latency_cpu_b64_ms"] + [c for c in GPU_LATENCY_COLUMNS if c in df.columns]
    columns = ["number", metric, *lat_cols, "n_params", "size_mb", "backbone", "unfreeze", "head"]
    cand = candidates(df, latency)
    if cand.empty:
        return pd.DataFrame(columns=columns)
    front = cand[pareto_mask(cand, direction, latency)]
    out = pd.DataFrame({"number": front.number.astype(int), metric: front.score.astype(float)})
    for c in [*lat_cols, "n_params", "size_mb", "backbone", "unfreeze"]:
        out[c] = front[c] if c in front.columns else None
    out["head"] = [head_label(r) for _, r in front.iterrows()]
    order = [latency, "number"]
    return out.sort_values(order).reset_index(drop=True)[columns]


def pareto_plot(df: pd.DataFrame, front: pd.DataFrame, metric: str, latency: str, path: Path) -> Path:
    """The metric against ``latency`` for every completed trial (grey), the Pareto set in red, joined by
    the staircase of the front and labelled with trial numbers."""
    from autoft.results.plots import _save, plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cand = candidates(df, latency)
    ax.scatter(cand[latency].astype(float), cand.score.astype(float), s=22, c="tab:grey", alpha=0.7,
               label="completed trials")
    if not front.empty:
        f = front.sort_values(latency)
        ax.step(f[latency].astype(float), f[metric].astype(float), where="post", c="tab:red", lw=1, alpha=0.7)
        ax.scatter(f[latency].astype(float), f[metric].astype(float), s=40, c="tab:red", zorder=3,
                   label="Pareto set")
        for _, r in f.iterrows():
            ax.annotate(f"#{int(r.number)} {r.backbone}", (float(r[latency]), float(r[metric])), fontsize=7,
                        xytext=(4, -9), textcoords="offset points")
    lat = cand[latency].astype(float)
    if len(lat) and lat.min() > 0 and lat.max() / lat.min() > 8:
        ax.set_xscale("log")
    ax.set_xlabel(LATENCY_LABELS.get(latency, latency))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Validation {metric} vs latency (Pareto set in red)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def markdown_table(df: pd.DataFrame) -> list[str]:
    """``df`` as the lines of a Markdown table."""
    def cell(v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 100 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return lines


def pareto_section(front: pd.DataFrame, metric: str, latency: str, multi: bool, task_name: str,
                   study_name: str) -> list[str]:
    """The Pareto section of ``report.md``."""
    how = ("the study's two objectives" if multi else
           "every completed trial's recorded latency (the study itself optimised the metric alone)")
    lines = ["## Accuracy vs latency: the Pareto set", "",
             f"Completed trials that no other completed trial beats on both validation {metric} and "
             f"{LATENCY_LABELS.get(latency, latency)}, from {how}; fastest first. Latencies are the median "
             "forward time of the whole model (backbone + head) after warm-up; sizes are parameters and MB.", ""]
    if front.empty:
        return lines + ["No completed trial has a recorded latency.", ""]
    lines += markdown_table(front)
    lines += ["", "![accuracy vs latency](plots/pareto.png)", "",
              f"Export a member: `autoft export --task {task_name} --study-name {study_name} --trial N --out DIR`.", ""]
    return lines
