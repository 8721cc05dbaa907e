"""Suites: many tasks, one comparison of backbones across them.

A suite file (YAML) lists tasks and how to run each::

    name: cifar-digits
    description: CIFAR ResNets on two digits tasks
    mode: fixed                 # fixed: the same recipe on every backbone | search: a search per task
    tasks:                      # task names, task files (relative to this file), or inline task documents
      - digits-fewshot
      - {task: digits, recipe: {epochs: 2}}          # per-task overrides
      - {inline: {name: ..., modality: image, data: {...}, ...}}
    backbones: [resnet20, resnet32, resnet44, resnet56]
    recipe: {unfreeze: half, lr: 3.0e-3, head_lr_mult: 3.0, batch_size: 32, epochs: 3}   # fixed mode
    search: {n_trials: 8, timeout: 600}                                                  # search mode

Per task it records each backbone's validation score of the task's metric (fixed mode: the recipe's
score, and its test score; search mode: the best validation score the search reached with that
backbone, via :func:`autoft.api.search`), the backbone's LogME score on the frozen features
(:mod:`autoft.rank`), and Kendall's tau between the LogME order and the fine-tuned order.  Across
tasks: a backbone x task table, each backbone's rank per task and mean rank.

Resumable: each task's result is written to ``tasks/<task>.json`` when it ends (and after every
backbone, as ``tasks/<task>.partial.json``); a run skips tasks whose result file exists for the same
settings, and continues a task from its partial file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoft.errors import ConfigError, TrialFailed

log = logging.getLogger(__name__)
BUILTIN_SUITES = Path(__file__).resolve().parents[1] / "builtin" / "suites"
RESULT_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSpec(_Model):
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    space: str | None = None
    pruner: str | None = None
    rank: bool = True


class TaskEntry(_Model):
    task: str | None = None
    inline: dict | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    backbones: list[str] | None = None
    search: SearchSpec | None = None


class Suite(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$", max_length=128)
    description: str = ""
    mode: Literal["fixed", "search"] = "fixed"
    tasks: list[str | TaskEntry] = Field(min_length=1)
    backbones: list[str] = Field(min_length=1)
    recipe: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpec = SearchSpec()
    seed: int | None = None

    _file: Path | None = None

    @property
    def file(self) -> Path | None:
        return self._file

    def entries(self) -> list[TaskEntry]:
        return [TaskEntry(task=t) if isinstance(t, str) else t for t in self.tasks]


def find_suite(name_or_path: str | Path) -> Path:
    """``./suites/NAME.yaml``, then the built-in suites, or a path (as tasks are found)."""
    from autoft.task import find_named_yaml

    return find_named_yaml(name_or_path, Path.cwd() / "suites", BUILTIN_SUITES, "suite", "suites")


def load_suite(name_or_path: str | Path | Suite) -> Suite:
    if isinstance(name_or_path, Suite):
        return name_or_path
    from autoft.task import read_yaml

    path = find_suite(name_or_path)
    doc = read_yaml(path, "suite")
    try:
        suite = Suite.model_validate(doc)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msgs.append(f"field '{loc}': {msg}")
        raise ConfigError("; ".join(msgs), file=str(path)) from None
    suite._file = path
    return suite


# -- one task --------------------------------------------------------------------------------------
def _load_entry_task(entry: TaskEntry, suite: Suite):
    from autoft.task import load_task, parse_task

    if (entry.task is None) == (entry.inline is None):
        raise ConfigError("each task of a suite is a name/file ('task') or an inline task document ('inline')",
                          file=str(suite.file) if suite.file else None, field="tasks")
    if entry.inline is not None:
        return parse_task(entry.inline, suite.file or "<suite>")
    name = entry.task
    if suite.file is not None and Path(name).suffix in (".yaml", ".yml") and not Path(name).is_absolute():
        cand = suite.file.parent / name
        if cand.is_file() and not Path(name).is_file():
            name = str(cand)
    return load_task(name)


def _recipe_config(backbone: str, recipe: dict, task, seed: int):
    from autoft.core.config import TrialConfig

    r = dict(recipe)
    if r.get("unfreeze") == "half":
        from autoft.space import num_stages

        r["unfreeze"] = max(1, round(num_stages(backbone) / 2))
    r.setdefault("epochs", task.budget.max_epochs)
    r.setdefault("seed", seed)
    try:
        return TrialConfig(backbone=backbone, **r)
    except ValueError as exc:
        raise ConfigError(f"the suite's recipe does not make a valid configuration: {exc}", field="recipe") from None


def _fingerprint(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, doc: dict) -> None:
    from autoft.evaluation.evaluate import json_clean

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_clean(doc), indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def kendall(logme: dict[str, float | None], scores: dict[str, float | None], direction: str = "maximize") -> dict:
    """Kendall's tau-b (SciPy) between the LogME scores and the fine-tuned scores of the backbones that
    have both; for a minimised metric the scores are negated first (tau > 0: LogME ordered them right)."""
    from scipy.stats import kendalltau

    names = [b for b in scores if scores.get(b) is not None and logme.get(b) is not None
             and math.isfinite(scores[b]) and math.isfinite(logme[b])]
    out = {"backbones": len(names), "tau": None, "p_value": None,
           "logme_order": sorted(names, key=lambda b: -logme[b]),
           "finetuned_order": sorted(names, key=lambda b: -scores[b] if direction == "maximize" else scores[b])}
    if len(names) >= 2:
        sign = 1.0 if direction == "maximize" else -1.0
        res = kendalltau([logme[b] for b in names], [sign * scores[b] for b in names])
        out["tau"] = None if not math.isfinite(res.statistic) else float(res.statistic)
        out["p_value"] = None if not math.isfinite(res.pvalue) else float(res.pvalue)
    return out


def run_fixed_task(task, backbones: list[str], recipe: dict, *, seed: int, cache=None, partial: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """The recipe fine-tuned on every backbone (validation and test scores), and LogME per backbone."""
    from autoft.core import FeatureCache, fine_tune_and_score
    from autoft.rank import rank_backbones

    say = progress or (lambda m: None)
    cache = cache or FeatureCache()
    td = task.prepare()
    doc = json.loads(partial.read_text()) if partial is not None and partial.is_file() else {}
    rows: dict = doc.get("backbones", {})
    if "logme" not in doc:
        scores = rank_backbones(td, backbones, cache, methods=("logme",))
        doc["logme"] = {s.backbone: s.logme for s in scores}
        doc["logme_errors"] = {s.backbone: s.error for s in scores if s.error}
    for bb in backbones:
        if bb in rows:
            continue
        cfg = _recipe_config(bb, recipe, task, seed)
        t0 = time.perf_counter()
        row = {"config": cfg.model_dump(), "logme": doc["logme"].get(bb)}
        try:
            res = fine_tune_and_score(cfg, td, cache=cache, test=len(td.splits.test) > 0)
            row |= {"val": res.score, "test": (res.test_metrics or {}).get(td.metric), "epochs": res.epochs_run,
                    "val_metrics": res.metrics, "test_metrics": res.test_metrics}
        except (TrialFailed, Exception) as exc:  # one backbone failing must not cost the suite
            row |= {"val": None, "test": None, "error": f"{type(exc).__name__}: {exc}"}
            log.warning("suite: %s on %s failed: %s", bb, task.name, exc)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows[bb] = row
        say(f"  {task.name} · {bb}: validation {td.metric} {_fmt(row['val'])}, test {_fmt(row['test'])} "
            f"({row['seconds']:.1f}s)")
        doc["backbones"] = rows
        if partial is not None:
            _write_json(partial, doc)
    return {"metric": td.metric, "direction": td.direction, "backbones": rows, "logme": doc["logme"],
            "logme_errors": doc.get("logme_errors", {}), "sizes": td.splits.sizes()}


def run_search_task(task, backbones: list[str], spec: SearchSpec, *, results_dir: Path, study_name: str,
                    progress: Callable[[str], None] | None = None) -> dict:
    """A search (``autoft.api.search``) on ``task`` over ``backbones``; per backbone its best validation score."""
    from autoft.api import search

    say = progress or (lambda m: None)
    r = search(task, backbones=backbones, study_name=study_name, results_dir=results_dir, n_trials=spec.n_trials,
               timeout=spec.timeout, space=spec.space, pruner=spec.pruner, rank=spec.rank)
    lb = r.leaderboard()
    rows, logme = {}, {}
    winner = (r.best_config or {}).get("backbone") if r.best_trial is not None else None
    for _, row in lb.iterrows():
        bb = row["backbone"]
        if not isinstance(bb, str):
            continue
        best = row.get("best_score")
        val = None if best is None or (isinstance(best, float) and math.isnan(best)) else float(best)
        lm = row.get("logme") if "logme" in lb.columns else None
        logme[bb] = None if lm is None or (isinstance(lm, float) and math.isnan(lm)) else float(lm)
        rows[bb] = {"val": val, "trials": int(row["trials"]), "complete": int(row["complete"]),
                    "best_trial": None if pd.isna(row.get("best_trial")) else int(row["best_trial"]),
                    "logme": logme[bb],
                    "test": (r.test_metrics or {}).get(task.metric) if bb == winner else None}
    # the ranking the search made before its first trial scores every backbone, tried or not
    for d in r.study.user_attrs.get("ranking") or []:
        if isinstance(d, dict) and d.get("backbone") in backbones and isinstance(d.get("logme"), (int, float)):
            logme[d["backbone"]] = float(d["logme"])
    for bb in backbones:  # never tried (budget too small): no score
        rows.setdefault(bb, {"val": None, "trials": 0, "complete": 0})
        logme.setdefault(bb, None)
        rows[bb]["logme"] = logme[bb]
    if any(v is None for v in logme.values()) and len(backbones) > 1:  # the search did not rank (rank: false)
        from autoft.core import FeatureCache
        from autoft.rank import rank_backbones

        scores = rank_backbones(task.prepare(), backbones, FeatureCache(), methods=("logme",))
        logme = {s.backbone: s.logme for s in scores}
        for bb in rows:
            rows[bb]["logme"] = logme.get(bb)
    say(f"  {task.name}: search of {sum(r.counts.values())} trials, best {task.metric} "
        f"{_fmt(r.best_value)} ({winner}), test {_fmt((r.test_metrics or {}).get(task.metric))}")
    return {"metric": task.metric, "direction": task.direction, "backbones": rows, "logme": logme,
            "winner": winner, "test_metrics": r.test_metrics, "results_dir": str(r.results_dir),
            "counts": r.counts}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


# -- the suite ------------------------------------------------------------------------------------
@dataclass
class SuiteResult:
    folder: Path
    mode: str
    table: pd.DataFrame  # backbone x task: validation score
    ranks: pd.DataFrame  # backbone x task: rank (1 = best)
    mean_rank: pd.Series
    kendall: dict[str, dict]
    tasks: dict[str, dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    test_table: pd.DataFrame | None = None


def _search_available() -> bool:
    try:
        import autoft.api as api
    except ImportError:
        return False
    return callable(getattr(api, "search", None))


def run_suite(suite: str | Path | Suite, *, out: str | Path | None = None, mode: str | None = None,
              tasks: list[str] | None = None, n_trials: int | None = None, timeout: float | None = None,
              fresh: bool = False, progress: Callable[[str], None] | None = None) -> SuiteResult:
    """Run every task of ``suite`` (skipping those whose result file exists for the same settings,
    unless ``fresh``) and write the cross-task tables to ``out`` (default ``results/suites/<name>``)."""
    from autoft.core import FeatureCache

    suite = load_suite(suite)
    say = progress or (lambda m: log.info("%s", m))
    mode = mode or suite.mode
    if mode == "search" and not _search_available():
        log.warning("suite %s: autoft.api.search is not available; running the fixed recipe instead", suite.name)
        say("search mode needs autoft.api.search, which this autoft lacks: running the fixed recipe instead")
        mode = "fixed"
    folder = Path(out) if out is not None else Path("results") / "suites" / suite.name
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    entries = suite.entries()
    loaded = [(e, _load_entry_task(e, suite)) for e in entries]
    if tasks:
        names = [t.name for _, t in loaded]
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ConfigError(f"task(s) {', '.join(unknown)} are not in suite '{suite.name}' "
                              f"(its tasks: {', '.join(names)})", field="--tasks")
        loaded = [(e, t) for e, t in loaded if t.name in tasks]
    dupes = {t.name for _, t in loaded if [x.name for _, x in loaded].count(t.name) > 1}
    if dupes:
        raise ConfigError(f"suite '{suite.name}' lists task(s) {', '.join(sorted(dupes))} twice",
                          file=str(suite.file) if suite.file else None, field="tasks")
    cache = FeatureCache()
    results, ran, skipped = {}, [], []
    for entry, task in loaded:
        backbones = entry.backbones or suite.backbones
        seed = suite.seed if suite.seed is not None else task.seed
        if mode == "fixed":
            settings = {"mode": mode, "backbones": backbones, "recipe": {**suite.recipe, **entry.recipe},
                        "seed": seed}
        else:
            spec = (entry.search or suite.search).model_copy()
            if n_trials is not None:
                spec.n_trials = n_trials
            if timeout is not None:
                spec.timeout = timeout
            settings = {"mode": mode, "backbones": backbones, "search": spec.model_dump()}
        settings["task"] = task.model_dump()
        key = _fingerprint({"version": RESULT_VERSION, **settings})
        path = folder / "tasks" / f"{task.name}.json"
        partial = folder / "tasks" / f"{task.name}.partial.json"
        if path.is_file() and not fresh:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = None
            if doc and doc.get("fingerprint") == key:
                say(f"{task.name}: result file exists ({path}); skipped")
                results[task.name] = doc
                skipped.append(task.name)
                continue
            say(f"{task.name}: the result file is from other settings; running again")
        if fresh:
            partial.unlink(missing_ok=True)
        elif partial.is_file():
            try:
                if json.loads(partial.read_text()).get("fingerprint") != key:
                    partial.unlink()
            except (OSError, ValueError):
                partial.unlink(missing_ok=True)
        say(f"{task.name}: {mode} mode over {', '.join(backbones)}")
        t0 = time.perf_counter()
        if mode == "fixed":
            if not partial.is_file():
                _write_json(partial, {"fingerprint": key})
            doc = run_fixed_task(task, backbones, settings["recipe"], seed=seed, cache=cache, partial=partial,
                                 progress=say)
        else:
            doc = run_search_task(task, backbones, spec, results_dir=folder / "results",
                                  study_name=f"suite-{suite.name}", progress=say)
        doc |= {"task": task.name, "mode": mode, "fingerprint": key, "settings": settings,
                "seconds": round(time.perf_counter() - t0, 1), "version": RESULT_VERSION}
        doc["kendall"] = kendall(doc["logme"], {b: r.get("val") for b, r in doc["backbones"].items()},
                                 doc["direction"])
        _write_json(path, doc)
        partial.unlink(missing_ok=True)
        results[task.name] = doc
        ran.append(task.name)
    res = summarise(results, folder, mode)
    res.ran, res.skipped = ran, skipped
    return res


def summarise(results: dict[str, dict], folder: Path, mode: str) -> SuiteResult:
    """The cross-task files: scores.csv (backbone x task), ranks.csv (+ mean rank), kendall.csv,
    suite.json, suite.md and ranks.png."""
    tasks = list(results)
    backbones = list(dict.fromkeys(b for d in results.values() for b in d["backbones"]))
    table = pd.DataFrame(index=pd.Index(backbones, name="backbone"), columns=tasks, dtype=float)
    test = table.copy()
    ranks = table.copy()
    for t, d in results.items():
        for b, r in d["backbones"].items():
            table.loc[b, t] = np.nan if r.get("val") is None else r["val"]
            test.loc[b, t] = np.nan if r.get("test") is None else r["test"]
        ranks[t] = table[t].rank(ascending=d["direction"] == "minimize", method="average")
    mean_rank = ranks.mean(axis=1, skipna=True)
    order = mean_rank.sort_values(kind="stable").index
    table, ranks, test, mean_rank = table.loc[order], ranks.loc[order], test.loc[order], mean_rank.loc[order]
    kt = {t: d.get("kendall") or {} for t, d in results.items()}
    files = []
    scores = table.copy()
    scores["mean_rank"] = mean_rank
    scores.to_csv(folder / "scores.csv", float_format="%.6g")
    files.append(folder / "scores.csv")
    if test.notna().any().any():
        test.to_csv(folder / "scores_test.csv", float_format="%.6g")
        files.append(folder / "scores_test.csv")
    r2 = ranks.copy()
    r2["mean_rank"] = mean_rank
    r2.to_csv(folder / "ranks.csv", float_format="%.4g")
    files.append(folder / "ranks.csv")
    kdf = pd.DataFrame([{"task": t, "metric": results[t]["metric"], "backbones": k.get("backbones"),
                         "kendall_tau": k.get("tau"), "p_value": k.get("p_value"),
                         "logme_order": " > ".join(k.get("logme_order") or []),
                         "finetuned_order": " > ".join(k.get("finetuned_order") or [])} for t, k in kt.items()])
    kdf.to_csv(folder / "kendall.csv", index=False, float_format="%.4g")
    files.append(folder / "kendall.csv")
    metrics = {t: results[t]["metric"] for t in tasks}
    md = ["| backbone | " + " | ".join(f"{t} ({metrics[t]})" for t in tasks) + " | mean rank |",
          "|---|" + "---:|" * (len(tasks) + 1)]
    for b in table.index:
        md.append(f"| {b} | " + " | ".join(_fmt(None if pd.isna(v) else float(v)) for v in table.loc[b])
                  + f" | {mean_rank[b]:.2f} |")
    md += ["", "| task | backbones | Kendall's tau (LogME vs fine-tuned) | p |", "|---|---:|---:|---:|"]
    md += [f"| {t} | {k.get('backbones')} | {_fmt(k.get('tau'))} | {_fmt(k.get('p_value'))} |" for t, k in kt.items()]
    (folder / "suite.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    files.append(folder / "suite.md")
    _write_json(folder / "suite.json", {"mode": mode, "tasks": tasks, "metrics": metrics,
                                        "scores": {b: {t: (None if pd.isna(table.loc[b, t]) else float(table.loc[b, t]))
                                                       for t in tasks} for b in table.index},
                                        "mean_rank": {b: float(v) for b, v in mean_rank.items()},
                                        "kendall": kt})
    files.append(folder / "suite.json")
    try:
        files.append(_ranks_png(table, ranks, metrics, folder / "ranks.png"))
    except Exception as exc:  # a plot must never cost the results
        log.warning("suite: could not draw ranks.png: %s", exc)
    return SuiteResult(folder, mode, table, ranks, mean_rank, kt, results, files=files, test_table=test)


def _ranks_png(table: pd.DataFrame, ranks: pd.DataFrame, metrics: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(table.columns), 0.9 + 0.45 * len(table)))
    ax.imshow(ranks.to_numpy(float), cmap="RdYlGn_r", aspect="auto")
    for i in range(len(table)):
        for j in range(len(table.columns)):
            v = table.iat[i, j]
            ax.text(j, i, "-" if pd.isna(v) else f"{v:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(table.columns)), [f"{t}\n({metrics[t]})" for t in table.columns], fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set_title("validation score (colour: rank within the task)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
