"""Reliability: SIGKILL and Ctrl-C mid-trial, concurrent workers on one SQLite file, bad trials."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd

from autoft.cli import main
from autoft.engines.optuna_engine import ATTR_RETRY_OF, count_finished

optuna.logging.set_verbosity(optuna.logging.WARNING)
ARGS = ["--task", "digits", "--backbones", "resnet20", "--set", "unfreeze=2", "--set", "epochs=3",
        "--pruner", "none", "--no-final-check"]


def _autoft(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoft.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _states(db: Path) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("select number, state from trials order by number").fetchall()
    except sqlite3.OperationalError:
        return []


def _wait_until(pred, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _study(results: Path) -> optuna.Study:
    return optuna.load_study(study_name="default", storage=f"sqlite:///{results / 'digits' / 'optuna.db'}")


def _kill_mid_trial(results: Path, sig: int, n_complete: int, budget: int) -> subprocess.Popen:
    db = results / "digits" / "optuna.db"
    p = _autoft(["search", *ARGS, "--results-dir", str(results), "--n-trials", str(budget)])
    _wait_until(lambda: sum(s == "COMPLETE" for _, s in _states(db)) >= n_complete
                and any(s == "RUNNING" for _, s in _states(db)))
    time.sleep(0.5)  # well inside the running trial
    p.send_signal(sig)
    p.wait(timeout=120)
    return p


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    p = _kill_mid_trial(tmp_path, signal.SIGKILL, n_complete=2, budget=4)
    assert p.returncode == -signal.SIGKILL
    before = {t.number: (t.state.name, t.value, t.params) for t in _study(tmp_path).trials}
    killed = [n for n, (s, _, _) in before.items() if s == "RUNNING"]
    assert len(killed) == 1
    # the same command again
    p2 = _autoft(["search", *ARGS, "--results-dir", str(tmp_path), "--n-trials", "4"])
    out, err = p2.communicate(timeout=600)
    assert p2.returncode == 0, err
    study = _study(tmp_path)
    after = {t.number: t for t in study.trials}
    for n, (state, value, _) in before.items():  # every finished trial is kept as it was
        if state == "COMPLETE":
            assert after[n].state.name == "COMPLETE" and after[n].value == value
    dead = after[killed[0]]
    assert dead.state.name == "FAIL" and "WorkerDied" in dead.user_attrs["fail_reason"]
    retries = [t for t in study.trials if t.user_attrs.get(ATTR_RETRY_OF) == killed[0]]
    assert len(retries) == 1 and retries[0].params == before[killed[0]][2]  # same configuration again
    assert retries[0].state.name == "COMPLETE"
    assert count_finished(study) == 4  # exactly the budget
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    df = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert df.fail_reason.fillna("").str.contains("WorkerDied").sum() == 1
    assert list(df.origin[df.number == retries[0].number]) == [f"retry of #{killed[0]}"]


def test_ctrl_c_is_graceful_and_resumable(tmp_path):
    p = _kill_mid_trial(tmp_path, signal.SIGINT, n_complete=1, budget=3)
    err = p.stderr.read()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    df = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")  # results written on the way out
    interrupted = df[df.fail_reason.fillna("").str.contains("Interrupted")]
    assert len(interrupted) == 1 and (df.state == "complete").sum() >= 1
    assert main(["search", *ARGS, "--results-dir", str(tmp_path), "--n-trials", "3"]) == 0
    study = _study(tmp_path)
    assert count_finished(study) == 3
    assert any(t.user_attrs.get(ATTR_RETRY_OF) == int(interrupted.number.iloc[0]) for t in study.trials)


def test_four_processes_share_one_sqlite_study(tmp_path):
    budget = 8
    procs = [_autoft(["search", *ARGS, "--set", "unfreeze=0", "--set", "epochs=2", "--results-dir", str(tmp_path),
                      "--n-trials", str(budget)], env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "database is locked" not in err + out
    study = _study(tmp_path)
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert len(counted) == budget == count_finished(study)  # none lost, none extra
    assert all(t.state.name == "COMPLETE" for t in counted)
    assert len({t.number for t in counted}) == budget
    df = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert len(df) == budget


def test_every_trial_failing_names_the_most_common_reason(tmp_path, capsys):
    code = main(["search", "--task", "digits", "--backbones", "resnet20", "--set", "epochs=1", "--set", "unfreeze=0",
                 "--set", "optimizer=sgd", "--set", "lr=1e6", "--n-trials", "2", "--results-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "every trial" in err and "loss became" in err
    df = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert (df.state == "fail").all() and df.fail_reason.str.contains("TrialFailed").all()


def test_unloadable_backbone_fails_that_trial_only(tmp_path, monkeypatch):
    """A backbone whose weights cannot be loaded fails its trials; the others complete."""
    empty = tmp_path / "home"
    (empty / "weights").mkdir(parents=True)
    real = Path(os.environ["AUTOFT_HOME"]) / "weights" / "resnet20-12fca82f.th"
    (empty / "weights" / real.name).symlink_to(real)  # resnet32's weights are missing
    monkeypatch.setenv("AUTOFT_HOME", str(empty))
    monkeypatch.setenv("AUTOFT_OFFLINE", "1")
    from autoft.engines.base import build_request
    from autoft.engines.optuna_engine import run_study
    from autoft.task import load_task

    task = load_task("digits")
    req = build_request(task, overrides={"backbone": ["resnet20", "resnet32"], "epochs": 1, "unfreeze": 0},
                        results_dir=tmp_path / "r", n_trials=4)
    study = optuna.create_study(study_name="default", storage=req.storage_url, direction="maximize")
    for b in ("resnet32", "resnet20", "resnet32", "resnet20"):
        study.enqueue_trial({"backbone": b})
    study = run_study(req)
    by = {t.params["backbone"]: t for t in study.trials}
    assert by["resnet32"].state.name == "FAIL" and "WeightsError" in by["resnet32"].user_attrs["fail_reason"]
    assert "resnet32-d509ac18.th" in by["resnet32"].user_attrs["fail_reason"]
    assert by["resnet20"].state.name == "COMPLETE"


def test_heartbeat_retry_is_not_taken_for_an_orphan_of_the_dead_worker(tmp_path):
    """A heartbeat retry must not carry the dead worker's id: a worker starting while another one picks
    the retry up (RUNNING, before it records itself) would otherwise fail it as the dead worker's."""
    from autoft.engines.optuna_engine import ATTR_WORKER, make_storage, recover_interrupted

    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.set_user_attr(ATTR_WORKER, f"{__import__('socket').gethostname()}:{dead.pid}")
    trial.set_user_attr("config", {"lr": trial.params["lr"]})
    storage.heartbeat_interval, storage.grace_period = 1, 1  # stale after 1 s
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    retry = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == trial.number
    assert ATTR_WORKER not in retry[0].user_attrs and retry[0].params == trial.params
    # picked up by a worker (RUNNING) that has not recorded itself yet: a starting worker leaves it alone
    picked = study.ask()
    assert picked.number == retry[0].number
    assert recover_interrupted(study) == []
    assert study._storage.get_trial(picked._trial_id).state == optuna.trial.TrialState.RUNNING


