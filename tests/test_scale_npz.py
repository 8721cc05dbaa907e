"""Data at scale: ``.npz`` image arrays are memory-mapped, never read whole: in place when the member is
stored uncompressed, extracted once to the cache folder when it is compressed."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.data import load_npz, stratified_split
from autoft.data.datasets import _to_uint8_image
from autoft.errors import DataError


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(folder))
    return folder


def _images(rng, n=10):
    return rng.random((n, 3, 6, 5)).astype(np.float32) * 4  # NCHW floats, one scale for the whole array


def _expected(x):
    """What load_npz returned when it read the array into memory: NHWC, one uint8 scale for the array."""
    return _to_uint8_image(np.transpose(x, (0, 2, 3, 1)))


def test_uncompressed_member_is_mapped_in_place(tmp_path, cache_dir, caplog):
    rng = np.random.default_rng(0)
    x = _images(rng)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    with caplog.at_level(logging.INFO, logger="autoft.data.npz"):
        data = load_npz(tmp_path / "d.npz")
    assert "memory-mapped in place" in caplog.text and "mapped in place" in data.notes[0]
    mm = data.inputs.source.array()
    assert isinstance(mm, np.memmap) and mm.filename == str((tmp_path / "d.npz").resolve())
    assert not cache_dir.exists()  # nothing extracted
    want = _expected(x)
    for i in range(10):
        assert np.array_equal(data.inputs[i], want[i])
    # what DataLoader workers get: the file mapped again, not the pixels pickled
    copy = pickle.loads(pickle.dumps(data.inputs))
    assert len(pickle.dumps(data.inputs)) < 2000 and np.array_equal(copy[7], want[7])
    # a Fortran-ordered grey uint8 array maps too
    g = np.asfortranarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
    np.savez(tmp_path / "g.npz", x=g, y=np.arange(5) % 2)
    grey = load_npz(tmp_path / "g.npz")
    assert all(np.array_equal(grey.inputs[i][..., 0], g[i]) for i in range(5))


def test_compressed_member_is_extracted_once_to_the_cache_folder(tmp_path, cache_dir, caplog):
    rng = np.random.default_rng(1)
    x = _images(rng)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.arange(10) % 2)
    with caplog.at_level(logging.INFO, logger="autoft.data.npz"):
        data = load_npz(tmp_path / "c.npz")
    assert "extracted once to" in caplog.text
    files = list((cache_dir / "arrays").glob("*.npy"))
    assert len(files) == 1 and files[0].with_suffix(".key").is_file()
    assert data.inputs.source.array().filename == str(files[0].resolve())
    assert np.array_equal(np.load(files[0], allow_pickle=False), x)  # a plain .npy of the member
    want = _expected(x)
    assert all(np.array_equal(data.inputs[i], want[i]) for i in range(10))
    caplog.clear()
    mtime = files[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="autoft.data.npz"):
        again = load_npz(tmp_path / "c.npz")
    assert "extracted earlier" in caplog.text and files[0].stat().st_mtime_ns >= mtime
    assert list((cache_dir / "arrays").glob("*.npy")) == files
    assert data.fingerprint() == again.fingerprint()


def test_object_arrays_are_refused(tmp_path, cache_dir):
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "o.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4) % 2)
        with pytest.raises(DataError, match="Python objects"):
            load_npz(tmp_path / "o.npz")


def test_trial_on_mapped_npz_scores_like_the_in_memory_digits(tmp_path, cache_dir, digits):
    """The digits saved as a compressed .npz: a trial on the mapped images scores as on the arrays in memory."""
    x = np.stack([img[..., 0] for img in digits.inputs])
    np.savez_compressed(tmp_path / "digits.npz", x=x, y=digits.labels)
    mapped = load_npz(tmp_path / "digits.npz")
    assert mapped.labels.tolist() == digits.labels.tolist()
    splits = stratified_split(digits.labels, seed=0, train_per_class=10, val_per_class=10, source="digits")
    cfg = dict(backbone="resnet20", unfreeze=1, epochs=1, batch_size=32)
    a = fine_tune_and_score(cfg, TaskData(mapped, splits), cache=FeatureCache(disk=False))
    b = fine_tune_and_score(cfg, TaskData(digits, splits), cache=FeatureCache(disk=False))
    assert a.score == pytest.approx(b.score, abs=1e-6) and a.metrics["loss"] == pytest.approx(b.metrics["loss"], abs=1e-6)
