"""Experiment tracking on the engine-neutral events (:mod:`autoft.events`): MLflow today."""
from __future__ import annotations


def make_tracker(uri: str | None, experiment: str | None = None):
    """The tracker for ``uri`` (``--track URI`` or the task's ``track`` key), or None."""
    if not uri:
        return None
    from autoft.tracking.mlflow import MlflowTracker

    return MlflowTracker(uri, experiment=experiment)
