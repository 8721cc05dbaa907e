"""``autoft export`` and ``autoft predict`` (registered by :func:`autoft.cli.main` via ``add_parser``).

``predict`` uses only the exported folder and :mod:`autoft.export.runtime` (no training code).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from autoft.export.runtime import BACKENDS, MODEL_FORMATS


def add_parser(subparsers) -> None:
    e = subparsers.add_parser(
        "export", help="refit the best (or a chosen) trial and write a self-contained model folder",
        description="Refit a trial of a study with its exact configuration and seed, score it once on the test "
                    "split, and write config, classes, preprocessing, metrics, the model (torch.export .pt2, ONNX, "
                    "TorchScript (legacy) and a state_dict), a model card and a sha256 manifest to --out.")
    e.add_argument("--task", required=True, help="task name (tasks/NAME.yaml or built-in) or path")
    e.add_argument("--study", "--study-name", dest="study_name", default="default",
                   help="study name (default: default)")
    e.add_argument("--trial", type=int, help="trial number to export (default: the best completed trial)")
    e.add_argument("--out", required=True, help="folder to write (replaced if it holds a previous export)")
    e.add_argument("--train-val", action="store_true",
                   help="refit on train + validation (default: train only, as in the search)")
    e.add_argument("--results-dir", default="results", help="where the search wrote results (default: ./results)")
    e.add_argument("--storage", help="Optuna storage URL (default: sqlite under <results-dir>/<task>/)")
    e.add_argument("--formats", default=",".join(MODEL_FORMATS),
                   help=f"comma-separated model formats: {', '.join(MODEL_FORMATS)} (default: all). torchscript is "
                        "legacy; it is also written when torch.export cannot capture the model (pt2 -> torchscript)")
    e.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "predict", help="predict classes with an exported model folder",
        description="Predict with an exported folder only (no study, no task file). Inputs: image files, folders "
                    "of images, .npy arrays (images) or CSV/TSV files of texts (text models).")
    p.add_argument("--model", required=True, help="exported folder (from 'autoft export')")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, .npy file, or CSV/TSV of texts")
    p.add_argument("--text-column", default="text", help="column of the texts in CSV/TSV inputs (default: text)")
    p.add_argument("--label-column", help="CSV/TSV column of true labels: also report accuracy")
    p.add_argument("--folder-labels", action="store_true",
                   help="images: the name of each image's folder is its true label; also report accuracy")
    p.add_argument("--backend", choices=list(BACKENDS), default="auto",
                   help="auto = the first the folder holds of " + ", ".join(MODEL_FORMATS)
                        + " (onnx needs onnxruntime; torchscript is legacy)")
    p.add_argument("--batch-size", type=int, help="inputs per forward pass (default: 256 images / 64 texts)")
    p.add_argument("--out", help="write a CSV (input, prediction, probability, p_<class>...) instead of a table")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in the table (default 50)")
    p.set_defaults(func=cmd_predict)


def _console():
    from autoft.console import make_console

    return make_console()


def cmd_export(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from autoft.export.export import export_trial

    console = _console()
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    console.print(f"[bold]autoft export[/] task [cyan]{args.task}[/] · study '{args.study_name}' · "
                  + (f"trial #{args.trial}" if args.trial is not None else "best trial")
                  + f" · refit on {'train + validation' if args.train_val else 'train'}")
    res = export_trial(args.task, args.out, study=args.study_name, trial=args.trial, train_val=args.train_val,
                       results_dir=args.results_dir, storage=args.storage, formats=formats)
    cfg = res.config
    console.print(f"trial #{res.trial}: {cfg['backbone']} · unfreeze {cfg['unfreeze']} · head {cfg['head']} · "
                  f"{cfg['epochs']} epochs · seed {cfg['seed']}")
    val = f"{res.validation_score:.4f}" if res.validation_score is not None else "-"
    test = res.test_metrics.get(res.metric)
    acc = res.test_metrics.get("accuracy", float("nan"))
    extra = "" if res.metric == "accuracy" else f" · test accuracy {acc:.4f}"
    test = "-" if test is None else f"{test:.4f}"
    console.print(f"validation {res.metric} (search) {val} · test {res.metric} (refit) [bold]{test}[/]{extra}")
    v = res.verification
    checks = [f"{k.removesuffix('_max_abs_diff').replace('_', ' ')} {val:.2g}" for k, val in v.items()
              if k.endswith("_max_abs_diff") and val is not None]
    console.print(f"checked against PyTorch on {v.get('examples')} test examples (max |Δlogit|): " + ", ".join(checks))
    info = res.info or {}
    secs = info.get("export_seconds") or {}
    console.print("model formats: " + ", ".join(
        f"{f}" + (" (legacy)" if f in info.get("legacy_formats", []) else "")
        + (f" via the {info.get('onnx_exporter')} exporter" if f == "onnx" else "")
        + (f" {secs[f]:.1f}s" if f in secs else "") for f in info.get("formats", [])), markup=False)
    for note in info.get("fallbacks") or []:
        console.print(f"[yellow]fallback[/]: {escape(note)}")
    console.print(f"wrote {res.folder} ({len(res.files)} files, {res.seconds:.1f}s): {', '.join(res.files)}")
    return 0


def _gather(model, args, skipped: list | None = None) -> tuple[list, list[str], list[str] | None]:
    """Inputs of the command line → (items for the model, display names, true labels or None).
    Unreadable files in folders are skipped and appended to ``skipped`` as (file, reason)."""
    from autoft.errors import ExportError
    from autoft.export.runtime import read_table

    items, names, labels = [], [], []
    want_labels = bool(args.label_column or args.folder_labels)
    for raw in args.inputs:
        p = Path(raw)
        if model.modality == "text":
            if p.suffix.lower() in (".csv", ".tsv", ".tab", ".txt") and p.is_file():
                cols = [args.text_column] + ([args.label_column] if args.label_column else [])
                table = read_table(p, cols)
                texts = table[args.text_column]
                items += texts
                names += [t if len(t) <= 60 else t[:57] + "..." for t in texts]
                if args.label_column:
                    labels += [s.strip() for s in table[args.label_column]]
            elif p.suffix.lower() in (".csv", ".tsv", ".tab") and not p.exists():
                raise ExportError(f"text file {p} does not exist")
            else:  # a literal text on the command line
                items.append(raw)
                names.append(raw if len(raw) <= 60 else raw[:57] + "...")
                labels.append(None)
            continue
        got, got_names = model.expand_inputs([raw], skipped)
        items += got
        names += got_names
        if args.folder_labels:
            labels += [Path(n).parent.name if not n.endswith("]") else None for n in got_names]
    if not items:
        raise ExportError("no inputs to predict (empty files or folders)")
    return items, names, (labels if want_labels else None)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from autoft.export.runtime import load_exported

    console = _console()
    model = load_exported(args.model, args.backend)
    skipped: list[tuple[str, str]] = []
    items, names, labels = _gather(model, args, skipped)
    preds = model.predict_items(items, names, args.batch_size)
    rows = preds.to_rows()
    if labels is not None:
        for row, lab in zip(rows, labels):
            row["label"] = lab
    acc_line = None
    if labels is not None:
        known = [(r["prediction"], r["label"]) for r in rows if r.get("label") is not None]
        unknown = sorted({lab for _, lab in known} - set(model.classes))
        if known:
            acc = float(np.mean([p == t for p, t in known]))
            acc_line = f"accuracy {acc:.4f} ({sum(p == t for p, t in known)}/{len(known)} labelled inputs)"
            if unknown:
                acc_line += f"; labels not among the model's classes: {', '.join(unknown[:5])}"
    if args.out:
        import csv

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        console.print(f"wrote {len(rows)} predictions to {out} (backend {model.backend})")
    else:
        from rich.table import Table

        table = Table(title=f"{args.model} · {model.info.get('architecture')} · backend {model.backend}")
        show = model.classes if len(model.classes) <= 6 else []
        for c in ["input", "prediction", "probability", *[f"p_{c}" for c in show]] + (["label"] if labels else []):
            table.add_column(c, justify="left" if c in ("input", "prediction", "label") else "right")
        for r in rows[: args.max_rows]:
            table.add_row(r["input"], r["prediction"], f"{r['probability']:.4f}",
                          *[f"{r[f'p_{c}']:.4f}" for c in show], *([str(r.get("label"))] if labels else []))
        console.print(table)
        if len(rows) > args.max_rows:
            console.print(f"... {len(rows) - args.max_rows} more rows (use --out FILE.csv for all)")
    if acc_line:
        console.print(acc_line)
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable file(s): " + ", ".join(f for f, _ in skipped[:10])
                      + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""), markup=False)
    return 0
