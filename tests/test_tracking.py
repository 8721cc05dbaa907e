"""MLflow tracking on the engine-neutral events, against a real ``mlflow server`` on loopback.

The server (MLflow's own, SQLite backend, artifacts in a temporary folder) is started by the
fixture for this module only and stopped at its end; runs are read back with MLflow's client.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

sys.path.insert(0, str(Path(__file__).parent))
from net import free_port  # noqa: E402

import autoft  # noqa: E402
from autoft.events import Callback  # noqa: E402

FAST = {"epochs": 2, "backbone": "resnet20", "unfreeze": [0, 1]}


@pytest.fixture(scope="module")
def mlflow_server():
    folder = Path(tempfile.mkdtemp(prefix="autoft-mlflow-"))
    port = free_port()
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)  # the server and its uvicorn worker, nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def runs_of(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment '{experiment}'"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


class Recorder(Callback):
    def __init__(self):
        self.seen = []

    def on_search_start(self, e):
        self.seen.append(("search_start", e.engine))

    def on_trial_start(self, e):
        self.seen.append(("trial_start", e.key))

    def on_epoch(self, e):
        self.seen.append(("epoch", e.key, e.epoch))

    def on_trial_end(self, e):
        self.seen.append(("trial_end", e.key, e.state))

    def on_search_end(self, e):
        self.seen.append(("search_end", e.best_number))


def check_tracked(uri: str, experiment: str, study: str, n_trials: int, r, export: bool):
    client, parents, children = runs_of(uri, experiment)
    parents = [p for p in parents if p.data.tags.get("autoft.study") == study]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(mine) == n_trials, [c.info.run_name for c in mine]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["task"] == "digits" and parent.data.params["budget"] == str(n_trials)
    for c in mine:
        assert c.data.params["backbone"] == "resnet20" and "lr" in c.data.params
        assert c.data.tags["autoft.state"] in ("complete", "pruned")
        hist = client.get_metric_history(c.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, int(c.data.metrics["epochs_run"]) + 1))
        assert {"complete": "FINISHED", "pruned": "KILLED"}[c.data.tags["autoft.state"]] == c.info.status
    best = [c for c in mine if c.data.tags.get("autoft.trial") == str(r.best_trial.number)]
    assert len(best) == 1 and best[0].data.metrics["final_score"] == pytest.approx(r.best_value)
    assert parent.data.tags["autoft.best_trial"] == str(r.best_trial.number)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(r.test_metrics["accuracy"])
    results = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert "results/trials.csv" in results and "results/best.yaml" in results
    if export:
        winner = {a.path for a in client.list_artifacts(parent.info.run_id, "winner")}
        assert "winner/manifest.json" in winner and "winner/model.pt" in winner


def test_optuna_search_tracked_in_mlflow(mlflow_server, tmp_path):
    rec = Recorder()
    r = autoft.search("digits", n_trials=3, overrides=FAST, rank=False, results_dir=tmp_path / "results",
                      study_name="tracked-optuna", track=mlflow_server, export=tmp_path / "winner", callbacks=[rec])
    assert r.best_trial is not None and r.export_dir == tmp_path / "winner"
    check_tracked(mlflow_server, "autoft/digits", "tracked-optuna", 3, r, export=True)
    kinds = [s[0] for s in rec.seen]
    assert kinds[0] == "search_start" and kinds[-1] == "search_end"
    assert kinds.count("trial_start") == kinds.count("trial_end") == 3
    epochs = [s for s in rec.seen if s[0] == "epoch"]
    assert len(epochs) == sum(int(t.user_attrs["epochs_run"]) for t in r.study.trials)


def test_ray_search_tracked_in_mlflow(mlflow_server, tmp_path):
    pytest.importorskip("ray")
    rec = Recorder()
    r = autoft.search("digits", n_trials=3, overrides=FAST, rank=False, results_dir=tmp_path / "results",
                      study_name="tracked-ray", backend="ray", max_concurrent=1, track=mlflow_server,
                      callbacks=[rec])
    assert r.best_trial is not None
    check_tracked(mlflow_server, "autoft/digits", "tracked-ray", 3, r, export=False)
    kinds = [s[0] for s in rec.seen]
    assert kinds[0] == "search_start" and kinds[-1] == "search_end" and kinds.count("trial_end") == 3
    assert ("search_start", "ray") in rec.seen
