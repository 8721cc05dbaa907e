"""MLflow tracking of a search: a parent run per study, a nested run per trial.

What is logged (through ``mlflow.MlflowClient`` with explicit run ids, so trials running in threads
or reported by Ray's driver never share MLflow's "active run"):

* parent run (named after the study, in the experiment named after the task): the task, engine,
  budget, metric and backbones as parameters; at the end the winner's number, validation score and
  configuration, the winner's test metrics (``test_<metric>``), the backbone ranking (``logme_<backbone>``
  metrics and ``ranking.json``), the result files (``results/``) and the exported winner (``winner/``);
* one nested run per trial (tag ``mlflow.parentRunId``): the configuration as parameters, the
  validation metrics per epoch (``val_<metric>``, step = epoch), the final state as a tag and the run
  status (FINISHED for complete, KILLED for pruned, FAILED for failed trials).

``uri`` is any MLflow tracking URI: ``http://host:port`` of an ``mlflow server``, or a local
``sqlite:///mlflow.db``. Nothing here runs unless a search is given a tracking URI.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
from pathlib import Path

from autoft.errors import ConfigError
from autoft.events import Callback, EpochReported, SearchEnded, SearchStarted, TrialEnded, TrialStarted
from autoft.study.storage import redact_url

log = logging.getLogger(__name__)

STATUS = {"complete": "FINISHED", "pruned": "KILLED", "fail": "FAILED"}
TAG_STUDY = "autoft.study"
TAG_TRIAL = "autoft.trial"


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError("tracking needs MLflow: pip install 'autoft[track]' (or pip install mlflow)",
                          field="track") from None
    return MlflowClient(tracking_uri=uri)


def _param(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)
    return s[:6000]  # MLflow's limit for a parameter value


def _finite(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class MlflowTracker(Callback):
    """An :class:`autoft.events.Callback` that mirrors a search into MLflow."""

    def __init__(self, uri: str, experiment: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.client = _client(uri)
        self.parent: str | None = None
        self.experiment_id: str | None = None
        self.runs: dict[str, str] = {}  # trial key → MLflow run id
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MlflowTracker({redact_url(self.uri)!r})"

    # -- events -------------------------------------------------------------------------------
    def on_search_start(self, e: SearchStarted) -> None:
        name = self.experiment or f"autoft/{e.task}"
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(self.experiment_id, run_name=e.study,
                                     tags={TAG_STUDY: e.study, "autoft.task": e.task, "autoft.engine": e.engine})
        self.parent = run.info.run_id
        self._params(self.parent, {"task": e.task, "study": e.study, "engine": e.engine, "budget": e.budget,
                                   "metric": e.metric, "direction": e.direction, "storage": e.storage,
                                   "backbones": list(e.backbones), "device": e.device, "resumed_trials": e.resumed})
        log.info("tracking study '%s' in MLflow at %s (experiment '%s', run %s)", e.study, redact_url(self.uri),
                 name, self.parent)

    def on_trial_start(self, e: TrialStarted) -> None:
        self._trial_run(e.key, e.config, e.origin)

    def on_epoch(self, e: EpochReported) -> None:
        run = self._trial_run(e.key)
        if run is None:
            return
        vals = {f"val_{k}": v for k, v in _finite(e.metrics).items()}
        vals.update({"score": v for v in _finite({"score": e.value}).values()})
        self._metrics(run, vals, step=int(e.epoch))

    def on_trial_end(self, e: TrialEnded) -> None:
        run = self._trial_run(e.key, e.config)
        if run is None:
            return
        tags = {"autoft.state": e.state}
        if e.number is not None:
            tags[TAG_TRIAL] = str(e.number)
        if e.fail_reason:
            tags["autoft.fail_reason"] = e.fail_reason[:5000]
        for k, v in tags.items():
            self.client.set_tag(run, k, v)
        final = {"epochs_run": float(e.epochs)}
        if e.seconds is not None:
            final["seconds"] = float(e.seconds)
        if e.value is not None and math.isfinite(float(e.value)):
            final["final_score"] = float(e.value)
        self._metrics(run, final)
        self.client.set_terminated(run, status=STATUS.get(e.state, "FINISHED"))

    def on_search_end(self, e: SearchEnded) -> None:
        if self.parent is None:
            return
        run = self.parent
        # trials that never ended (interrupted search) are closed so that the UI shows them as such
        for key, rid in list(self.runs.items()):
            info = self.client.get_run(rid).info
            if info.status == "RUNNING":
                self.client.set_terminated(rid, status="KILLED")
        if e.best_number is not None:
            self.client.set_tag(run, "autoft.best_trial", str(e.best_number))
            self._metrics(run, {"best_val_score": e.best_value} if e.best_value is not None else {})
            self._params(run, {f"best.{k}": v for k, v in (e.best_config or {}).items()})
        if e.test_metrics:
            self._metrics(run, {f"test_{k}": v for k, v in _finite(e.test_metrics).items()})
        for k, v in e.counts.items():
            self._metrics(run, {f"trials_{k}": float(v)})
        if e.ranking:
            self._metrics(run, {f"logme_{r['backbone']}": r.get("logme") for r in e.ranking
                                if r.get("backbone") and r.get("logme") is not None})
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "ranking.json"
                p.write_text(json.dumps(list(e.ranking), indent=2, default=str))
                self.client.log_artifact(run, str(p))
        for f in e.files:
            f = Path(f)
            if f.is_file():
                self.client.log_artifact(run, str(f), "results")
            elif f.is_dir():
                self.client.log_artifacts(run, str(f), f"results/{f.name}")
        if e.export_dir is not None and Path(e.export_dir).is_dir():
            self.client.log_artifacts(run, str(e.export_dir), "winner")
        self.client.set_terminated(run, status="KILLED" if e.interrupted else "FINISHED")

    # -- helpers --------------------------------------------------------------------------------
    def _trial_run(self, key: str, config: dict | None = None, origin: str | None = None) -> str | None:
        if self.parent is None:
            return None
        with self._lock:
            run = self.runs.get(str(key))
            if run is None:
                tags = {"mlflow.parentRunId": self.parent, TAG_TRIAL: str(key)}
                if origin:
                    tags["autoft.origin"] = origin
                run = self.client.create_run(self.experiment_id, run_name=f"trial {key}", tags=tags).info.run_id
                self.runs[str(key)] = run
                fresh = True
            else:
                fresh = False
        if config and fresh:
            self._params(run, config)
        return run

    def _params(self, run: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run, params=items[i:i + 100])

    def _metrics(self, run: str, metrics: dict, step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run, metrics=items[i:i + 1000])
