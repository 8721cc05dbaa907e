"""The Ray Tune backend against a real Ray cluster started on loopback for this test only.

The cluster runs with token authentication (RAY_AUTH_MODE=token and one random RAY_AUTH_TOKEN for
the head and for the ``autoft`` client, nothing written to ~/.ray).  Teardown never calls
``ray stop`` (it would stop every Ray cluster of the user): it ends exactly the processes of the
head node this test started, found by its private temporary directory, and their children.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


sys.path.insert(0, str(Path(__file__).parent))
from net import free_ports  # noqa: E402


def cluster_processes(temp_dir: str) -> list:
    """Processes of the head node rooted in ``temp_dir`` (GCS, raylet, agents, monitors) and their children."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(temp_dir: str) -> None:
    procs = cluster_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster (2 CPUs) on 127.0.0.1: yields (address, env for clients)."""
    if shutil.which("ray") is None:
        pytest.skip("the 'ray' command is not installed")
    temp_dir = tempfile.mkdtemp(prefix="aftray", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        for attempt in range(3):
            # distinct ports for every component; a port taken by another process between choosing it
            # and Ray binding it fails `ray start`, so try again with fresh ones
            port, *other = free_ports(7)
            cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                   "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
                   *(f"--{name}={p}" for name, p in zip(
                       ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"], other))]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                break
            stop_cluster(temp_dir)
            port_clash = re.search(r"used by other components|already in use", out.stdout + out.stderr, re.I)
            if not port_clash or attempt == 2:
                pytest.fail(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        assert cluster_processes(temp_dir), "ray start reported success but no process of the head node runs"
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(temp_dir)
        left = cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still run: {[p.pid for p in left]}"


def autoft(args: list[str], env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "autoft.cli", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"autoft {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n" \
                                f"{res.stderr[-6000:]}"
    return res


def test_ray_sweep_through_address(ray_cluster, tmp_path):
    address, env = ray_cluster
    env = {**env, "AUTOFT_STATE_DIR": str(tmp_path / "state")}  # where the Tune experiment is kept
    results = tmp_path / "results"
    args = ["search", "--task", "digits", "--backend", "ray", "--address", address, "--n-trials", "6",
            "--results-dir", str(results), "--set", "epochs=3", "--set", "unfreeze=[0, 1]",
            "--backbones", "resnet20", "--max-concurrent", "2", "--no-final-check"]
    t0 = time.perf_counter()
    autoft(args, env, tmp_path)
    took = time.perf_counter() - t0

    study_dir = results / "digits" / "default"
    df = pd.read_csv(study_dir / "trials.csv")
    assert len(df) == 6, df
    assert set(df.state) <= {"complete", "pruned"}, df[["number", "state", "fail_reason"]]
    done, pruned = df[df.state == "complete"], df[df.state == "pruned"]
    assert len(done) >= 1 and len(pruned) >= 1, f"expected ASHA to stop some trials:\n{df[['state', 'epochs_run']]}"
    assert (done.epochs_run == 3).all() and (pruned.epochs_run < 3).all()
    assert done.score.between(0, 1).all() and done.score.max() > 0.5
    assert (df.backbone == "resnet20").all() and set(df.unfreeze) <= {0, 1}
    # the sweep starts with the search space's first trial (its lr and batch; unfreeze is fixed by --set)
    from autoft.space import load_space
    from autoft.task import BUILTIN_SPACES

    recipe = load_space(BUILTIN_SPACES / "cifar_resnets.yaml").first_trials[0]
    recipe_rows = df[(df.cfg_lr == recipe["lr"]) & (df.cfg_batch_size == recipe["batch_size"])]
    assert len(recipe_rows) == 1, df[["number", "cfg_lr", "cfg_batch_size"]]
    assert list(df.origin[df.origin != "sampler"]) == ["first trial"] and recipe_rows.origin.iloc[0] == "first trial"
    # two trials start together (--max-concurrent 2): it is one of them
    assert recipe_rows.datetime_start.iloc[0] <= sorted(df.datetime_start)[1], df[["number", "datetime_start"]]
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert best["validation_score"] == pytest.approx(done.score.max())
    assert best["config"]["backbone"] == "resnet20" and best["config"]["epochs"] == 3
    # the Tune experiment (pickles, for Tuner.restore) is kept in autoft's state folder, not in the results
    assert not (study_dir / "ray").exists()
    kept = list((tmp_path / "state" / "ray").glob("*/tune"))
    assert len(kept) == 1 and (kept[0] / "tuner.pkl").is_file(), kept

    # the same command again restores the finished experiment and adds nothing
    t1 = time.perf_counter()
    autoft(args, env, tmp_path)
    print(f"restore of the finished sweep: {time.perf_counter() - t1:.1f}s")
    again = pd.read_csv(study_dir / "trials.csv")
    assert len(again) == 6 and list(again.state) == list(df.state)
    # `show` works on the converted study as on an Optuna one
    shown = autoft(["show", "--task", "digits", "--results-dir", str(results)], env, tmp_path)
    assert "6 trials" in shown.stdout
    print(f"ray sweep of 6 trials through {address}: {took:.1f}s")


# -- security: what the Ray engine trusts ------------------------------------------------------------
def _request(results: Path, study: str = "default"):
    from autoft.engines.base import SearchRequest
    from autoft.task import load_task

    return SearchRequest(task=load_task("digits"), space=None, study_name=study, results_dir=results)


def test_ray_experiment_state_is_not_read_from_the_results_folder(tmp_path, monkeypatch):
    """Tuner.restore unpickles the experiment: it is kept where only autoft writes, keyed by the study folder."""
    from autoft.engines.ray_engine import experiment_path

    monkeypatch.setenv("AUTOFT_STATE_DIR", str(tmp_path / "state"))
    results = tmp_path / "results"
    path = experiment_path(_request(results))
    assert not path.resolve().is_relative_to(results.resolve())
    assert path.is_relative_to((tmp_path / "state").resolve())
    assert experiment_path(_request(results)) == path  # the same study finds its experiment again
    assert experiment_path(_request(tmp_path / "other")) != path  # another results folder does not
    assert experiment_path(_request(results, "s2")) != path


def test_an_experiment_inside_a_results_folder_is_not_restored(tmp_path, monkeypatch):
    """A Tune experiment found in the results folder (earlier versions kept it there; or a folder from
    elsewhere) is never restored: the search stops and says how to trust it, before Ray starts."""
    from autoft.engines.ray_engine import experiment_path, run_ray, untrusted_experiment
    from autoft.errors import ConfigError

    monkeypatch.setenv("AUTOFT_STATE_DIR", str(tmp_path / "state"))
    req = _request(tmp_path / "results")
    legacy = req.study_dir / "ray" / "tune"
    legacy.mkdir(parents=True)
    (legacy / "tuner.pkl").write_bytes(b"not for us")
    assert untrusted_experiment(req) == legacy
    with pytest.raises(ConfigError) as err:
        run_ray(req)
    msg = str(err.value)
    assert "not resumed" in msg and str(legacy) in msg and str(experiment_path(req)) in msg


def _fake_ray(monkeypatch) -> list:
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize("mode, warned", [(None, True), ("disabled", True), ("token", False)])
def test_joining_a_cluster_without_token_authentication_warns(mode, warned, monkeypatch, caplog, tmp_path):
    from autoft.engines.ray_engine import _init_ray

    calls = _fake_ray(monkeypatch)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if mode:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    caplog.set_level("WARNING")
    assert _init_ray("10.0.0.7:6379", _request(tmp_path)) is True
    assert calls and calls[0]["address"] == "10.0.0.7:6379"
    assert ("RAY_AUTH_MODE=token" in caplog.text) is warned, caplog.text


def test_a_local_ray_needs_no_token_warning(monkeypatch, caplog, tmp_path):
    from autoft.engines.ray_engine import _init_ray

    _fake_ray(monkeypatch)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    caplog.set_level("WARNING")
    _init_ray(None, _request(tmp_path))
    assert "RAY_AUTH_MODE" not in caplog.text
