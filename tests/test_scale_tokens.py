"""Data at scale: text token ids are tokenized once, cached in the feature cache's folder as an int32 ``.npy``
and memory-mapped by later caches (other processes, resumed searches) without calling the tokenizer; the
scores are those of tokenizing into memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from autoft.core import FeatureCache, TaskData, fine_tune_and_score
from autoft.data import stratified_split

CFG = dict(backbone="minilm", unfreeze=1, lr=5e-5, head_lr_mult=100, epochs=1, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def sms_task(sms_small) -> TaskData:
    splits = stratified_split(sms_small.labels, val=0.25, test=0.25, seed=0, source="sms")
    return TaskData(sms_small, splits, metric="f1_pos", positive_index=sms_small.class_names.index("spam"),
                    name="sms-small")


def _token_files(folder):
    out = []
    for p in (folder / "arrays").glob("*.npy"):
        if "'tokens'" in p.with_suffix(".key").read_text():
            out.append(p)
    return out


def test_token_ids_cached_on_disk_and_reused_without_tokenizer(sms_task, tmp_path, monkeypatch):
    memory = fine_tune_and_score(CFG, sms_task, cache=FeatureCache(disk=False), test=True)
    a = FeatureCache(disk=tmp_path)
    first = fine_tune_and_score(CFG, sms_task, cache=a, test=True)
    (path,) = _token_files(tmp_path)
    stored = np.load(path, mmap_mode="r", allow_pickle=False)
    assert stored.dtype == np.int32 and stored.shape[:2] == (len(sms_task.data), 2)
    # int32 ids on disk give the scores of int64 ids tokenized into memory
    assert first.score == pytest.approx(memory.score, abs=1e-5)
    assert first.metrics["loss"] == pytest.approx(memory.metrics["loss"], abs=1e-5)
    assert first.test_metrics["f1_pos"] == pytest.approx(memory.test_metrics["f1_pos"], abs=1e-5)

    # a second cache on the same folder (another process, a resumed search): no tokenizer call at all
    def no_tokenizer(*a, **k):
        raise AssertionError("the tokenizer was called although the token ids are cached")

    import sys

    monkeypatch.setattr(sys.modules["autoft.data.encode"], "load_tokenizer", no_tokenizer)
    b = FeatureCache(disk=tmp_path)
    second = fine_tune_and_score(CFG, sms_task, cache=b, test=True)
    (ids, mask), _ = next(iter(b._encoded.values()))
    assert ids.dtype == torch.int32 and mask.dtype == torch.int32
    ref_ids, ref_mask = next(iter(a._encoded.values()))[0]
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    # same digest of the token ids: the frozen-prefix entries the first cache wrote are read, not recomputed
    assert b.misses == 0 and b.disk_hits >= 1
    assert second.score == first.score and second.metrics == first.metrics
    assert second.test_metrics == first.test_metrics
    assert _token_files(tmp_path) == [path]


def test_token_cache_key_follows_max_length(sms_task, tmp_path):
    cache = FeatureCache(disk=tmp_path)
    pre = cache.backbone("minilm").preprocessing
    import dataclasses

    ids64, _ = cache.tokens(sms_task.data, dataclasses.replace(pre, max_length=64))
    ids16, mask16 = cache.tokens(sms_task.data, dataclasses.replace(pre, max_length=16))
    assert len(_token_files(tmp_path)) == 2 and ids16.shape[1] <= 16 < ids64.shape[1]
    assert int(mask16.sum(1).max()) <= 16
