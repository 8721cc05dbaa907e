"""One self-contained HTML page per study (or per evaluation).

``results/<task>/<study>/report.html`` gathers the leaderboard (``leaderboard.csv``), the winner
(``best.yaml``), the search's plots (``plots/*.png``) and the winner's evaluation (``evaluation/``:
headline metric with its interval, metrics, calibration, per-class table, confusion matrix,
reliability diagram, fairness, explanations, most confused pairs).  Images are embedded as base64
PNGs, styles inline: the file opens anywhere, offline, and can be mailed as one attachment.  Every
string that comes from data or a user (class names, texts, configuration values) is HTML-escaped; the
page has no scripts and loads nothing.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)
REPORT = "report.html"

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1150px;margin:0 auto;padding:18px 28px 60px;background:#fff}h1{font-size:24px;margin:8px 0 2px}
h2{font-size:19px;margin:30px 0 8px;border-bottom:2px solid #e3e5e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b616b;font-size:13px}.tw{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
th,td{border:1px solid #dde0e4;padding:3px 8px}th{background:#f0f2f5;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{background:#f6f8fa;border:1px solid #e1e4e8;border-radius:6px;padding:8px 14px;min-width:150px}
.card .v{font-size:21px;font-weight:600}.card .k{font-size:12px;color:#5b616b}
.imgs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.imgs figure{margin:0}
.imgs img{max-width:520px;border:1px solid #e1e4e8}figcaption{font-size:12px;color:#5b616b}
.note{font-size:12.5px;color:#5b616b}.warn{color:#a15c00}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)) else f"{v:.4f}"
    return str(v)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(df: pd.DataFrame, max_rows: int = 60) -> str:
    """An escaped HTML table; numbers right-aligned."""
    if df is None or df.empty:
        return "<p class='note'>(empty)</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.head(max_rows).iterrows():
        cells = []
        for v in r.tolist():
            v = None if (isinstance(v, float) and math.isnan(v)) else v
            cells.append(f"<td class='n'>{_e(_fmt(v))}</td>" if _num(v) else f"<td>{_e(_fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>... {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    return (f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f"{more}")


def image(path: Path, caption: str = "") -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{_e(caption or path.name)}' src='data:image/png;base64,{data}'>{cap}</figure>"


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except Exception as exc:  # a report must not fail on one unreadable file
        log.warning("report: cannot read %s (%s)", path, exc)
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception as exc:
        log.warning("report: cannot read %s (%s)", path, exc)
        return None


def _card(key: str, value: str, sub: str = "") -> str:
    return (f"<div class='card'><div class='k'>{_e(key)}</div><div class='v'>{_e(value)}</div>"
            + (f"<div class='k'>{_e(sub)}</div>" if sub else "") + "</div>")


def study_section(study_dir: Path) -> str:
    parts = []
    best = None
    if (study_dir / "best.yaml").is_file():
        import yaml

        try:
            best = yaml.safe_load((study_dir / "best.yaml").read_text(encoding="utf-8"))
        except Exception as exc:
            log.warning("report: cannot read best.yaml (%s)", exc)
    if isinstance(best, dict):
        metric = best.get("metric", "score")
        backbone = str((best.get("config") or {}).get("backbone", ""))
        cards = [_card("winning trial", f"#{best.get('trial', '?')}", backbone),
                 _card(f"validation {metric}", _fmt(best.get("validation_score", best.get("value"))), "search")]
        tm = best.get("test_metrics") or {}
        if isinstance(tm, dict) and metric in tm:
            cards.append(_card(f"test {metric}", _fmt(tm[metric]), "final check, scored once"))
        parts.append("<div class='cards'>" + "".join(cards) + "</div>")
        cfg = best.get("config") or {}
        if isinstance(cfg, dict) and cfg:
            items = list(cfg.items())
            half = (len(items) + 1) // 2  # two columns of parameter / value pairs
            rows = [{"parameter": a[0], "value": a[1], " parameter": b[0] if b else "", " value": b[1] if b else ""}
                    for a, b in zip(items[:half], items[half:] + [None] * (2 * half - len(items)))]
            parts.append("<h3>Winning configuration</h3>" + table(pd.DataFrame(rows)))
    lb = _read_csv(study_dir / "leaderboard.csv")
    if lb is not None:
        parts.append("<h2>Leaderboard</h2><p class='note'>One row per backbone (validation scores of the search; "
                     "LogME = the ranking made before it).</p>" + table(lb))
    tr = _read_csv(study_dir / "trials.csv")
    if tr is not None and not tr.empty:
        cols = [c for c in ("number", "state", "score", "backbone", "unfreeze", "cfg_lr", "cfg_head", "epochs_run",
                            "seconds", "origin", "fail_reason") if c in tr.columns]
        parts.append(f"<h3>Trials ({len(tr)})</h3>" + table(tr[cols], max_rows=40))
    plots = sorted((study_dir / "plots").glob("*.png")) if (study_dir / "plots").is_dir() else []
    if plots:
        parts.append("<h2>Search plots</h2><div class='imgs'>" + "".join(image(p, p.stem.replace("_", " "))
                                                                       for p in plots) + "</div>")
    return "\n".join(parts)


def evaluation_section(ev_dir: Path) -> str:
    from autoft.evaluation.explain import token_html  # its CSS (TOKEN_CSS) is in the page head

    s = _read_json(ev_dir / "summary.json")
    if not s:
        return ""
    out = [f"<h2>Evaluation of the winner</h2><p class='sub'>{_e(s.get('title', ''))} · split "
           f"<b>{_e(s.get('split'))}</b> · {_e(s.get('examples'))} examples · {_e(len(s.get('classes', [])))} classes"
           + (f" · positive class {_e(s['positive_class'])}" if s.get("positive_class") else "") + "</p>"]
    h = s.get("headline") or {}
    cal = s.get("calibration") or {}
    ece = s.get("ece") or {}
    cards = [_card(f"{h.get('metric')} ({round(100 * (h.get('level') or 0.95))}% CI)", _fmt(h.get("value")),
                   f"[{_fmt(h.get('ci_low'))}, {_fmt(h.get('ci_high'))}] · {h.get('decision', '')}")]
    if h.get("argmax") and h["argmax"].get("value") != h.get("value"):
        a = h["argmax"]
        cards.append(_card(f"{h.get('metric')} with argmax", _fmt(a.get("value")),
                           f"[{_fmt(a.get('low'))}, {_fmt(a.get('high'))}]"))
    ece_text = f"{_fmt(ece.get('before'))} → {_fmt(ece.get('after'))}" if cal else _fmt(ece.get("before"))
    cards.append(_card("ECE", ece_text,
                       "before → after temperature scaling" if cal else "expected calibration error"))
    if cal:
        cards.append(_card("temperature", _fmt(cal.get("temperature")), f"fitted on {cal.get('fitted_on', 'val')}"))
        if cal.get("threshold") is not None:
            cards.append(_card("decision threshold", _fmt(cal.get("threshold")),
                               f"P({cal.get('positive_class')}) ≥ threshold; tuned for {cal.get('metric')}"))
    out.append("<div class='cards'>" + "".join(cards) + "</div>")
    m, ma = s.get("metrics") or {}, s.get("metrics_argmax") or {}
    if m:
        df = pd.DataFrame({"metric": list(ma), "argmax": [ma[k] for k in ma],
                           "calibrated decision": [m.get(k) for k in ma]})
        out.append("<h3>Metrics</h3>" + table(df))
    pc = _read_csv(ev_dir / "per_class.csv")
    if pc is not None:
        out.append("<h3>Per class</h3>" + table(pc))
    out.append("<div class='imgs'>" + image(ev_dir / "confusion.png", "confusion matrix (row = true class)")
               + image(ev_dir / "reliability.png", "reliability diagram") + "</div>")
    f = s.get("fairness")
    if f:
        gaps = {k: v for k, v in (f.get("gaps") or {}).items()}
        out.append(f"<h2>Fairness across groups: {_e(f.get('attribute'))}</h2>"
                   f"<p class='note'>computed with {_e(f.get('backend'))}"
                   + (f"; positive class {_e(f['positive_class'])}" if f.get("positive_class") else "") + "</p>")
        out.append(table(pd.DataFrame([{"gap": k.replace("_", " "), "value": v} for k, v in gaps.items()])))
        fr = _read_csv(ev_dir / "fairness.csv")
        if fr is not None:
            out.append(table(fr))
        for note in f.get("notes") or []:
            out.append(f"<p class='note warn'>{_e(note)}</p>")
    ex = s.get("explanations")
    if ex and not ex.get("error"):
        out.append(f"<h2>Explanations</h2><p class='note'>{_e(ex.get('method', ''))}: the "
                   f"{_e(ex.get('correct', 0))} most confident correct and {_e(ex.get('wrong', 0))} most confident "
                   "wrong predictions.</p>")
        if ex.get("file", "").endswith(".png"):
            out.append("<div class='imgs'>" + image(ev_dir / ex["file"], "attributions") + "</div>")
        elif ex.get("items"):
            items = [{"caption": it["caption"], "correct": it.get("correct"),
                      "tokens": [(t, float(v)) for t, v in it.get("tokens", [])]} for it in ex["items"]]
            out.append("<p class='note'><span style='background:rgba(214,39,40,.6)'>red</span>: towards the "
                       "predicted class, <span style='background:rgba(31,119,180,.6)'>blue</span>: against.</p>"
                       + token_html(items))
    elif ex and ex.get("error"):
        out.append(f"<h2>Explanations</h2><p class='note warn'>not available: {_e(ex['error'])}</p>")
    pairs = s.get("confused_pairs") or []
    if pairs:
        rows = [{"true": p["true"], "predicted": p["predicted"], "count": p["count"],
                 "share of true class": p["share_of_true"],
                 "examples": " | ".join(p.get("examples") or p.get("example_ids") or [])} for p in pairs]
        out.append("<h2>Most confused class pairs</h2>" + table(pd.DataFrame(rows))
                   + "<div class='imgs'>" + image(ev_dir / "confused_pairs.png", "examples per pair") + "</div>")
    return "\n".join(out)


def write_html_report(out: str | Path, *, study_dir: str | Path | None = None,
                      evaluation_dir: str | Path | None = None, title: str = "autoft report") -> Path:
    """Write one self-contained HTML page from a study folder and/or an evaluation folder."""
    from autoft.evaluation.explain import TOKEN_CSS

    out = Path(out)
    body = []
    if study_dir is not None:
        body.append(study_section(Path(study_dir)))
    if evaluation_dir is not None and Path(evaluation_dir).is_dir():
        body.append(evaluation_section(Path(evaluation_dir)))
    elif study_dir is not None:
        body.append("<h2>Evaluation of the winner</h2><p class='note'>not written yet: run 'autoft evaluate "
                    "--task TASK --study STUDY'</p>")
    now = _dt.datetime.now().replace(microsecond=0).isoformat(sep=" ")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width,initial-scale=1'>"
           f"<title>{_e(title)}</title><style>{CSS}{TOKEN_CSS}</style></head><body><main>"
           f"<h1>{_e(title)}</h1><p class='sub'>written by autoft on {_e(now)}</p>"
           + "\n".join(body) + "</main></body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return out


def write_study_report(study_dir: str | Path, *, evaluation_dir: str | Path | None = None, task=None,
                       out: str | Path | None = None) -> Path:
    """``results/<task>/<study>/report.html``: the study's leaderboard, plots and its winner's evaluation
    (``evaluation_dir``, default ``<study_dir>/evaluation``)."""
    study_dir = Path(study_dir)
    ev = Path(evaluation_dir) if evaluation_dir is not None else study_dir / "evaluation"
    name = getattr(task, "name", None) or study_dir.parent.name
    return write_html_report(out or study_dir / REPORT, study_dir=study_dir, evaluation_dir=ev,
                             title=f"{name} · study {study_dir.name}")
