"""autoft: which pretrained backbone to fine-tune, how, and how good it gets.

``autoft.search(task, **options)`` runs what ``autoft search`` runs (search, final check on the test
split, report files) and returns a :class:`~autoft.api.SearchResult`.

Layout: ``zoo`` (backbones), ``data`` (datasets and splits), ``core`` (fine-tune-then-score),
``study`` (the system of record: trial record, budget, storage), ``engines`` (Optuna, Ray Tune:
adapters of one contract), ``events`` (callbacks), ``tracking`` (MLflow), ``results`` (tables,
plots), ``export`` (production artifacts), ``api`` (the use case), ``cli`` (the ``autoft`` command).
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # keep ``import autoft`` light: load on first use
    if name == "fine_tune_and_score":
        from autoft.core import fine_tune_and_score
        return fine_tune_and_score
    if name == "search":
        from autoft.api import search
        return search
    if name in ("SearchResult", "NoTrialCompleted"):
        from autoft import api
        return getattr(api, name)
    if name == "Callback":
        from autoft.events import Callback
        return Callback
    if name == "load_exported":
        from autoft.export.runtime import load_exported
        return load_exported
    raise AttributeError(f"module 'autoft' has no attribute {name!r}")
