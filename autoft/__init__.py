"""autoft: which pretrained backbone to fine-tune, how, and how good it gets.

Layout: ``zoo`` (backbones), ``data`` (datasets and splits), ``core`` (fine-tune-then-score),
``engines`` (Optuna, Ray Tune), ``results`` (tables, plots), ``export`` (production artifacts),
``cli`` (the ``autoft`` command).
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # keep ``import autoft`` light: load on first use
    if name == "fine_tune_and_score":
        from autoft.core import fine_tune_and_score
        return fine_tune_and_score
    if name == "load_exported":
        from autoft.export.runtime import load_exported
        return load_exported
    raise AttributeError(f"module 'autoft' has no attribute {name!r}")
