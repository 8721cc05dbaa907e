"""Shared test setup: offline assets, the digits data, and one feature cache for the whole session.

The environment is set at import time (before any test module imports autoft) so that every
weights lookup goes to ``../shared/assets`` and nothing is ever downloaded.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
# absolute, so that subprocesses started in other folders (CLI tests, Ray workers) find the same assets
os.environ["AUTOFT_HOME"] = str(Path(os.environ.get("AUTOFT_HOME") or ASSETS).expanduser().resolve())
os.environ["AUTOFT_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "AUTOFT_CACHE_DIR" not in os.environ:
    # frozen-prefix features go to a fresh folder per test session, not the user's ~/.cache:
    # tests must not depend on (or leave behind) what earlier runs computed
    _CACHE_DIR = tempfile.mkdtemp(prefix="autoft-test-features-")
    os.environ["AUTOFT_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

# One intra-op thread by default.  The test machines have 2 cores that other jobs often share, and
# multi-threaded torch waits at every OpenMP barrier for a thread that is not running: with one
# busy neighbour process the foundation tests took 158 s with 2 threads and 37 s with 1.
# AUTOFT_TEST_THREADS=N uses N threads.
torch.set_num_threads(max(1, int(os.environ.get("AUTOFT_TEST_THREADS", "1"))))

from autoft.core import FeatureCache, TaskData  # noqa: E402
from autoft.data import LabelledData, Splits, load_csv, load_digits_data, stratified_split  # noqa: E402

SMS_SPAM = Path(os.environ["AUTOFT_HOME"]) / "data" / "sms_spam" / "SMSSpamCollection"


@pytest.fixture(scope="session")
def assets() -> Path:
    home = Path(os.environ["AUTOFT_HOME"])
    if not (home / "weights").is_dir():
        pytest.fail(f"offline assets not found at {home} (set AUTOFT_HOME to the shared assets folder)")
    return home


@pytest.fixture(scope="session")
def sms_path(assets) -> Path:
    return SMS_SPAM


@pytest.fixture(scope="session")
def digits() -> LabelledData:
    return load_digits_data()


@pytest.fixture(scope="session")
def digits_splits(digits: LabelledData) -> Splits:
    return stratified_split(digits.labels, val=0.15, test=0.15, seed=0, source="digits")


@pytest.fixture(scope="session")
def digits_task(digits: LabelledData, digits_splits: Splits) -> TaskData:
    return TaskData(digits, digits_splits, metric="accuracy", name="digits")


@pytest.fixture(scope="session")
def small_digits_task(digits: LabelledData) -> TaskData:
    """Few-shot digits (20 train / 20 val per class): fast enough for whole-network fine-tunes."""
    splits = stratified_split(digits.labels, seed=0, train_per_class=20, val_per_class=20, source="digits")
    return TaskData(digits, splits, metric="accuracy", name="digits-small")


@pytest.fixture(scope="session")
def feature_cache() -> FeatureCache:
    """One in-memory cache for the session: backbones are loaded and frozen prefixes computed once."""
    return FeatureCache(disk=False)


@pytest.fixture(scope="session")
def sms_small() -> LabelledData:
    """A small subset of the SMS spam collection (60 spam, 140 ham), fixed by a seed.

    Shared with other test modules (export tests): keep its size and seed stable."""
    full = load_csv(SMS_SPAM, text_column="SMS", label_column="Label")
    spam = full.class_names.index("spam")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(full.labels == spam), 60, replace=False),
                          rng.choice(np.flatnonzero(full.labels != spam), 140, replace=False)])
    idx.sort()
    return LabelledData([full.inputs[i] for i in idx], full.labels[idx], full.class_names, "text",
                        f"{full.source} (subset of {len(idx)})")