def test_budget_taken_by_another_process_is_not_a_failure(tmp_path, capsys):
    """Two searches started together on a new study: the one that finds the budget held by the other's
    running trial says so and exits 0 (nothing failed)."""
    (tmp_path / "digits").mkdir()
    study = optuna.create_study(study_name="default", storage=f"sqlite:///{tmp_path / 'digits' / 'optuna.db'}",
                                direction="maximize")
    other = study.ask()  # the other process's trial, running on another machine
    other.set_user_attr("worker", "another-host:4242")
    code = main(["search", *ARGS, "--no-rank", "--results-dir", str(tmp_path), "--n-trials", "1"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "budget was taken by another process" in out and "every trial" not in out + err
    trials = _study(tmp_path).get_trials()
    assert not [t for t in trials if t.state.name == "FAIL"]


def test_malformed_attributes_of_a_shared_study_are_skipped(tmp_path, caplog):
    """Attributes another (older, buggy or hostile) process left in a shared study: a worker id without a
    pid, a retry_of that is no number, a config that no longer validates or is no mapping, a ranking that
    is no list of scores. Each is skipped with a warning naming the trial and the attribute."""
    import socket

    from optuna.trial import TrialState, create_trial

    (tmp_path / "digits").mkdir()
    study = optuna.create_study(study_name="default", storage=f"sqlite:///{tmp_path / 'digits' / 'optuna.db'}",
                                direction="maximize")
    orphan = study.ask()  # trial 0: running, "worker" without a pid
    orphan.set_user_attr("worker", socket.gethostname())
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.99,  # trial 1: the best, config invalid
                                 user_attrs={"config": {"backbone": "resnet20", "lr": "fast"}}))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5,  # trial 2
                                 user_attrs={"config": "not a mapping", "retry_of": "seven", "metrics": [1, 2]}))
    study.set_user_attr("ranking", ["junk", {"backbone": 3}])
    caplog.set_level("WARNING")
    # trial 0 holds a slot of the budget while it runs (its worker may be alive elsewhere): 4 = 1 + 2 + 1 new
    code = main(["search", "--task", "digits", "--backbones", "resnet20", "--set", "epochs=1", "--set", "unfreeze=0",
                 "--pruner", "none", "--results-dir", str(tmp_path), "--n-trials", "4"])
    assert code == 0
    warned = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for part in ("trial 0: attribute 'worker'", "trial 1: attribute 'config'", "final check is skipped",
                 "trial 2: attribute 'retry_of'", "trial 2: attribute 'config'", "attribute 'ranking'"):
        assert part in warned, warned
    assert "could not draw plots" not in warned
    df = pd.read_csv(tmp_path / "digits" / "default" / "trials.csv")
    assert len(df) == 4 and (df.state == "complete").sum() == 3
    assert count_finished(_study(tmp_path)) == 3


