"""The frozen-prefix cache: exact (same scores as the uncached path), shared on disk across
processes, bounded, and keyed so that a stale entry is never used."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from autoft.core import FeatureCache, TaskData, TrialConfig, fine_tune_and_score
from autoft.core.cache import DiskCache, default_cache_dir, stage_digests
from autoft.data import LabelledData, stratified_split
from autoft.zoo import get_backbone

EPOCHS = 2


@pytest.fixture(scope="module")
def tiny_digits(digits) -> TaskData:
    """Digits, 8 training and 8 validation images per class: whole-network runs stay fast."""
    return TaskData(digits, stratified_split(digits.labels, seed=0, train_per_class=8, val_per_class=8),
                    metric="accuracy", name="digits-tiny")


def _cfg(k: int, **kw) -> TrialConfig:
    return TrialConfig(backbone="resnet20", unfreeze=k, epochs=EPOCHS, lr=3e-3, batch_size=16, **kw)


def _same(a, b) -> None:
    assert len(a.history) == len(b.history) == EPOCHS
    for ha, hb in zip(a.history, b.history):
        for name in ("accuracy", "f1_macro", "loss", "train_loss"):
            assert ha[name] == pytest.approx(hb[name], abs=1e-5), name
    assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("k", [0, 4, 10])  # head only, an intermediate split, every stage (no prefix)
def test_cached_equals_uncached(tiny_digits, tmp_path, k):
    cache = FeatureCache(disk=tmp_path / "features")
    cached = fine_tune_and_score(_cfg(k), tiny_digits, cache=cache, use_cache=True)
    plain = fine_tune_and_score(_cfg(k), tiny_digits, cache=FeatureCache(disk=False), use_cache=False)
    _same(cached, plain)
    if k == 10:  # resnet20 has 10 stages: nothing is frozen, nothing is cached
        assert cache.misses == 0 and not list((tmp_path / "features").glob("*.pt"))
    else:
        assert cache.misses == 1 and len(list((tmp_path / "features").glob("*.pt"))) == 1
    assert cached.score > 0.15  # it learned something in two epochs (chance: 0.1)


def test_mlp_head_cached_equals_uncached(tiny_digits, tmp_path):
    cfg = _cfg(0, head="mlp", head_width=512, head_depth=2, dropout=0.1, optimizer="sgd")
    a = fine_tune_and_score(cfg, tiny_digits, cache=FeatureCache(disk=tmp_path), use_cache=True)
    b = fine_tune_and_score(cfg, tiny_digits, cache=FeatureCache(disk=False), use_cache=False)
    _same(a, b)


def test_second_instance_reads_disk(tiny_digits, tmp_path):
    """A new cache (another process, a resumed search) reads the prefix from disk: same numbers."""
    first = FeatureCache(disk=tmp_path)
    r1 = [fine_tune_and_score(_cfg(k), tiny_digits, cache=first) for k in (0, 3)]
    assert first.misses == 2 and first.disk.writes == 2

    second = FeatureCache(disk=tmp_path)
    r2 = [fine_tune_and_score(_cfg(k), tiny_digits, cache=second) for k in (0, 3)]
    assert second.misses == 0 and second.disk_hits == 2
    for a, b in zip(r1, r2):
        _same(a, b)
    # files are plain tensors: readable with weights_only=True, and nothing half-written is left
    for f in tmp_path.glob("*.pt"):
        doc = torch.load(f, weights_only=True)
        assert isinstance(doc["key"], str) and all(isinstance(t, torch.Tensor) for t in doc["tensors"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_changed_inputs_or_weights_miss(tiny_digits, tmp_path):
    cache = FeatureCache(disk=tmp_path)
    fine_tune_and_score(_cfg(0), tiny_digits, cache=cache)
    assert cache.misses == 1

    # one pixel of one training image changed: a different digest of the encoded inputs
    data = tiny_digits.data
    inputs = list(data.inputs)
    i = int(tiny_digits.splits.train[0])
    inputs[i] = inputs[i].copy()
    inputs[i][0, 0, 0] = 255 - inputs[i][0, 0, 0]
    changed = TaskData(LabelledData(inputs, data.labels, data.class_names, data.modality, "changed"),
                       tiny_digits.splits, name="changed")
    other = FeatureCache(disk=tmp_path)
    fine_tune_and_score(_cfg(0), changed, cache=other)
    assert other.misses == 1 and other.disk_hits == 0

    # different examples (another split of the same data): a miss too
    splits = dataclasses.replace(tiny_digits.splits, val=tiny_digits.splits.test[:80])
    other = FeatureCache(disk=tmp_path)
    fine_tune_and_score(_cfg(0), TaskData(data, splits, name="resplit"), cache=other)
    assert other.misses == 1

    # same name, other weights (randomly initialised): the weights digest differs
    torch.manual_seed(0)
    random_bb = get_backbone("resnet20", pretrained=False).set_unfreeze(0)
    pre = random_bb.preprocessing
    enc, digest = cache.encoded(data, pre)
    pretrained_bb = cache.backbone("resnet20").set_unfreeze(0)
    assert cache.prefix_key(random_bb, digest, 10) != cache.prefix_key(pretrained_bb, digest, 10)
    assert cache.prefix_key(pretrained_bb, digest, 9) != cache.prefix_key(pretrained_bb, digest, 10)


def test_weights_fingerprint_follows_in_place_changes():
    bb = get_backbone("resnet20")
    before = stage_digests(bb)
    assert stage_digests(bb) is before  # memoised
    with torch.no_grad():
        bb.stages[3].conv1.weight.add_(1e-3)
    after = stage_digests(bb)
    assert after[3] != before[3] and after[:3] == before[:3] and after[4:] == before[4:]


def test_eviction_keeps_folder_under_bound(tmp_path):
    one = torch.zeros(64 * 1024)  # 256 KiB of float32
    size = one.element_size() * one.nelement()
    disk = DiskCache(tmp_path, max_bytes=int(3.5 * size) + 4096)
    for i in range(3):
        disk.put(f"k{i}", one + i)
        os.utime(disk.path(f"k{i}"), (1000 + i, 1000 + i))  # k0 oldest
    assert disk.get("k0") is not None  # reading makes k0 the most recently used
    disk.put("k3", one + 3)
    disk.put("k4", one + 4)
    assert disk.size() <= disk.max_bytes
    kept = {k for k in ("k0", "k1", "k2", "k3", "k4") if disk.path(k).exists()}
    assert kept == {"k0", "k3", "k4"}  # least recently used (k1, k2) went first
    assert torch.equal(disk.get("k4"), one + 4)
    assert not disk.put("huge", torch.zeros(4 * 64 * 1024))  # larger than the bound: not stored
    assert disk.size() <= disk.max_bytes


def test_corrupt_or_foreign_file_is_recomputed(tiny_digits, tmp_path):
    cache = FeatureCache(disk=tmp_path)
    a = fine_tune_and_score(_cfg(0), tiny_digits, cache=cache)
    (f,) = tmp_path.glob("*.pt")
    f.write_bytes(b"not a tensor file")
    again = FeatureCache(disk=tmp_path)
    b = fine_tune_and_score(_cfg(0), tiny_digits, cache=again)
    assert again.misses == 1 and again.disk_hits == 0
    _same(a, b)


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOFT_CACHE_DIR", "off")
    assert default_cache_dir() is None and FeatureCache().disk is None
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(tmp_path / "c"))
    assert FeatureCache().disk.folder == tmp_path / "c"
    monkeypatch.delenv("AUTOFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "autoft" / "features"
    # never under AUTOFT_HOME (a read-only shared assets folder in tests)
    assert os.environ["AUTOFT_HOME"] not in str(default_cache_dir())


def test_unwritable_folder_falls_back_to_memory(tiny_digits, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = FeatureCache(disk=blocker / "features")  # a folder that cannot be created
    r = fine_tune_and_score(_cfg(0), tiny_digits, cache=cache)
    assert cache.disk.enabled is False and np.isfinite(r.score)


def test_one_pass_keeps_shallower_splits_exactly(tiny_digits, tmp_path):
    """The ranking's pass over the whole frozen backbone keeps the splits that trials start from: the kept
    entries equal separate passes bit for bit, a trial at such a depth then computes nothing, and what is
    kept is bounded (deepest splits first)."""
    from autoft.core.cache import compute_prefix, state_nbytes
    from autoft.rank import frozen_features

    cache = FeatureCache(disk=False)
    bb = cache.backbone("resnet20").set_unfreeze(0)
    encoded, digest = cache.encoded(tiny_digits.data, bb.preprocessing)
    rows = torch.from_numpy(np.union1d(tiny_digits.splits.train, tiny_digits.splits.val)).long()
    ns = bb.num_stages
    full, kept = compute_prefix(bb, encoded[rows], ns, keep=(ns - 1, ns - 4))
    assert sorted(kept) == [ns - 4, ns - 1]
    assert torch.equal(full, compute_prefix(bb, encoded[rows], ns))
    for s, out in kept.items():
        assert torch.equal(out, compute_prefix(bb, encoded[rows], s)), s
    # a bound that fits only the deepest split (the fewest stages unfrozen) keeps only that one
    _, capped = compute_prefix(bb, encoded[rows], ns, keep=(ns - 1, ns - 4),
                               keep_bytes=state_nbytes(kept[ns - 1]) + 1)
    assert sorted(capped) == [ns - 1] and torch.equal(capped[ns - 1], kept[ns - 1])
    # the order asked is the priority: the shallower split first, then nothing else fits
    _, first = compute_prefix(bb, encoded[rows], ns, keep=(ns - 4, ns - 1), keep_bytes=state_nbytes(kept[ns - 4]) + 1)
    assert sorted(first) == [ns - 4] and torch.equal(first[ns - 4], kept[ns - 4])

    # through the ranking: the splits of unfreeze 1 and 4 are kept, and trials at those depths hit them
    f, _ = frozen_features("resnet20", tiny_digits, cache, keep_unfreeze=[0, 1, 4])
    assert cache.misses == 1 and cache.kept == 2 and f.shape[0] == len(tiny_digits.splits.train)
    for k in (1, 4):
        cached = fine_tune_and_score(_cfg(k), tiny_digits, cache=cache, use_cache=True)
        plain = fine_tune_and_score(_cfg(k), tiny_digits, cache=FeatureCache(disk=False), use_cache=False)
        _same(cached, plain)
    assert cache.misses == 1 and cache.stats()["kept"] == 2  # no new pass
    fine_tune_and_score(_cfg(2), tiny_digits, cache=cache, use_cache=True)
    assert cache.misses == 2  # a depth that was not kept is computed as before


def test_kept_text_prefixes_equal_separate_passes(sms_small):
    """Text states are (hidden, mask) pairs, batched by length and padded back to the full width: a kept
    split equals its own pass exactly (the same batches, the same padding)."""
    from autoft.core.cache import compute_prefix

    cache = FeatureCache(disk=False)
    bb = cache.backbone("minilm").set_unfreeze(0)
    encoded, _ = cache.encoded(sms_small, bb.preprocessing)
    sub = tuple(t[:70] for t in encoded)  # 70 texts: two batches of 64 and 6, lengths sorted across them
    ns = bb.num_stages
    full, kept = compute_prefix(bb, sub, ns, batch_size=64, keep=(ns - 1, ns - 2))
    assert sorted(kept) == [ns - 2, ns - 1] and torch.equal(full, compute_prefix(bb, sub, ns, batch_size=64))
    for s, out in kept.items():
        alone = compute_prefix(bb, sub, s, batch_size=64)
        assert isinstance(out, tuple) and len(out) == len(alone)
        assert all(torch.equal(a, b) for a, b in zip(out, alone)), s
        assert out[0].shape[1] == sub[1].shape[1]  # padded back to the full width, as a separate pass does
