"""The finalists' part of the results: ``finalists.csv``, the ``finalists`` section of ``best.yaml`` and
the lines ``autoft search`` prints, all from the study's ``finalists`` record (:mod:`autoft.study.finalists`).

``finalists.csv`` — one row per finalist, best mean first: ``rank`` (by mean), ``trial``, ``chosen``,
``single_seed_best``, ``single_seed_rank``, ``single_seed_score``, ``mean``, ``std`` (ddof 1), ``ci95_low``
and ``ci95_high`` (95 % t-interval of the mean), ``n``, ``seeds`` (or ``folds``), ``scores`` (per seed,
``;``-separated, in the order of ``seeds``), ``source`` (``trial``: the trial's own recorded score,
``re-run``, ``recorded``: a re-run of an earlier search command), ``backbone``, ``unfreeze``, ``failed``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from autoft.study.record import ATTR_FINALISTS

COLUMNS = ["rank", "trial", "chosen", "single_seed_best", "single_seed_rank", "single_seed_score", "mean", "std",
           "ci95_low", "ci95_high", "n", "seeds", "folds", "scores", "source", "backbone", "unfreeze", "failed"]


def current_record(study) -> dict | None:
    """The study's finalists record when it still stands (its winner is the study's winner), else None."""
    from autoft.study.finalists import chosen_trial

    rec = study.user_attrs.get(ATTR_FINALISTS)
    if not isinstance(rec, dict) or not isinstance(rec.get("finalists"), list):
        return None
    chosen = chosen_trial(study)
    return rec if chosen is not None and chosen.number == rec.get("chosen_trial") else None


def _join(xs) -> str:
    return ";".join(str(x) for x in xs)  # floats in full (round-trip) precision


def finalists_table(rec: dict) -> pd.DataFrame:
    """One row per finalist, best mean first (finalists with a failed run last)."""
    maximize = rec.get("direction", "maximize") == "maximize"
    rows = []
    for f in rec.get("finalists") or []:
        rows.append({"trial": f.get("trial"), "chosen": f.get("trial") == rec.get("chosen_trial"),
                     "single_seed_best": f.get("trial") == rec.get("single_seed_trial"),
                     "single_seed_rank": f.get("single_seed_rank"), "single_seed_score": f.get("single_seed_score"),
                     "mean": f.get("mean"), "std": f.get("std"), "ci95_low": f.get("ci95_low"),
                     "ci95_high": f.get("ci95_high"), "n": f.get("n"), "seeds": _join(f.get("seeds") or []),
                     "folds": _join([i + 1 for i in f["folds"]]) if f.get("folds") else "",
                     "scores": _join(f.get("scores") or []), "source": _join(f.get("source") or []),
                     "backbone": f.get("backbone"), "unfreeze": f.get("unfreeze"), "failed": f.get("failed") or ""})
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    df["_bad"] = df["mean"].isna()
    df = df.sort_values(["_bad", "mean", "single_seed_rank"], ascending=[True, not maximize, True],
                        na_position="last").drop(columns="_bad").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def finalists_section(rec: dict) -> dict:
    """The ``finalists`` section of ``best.yaml``."""
    chosen = next((f for f in rec["finalists"] if f.get("trial") == rec.get("chosen_trial")), {})
    return {"chosen_by": rec.get("chosen_by"), "interval": rec.get("interval"),
            "single_seed_trial": rec.get("single_seed_trial"), "changed": bool(rec.get("changed")),
            "validation_mean": chosen.get("mean"), "validation_std": chosen.get("std"),
            "validation_ci95": [chosen.get("ci95_low"), chosen.get("ci95_high")],
            "seed": "the trial's own (its configuration above)", "file": "finalists.csv",
            "finalists": [{"trial": f.get("trial"), "mean": f.get("mean"), "std": f.get("std"),
                           "ci95": [f.get("ci95_low"), f.get("ci95_high")], "scores": f.get("scores"),
                           "seeds": f.get("seeds"), **({"failed": f["failed"]} if f.get("failed") else {})}
                          for f in rec["finalists"]]}


def write_finalists(study, folder: Path) -> Path | None:
    """``finalists.csv`` in ``folder`` when the study's finalists record stands; a stale file is removed."""
    from autoft.results.tables import atomic_path

    path = folder / "finalists.csv"
    rec = current_record(study)
    if rec is None:
        path.unlink(missing_ok=True)  # from an earlier command whose choice no longer stands
        return None
    with atomic_path(path) as tmp:
        finalists_table(rec).to_csv(tmp, index=False)
    return path


def finalists_lines(rec: dict) -> list[str]:
    """What ``autoft search`` prints about the finalists: one line per finalist, then the choice."""
    metric = rec.get("metric", "score")
    unit = "folds" if rec.get("mode") == "cv" else "seeds"
    out = [f"finalists ({rec.get('chosen_by')}; {rec.get('interval')}):"]
    raw = {f.get("trial"): f for f in rec.get("finalists") or []}
    for _, r in finalists_table(rec).iterrows():
        mark = "*" if r["chosen"] else " "
        scores = ", ".join(f"{x:.4f}" for x in raw.get(r["trial"], {}).get("scores") or [])
        if pd.isna(r["mean"]):
            stats = f"failed: {str(r['failed'])[:120]}"
        elif pd.isna(r["std"]):
            stats = f"mean {r['mean']:.4f}"
        else:
            stats = (f"mean {r['mean']:.4f} ± {r['std']:.4f} (95 % CI {r['ci95_low']:.4f}-{r['ci95_high']:.4f}) "
                     f"over {unit} {(r['folds'] or r['seeds']).replace(';', ', ')}: {scores}")
        out.append(f" {mark} trial #{r['trial']} ({r['backbone']}, unfreeze {r['unfreeze']}) single-seed "
                   f"{metric} {r['single_seed_score']:.4f} (#{r['single_seed_rank']}) · {stats}")
    if rec.get("changed"):
        out.append(f"the choice changed: trial #{rec['chosen_trial']} (best mean) instead of the single-seed best "
                   f"#{rec['single_seed_trial']}")
    else:
        out.append(f"the choice is the single-seed best, trial #{rec['chosen_trial']}")
    return out