def test_a_new_process_does_not_sample_the_configuration_already_tried(tmp_path):
    """--extend (or a resume) opens the study with a new sampler: seeded only by the task, it would start
    its sequence again and propose trial 0's configuration a second time."""
    from autoft.engines.base import build_request
    from autoft.engines.optuna_engine import create_study
    from autoft.task import load_task

    req = build_request(load_task("digits"), overrides={"backbone": ["resnet20"], "epochs": 1},
                        results_dir=tmp_path, n_trials=1, extend=True)

    def one_trial_in_a_new_process() -> dict:
        study = create_study(req)
        trial = study.ask()
        req.space.sample(trial, req.fixed)
        study.tell(trial, 0.5)
        return trial.params

    first, second = one_trial_in_a_new_process(), one_trial_in_a_new_process()
    assert first != second


def test_most_common_failure_is_cut_at_a_word_not_mid_word():
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from autoft.results.tables import most_common_failure
    from autoft.study.record import ATTR_FAIL

    long = "weights file 'x.pth' is not in the cache folder " * 10 + "Put the file there"
    trials = [create_trial(state=TrialState.FAIL, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0, 1)},
                           user_attrs={ATTR_FAIL: long}) for _ in range(2)]
    reason, n = most_common_failure(trials)
    assert n == 2 and len(reason) <= 300 and reason.endswith(" …")
    assert long.startswith(reason[:-2]) and long[len(reason) - 2] == " "  # the cut falls between two words
    short = [create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs={ATTR_FAIL: "NaN loss\nmore"})]
    assert most_common_failure(short) == ("NaN loss", 1)
