"""Many ``autoft worker`` processes on one study: a real PostgreSQL server (RDB storage with heartbeats)
and a journal file.

PostgreSQL comes from the Debian package (``bash .ci/postgres.sh`` installs it); the fixture starts a
throw-away server on 127.0.0.1 (tests/pg.py), or uses ``AUTOFT_TEST_PG_URL`` when set.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).parent))
from pg import PostgresServer, find_bin_dir  # noqa: E402

from autoft.engines.optuna_engine import (ATTR_RETRY_OF, ATTR_WORKER, RetryStaleTrial, counted_trials,  # noqa: E402
                                          make_storage, postgres_driver)

SEARCH = ["--task", "digits", "--backbones", "resnet20", "--set", "epochs=2", "--threads", "1"]


@pytest.fixture(scope="module")
def pg_url():
    if os.environ.get("AUTOFT_TEST_PG_URL"):
        yield os.environ["AUTOFT_TEST_PG_URL"]
        return
    if find_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed: run 'bash .ci/postgres.sh' (apt package postgresql)")
    pytest.importorskip("psycopg2")
    with PostgresServer() as srv:
        yield srv.url


def start_worker(storage: str, study: str, n_trials: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autoft.cli", "worker", *SEARCH, "--storage", storage, "--study-name", study,
           "--n-trials", str(n_trials), *extra]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"worker {p.pid} did not finish in {timeout}s:\n{log.read_text()[-3000:]}")
        assert rc == 0, f"worker {p.pid} exited with {rc}:\n{log.read_text()[-4000:]}"


def check_budget(study: optuna.Study, budget: int) -> list:
    """Exactly ``budget`` trials count, each ran once with a config, nothing is left running or queued."""
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    counted = counted_trials(study)
    assert len(counted) == budget, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.user_attrs.get("config") for t in counted), "a counted trial has no config"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return counted


def test_three_workers_on_postgres(pg_url, tmp_path):
    """3 workers share a PostgreSQL study; one is killed mid-trial: its trial is marked failed (heartbeat or recovery),
    the trial is retried with the same configuration, and the study ends with exactly the budget."""
    study_name, budget = f"w3-{uuid.uuid4().hex[:8]}", 6
    extra = ["--set", "unfreeze=[1, 2]", "--results-dir", str(tmp_path / "results"), "--report"]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    # the test's view of the storage (created first: it also creates the schema).  Its grace period (20 s) is
    # longer than the workers' heartbeat interval (10 s): only a dead worker's trial goes stale, and failing
    # it runs the retry callback the workers configure too
    storage = optuna.storages.RDBStorage(
        postgres_driver(pg_url), heartbeat_interval=10, grace_period=20,
        heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=1))
    t0 = time.perf_counter()
    procs = [start_worker(pg_url, study_name, budget, extra, log) for log in logs]

    # kill worker 0 while it runs a trial
    victim, killed = procs[0], None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # killed once its configuration is sampled (user attr "config"): it is training
            if str(t.user_attrs.get(ATTR_WORKER, "")).endswith(f":{victim.pid}") and t.user_attrs.get("config"):
                os.kill(victim.pid, signal.SIGKILL)
                killed = t
                break
        assert victim.poll() is None or killed is not None, f"worker 0 ended early:\n{logs[0].read_text()}"
    assert killed is not None, "worker 0 never started a trial"
    victim.wait()

    deadline = time.time() + 90
    while study._storage.get_trial(killed._trial_id).state == TrialState.RUNNING and time.time() < deadline:
        time.sleep(1)
        optuna.storages.fail_stale_trials(study)
    assert study._storage.get_trial(killed._trial_id).state == TrialState.FAIL

    wait_all(procs[1:], logs[1:])
    study = optuna.load_study(study_name=study_name, storage=make_storage(pg_url))
    if len(counted_trials(study)) < budget:
        # the others stopped before the retry was queued: a worker started now runs it
        log = tmp_path / "worker3.log"
        wait_all([start_worker(pg_url, study_name, budget, extra, log)], [log])
    took = time.perf_counter() - t0
    counted = check_budget(study, budget)
    # the retry is queued by whoever fails the stale trial first: a heartbeat check (Optuna's retry
    # callback marks it with the system attr "failed_trial") or a worker's own recovery on start (user
    # attr "retry_of"); exactly one of them may queue it
    trials = study.get_trials(deepcopy=False)
    retries = [t for t in trials if killed.number in (t.system_attrs.get("failed_trial"), t.user_attrs.get(ATTR_RETRY_OF))]
    seen = [(t.number, t.state.name, t.system_attrs.get("failed_trial"), t.user_attrs.get(ATTR_RETRY_OF),
             t.user_attrs.get(ATTR_WORKER)) for t in trials]
    assert len(retries) == 1, f"trial {killed.number} was killed; trials (number, state, failed_trial, retry_of, worker): {seen}"
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED), seen
    failed = study._storage.get_trial(killed._trial_id)
    assert failed.state == TrialState.FAIL and failed.params
    assert retries[0].params == failed.params  # the same configuration ran again
    workers = {t.user_attrs.get(ATTR_WORKER) for t in counted}
    assert len(workers) >= 2, workers

    # results written by the last worker, and the best trial exported
    study_dir = tmp_path / "results" / "digits" / study_name
    df = pd.read_csv(study_dir / "trials.csv")
    assert (df.state != "running").all() and len(df[df.state != "fail"]) == budget
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "autoft.cli", "export", "--task", "digits", "--study-name",
                          study_name, "--storage", pg_url, "--out", str(out), "--formats", "torchscript"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "model.ts").is_file() and (out / "config.yaml").is_file(), sorted(p.name for p in out.iterdir())
    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported == study.best_trial.user_attrs["config"]  # the best trial is what was exported
    print(f"3 workers (+ a finisher if needed) on PostgreSQL: {budget} trials in {took:.1f}s, "
          f"workers {sorted(workers)}")


def test_two_workers_on_a_journal_file(tmp_path):
    study_name, budget = "journal", 5
    storage = f"journal:{tmp_path / 'study.log'}"
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [start_worker(storage, study_name, budget, ["--set", "unfreeze=[0, 1]"], log) for log in logs]
    wait_all(procs, logs)
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    counted = check_budget(study, budget)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
