"""Streamed images: lazy image folders, DataLoader workers, the backbone's preset, augmentation, the
feature files on disk (exact), batch norm as a choice, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from autoft.core import FeatureCache, TaskData, TrialConfig, fine_tune_and_score
from autoft.core.cache import DiskArray
from autoft.data import load_image_folder, stratified_split
from autoft.data.encode import encode
from autoft.data.stream import StreamDataset, eval_transform, loader, sample_seed, train_transform

EPOCHS = 2


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """60 small photos of two classes, of varying sizes (one class brighter, so it is learnable)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, base in (("bright", 170), ("dark", 70)):
        (root / c).mkdir()
        for i in range(30):
            h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            arr = np.clip(rng.normal(base, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.jpg" if i % 2 else root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def photo_task(photo_folder):
    data = load_image_folder(photo_folder).validate()
    splits = stratified_split(data.labels, val=0.25, test=0.2, seed=0)
    return data, splits


def _task(photo_task, budget=None, workers=0):
    data, splits = photo_task
    return TaskData(data, splits, name="photos", memory_budget=budget, num_workers=workers)


def _cfg(k, **kw):
    return TrialConfig(backbone="resnet20", unfreeze=k, epochs=EPOCHS, lr=3e-3, batch_size=8, **kw)


def test_image_folder_is_lazy(photo_task):
    data, _ = photo_task
    assert len(data) == 60 and not isinstance(data.inputs, list)
    x = data.inputs[3]
    assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
    assert data.fingerprint() == data.fingerprint()


@pytest.mark.parametrize("k", [0, 4, 10])  # head only, an intermediate split, every stage trained
def test_streamed_cached_equals_uncached_and_in_memory(photo_task, tmp_path, k):
    """augment none: features written to disk and read per batch give the scores of the streamed
    uncached path and of today's in-memory path."""
    cached = fine_tune_and_score(_cfg(k), _task(photo_task, budget=1), cache=FeatureCache(disk=tmp_path))
    plain = fine_tune_and_score(_cfg(k), _task(photo_task, budget=1), cache=FeatureCache(disk=False),
                                use_cache=False)
    memory = fine_tune_and_score(_cfg(k), _task(photo_task), cache=FeatureCache(disk=False))
    assert plain.data["mode"] == "streamed" and memory.data["mode"] == "in memory"
    assert cached.data["mode"] == ("disk features" if k < 10 else "streamed")
    for other in (plain, memory):
        assert abs(cached.score - other.score) < 1e-5
        for h1, h2 in zip(cached.history, other.history):
            assert abs(h1["train_loss"] - h2["train_loss"]) < 1e-4
    if k < 10:
        assert list((tmp_path / "arrays").glob("*.npy"))


def test_disk_features_reused_by_a_second_cache(photo_task, tmp_path):
    a = FeatureCache(disk=tmp_path)
    fine_tune_and_score(_cfg(0), _task(photo_task, budget=1), cache=a)
    b = FeatureCache(disk=tmp_path)
    fine_tune_and_score(_cfg(0), _task(photo_task, budget=1), cache=b)
    assert a.misses == 1 and b.misses == 0 and b.disk_hits == 1


def test_disk_array_reads_rows(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 2, 2)
    np.save(tmp_path / "a.npy", x)
    arr = DiskArray(tmp_path / "a.npy")
    assert torch.equal(arr.read([7, 0, 7]), torch.from_numpy(x[[7, 0, 7]]))
    with pytest.raises(IndexError):
        arr.read([10])


def test_augmented_trial_is_reproducible_whatever_the_workers(photo_task):
    a = fine_tune_and_score(_cfg(1, augment="light"), _task(photo_task, workers=0), cache=FeatureCache(disk=False))
    b = fine_tune_and_score(_cfg(1, augment="light"), _task(photo_task, workers=2), cache=FeatureCache(disk=False))
    assert a.data["mode"] == "streamed" and b.data["workers"] == 2
    assert abs(a.score - b.score) < 1e-6 and a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"])
    assert 0 <= b.data["loader_wait_share"] <= 1


def test_augmentations_change_the_image_and_are_seeded(photo_task):
    data, _ = photo_task
    pre = FeatureCache(disk=False).backbone("mobilenet_v2_folded").preprocessing
    ev = eval_transform(pre)
    for augment in ("light", "strong"):
        ds = StreamDataset(data.inputs, data.labels, train_transform(pre, augment))
        x1, _ = ds[(5, sample_seed(0, 1, 5))]
        x2, _ = ds[(5, sample_seed(0, 1, 5))]
        x3, _ = ds[(5, sample_seed(0, 2, 5))]
        assert x1.shape == (3, 224, 224) and torch.equal(x1, x2) and not torch.equal(x1, x3)
        assert not torch.equal(x1, ev(data.inputs[5]))


def test_eval_transform_is_the_weights_preset(photo_task):
    """Shorter side to resize_size, centre crop: what torchvision.transforms.v2 does with the preset, and
    what an export serves with (encode() uses the runtime's function)."""
    data, _ = photo_task
    pre = FeatureCache(disk=False).backbone("mobilenet_v2_folded").preprocessing
    assert pre.resize_size == 256 and pre.input_size == 224
    img = np.asarray(Image.fromarray(data.inputs[0]).resize((300, 200)))  # landscape: the width is cropped
    ours = eval_transform(pre)(img)
    v2 = pre.image_preset().transforms()(torch.from_numpy(img).permute(2, 0, 1).contiguous())
    assert ours.shape == v2.shape == (3, 224, 224)
    assert (ours - v2).abs().max() < 0.03  # v2 rounds to uint8 after resizing; we keep float32
    assert torch.equal(encode([img], pre)[0], ours)
    ds = StreamDataset(data.inputs, data.labels, eval_transform(pre))
    (xb, yb), = list(loader(ds, [[(0, None), (1, None)]], num_workers=1))
    assert torch.equal(xb, encode([data.inputs[0], data.inputs[1]], pre)) and yb.tolist() == data.labels[:2].tolist()


def test_bn_frozen_keeps_running_statistics(small_digits_task):
    cache = FeatureCache(disk=False)
    for bn, same in (("frozen", True), ("train", False)):
        res = fine_tune_and_score(TrialConfig(backbone="resnet20", unfreeze=3, epochs=1, batch_size=32, bn=bn),
                                  small_digits_task, cache=cache, use_cache=False, return_model=True)
        ref = cache.backbone("resnet20")
        a = res.model.backbone.stages[-1].state_dict()
        b = ref.stages[-1].state_dict()
        stats = [k for k in a if k.endswith("running_mean")]
        assert stats and all(torch.equal(a[k], b[k]) == same for k in stats)


# --- bad input: each a clear error or a counted skip ------------------------------------------------------

def test_image_modes_converted_and_truncated_skipped(tmp_path):
    from autoft.data.images import decode_image

    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray((rng.integers(0, 65536, (16, 16))).astype(np.uint16)).save(tmp_path / "a" / "deep.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "a" / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "b" / "palette.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)).save(tmp_path / "b" / "alpha.png")
    Image.fromarray(rgb).save(tmp_path / "b" / "ok.jpg")
    whole = (tmp_path / "b" / "ok.jpg").read_bytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(whole[: len(whole) - 40])  # a download cut short: header intact
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(tmp_path / "a" / "rotated.jpg", exif=exif)
    data = load_image_folder(tmp_path)
    notes = " | ".join(data.notes)
    assert len(data) == 6
    assert "skipped 1 unreadable image(s)" in notes and "cut.jpg (truncated)" in notes
    for mode in ("CMYK", "P", "RGBA"):
        assert f"converted 1 {mode} image(s) to RGB" in notes
    assert any(n.startswith("converted 1 I") for n in data.notes)  # 16-bit grey (I;16 or I)
    deep = decode_image(tmp_path / "a" / "deep.png")
    assert deep.shape == (16, 16, 3) and deep.max() > 128  # scaled from 16 bits, not clipped at 255
    assert decode_image(tmp_path / "a" / "rotated.jpg").shape == (30, 20, 3)  # EXIF orientation honoured


def test_image_table_errors(tmp_path):
    from autoft.data import load_image_table
    from autoft.errors import DataError

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    good = tmp_path / "t.csv"
    good.write_text("file,kind\n" + "".join(f"img/{i}.png,{'ab'[i % 2]}\n" for i in range(4)))
    data = load_image_table(good, path_column="file", label_column="kind")
    assert len(data) == 4 and data.class_names == ["a", "b"] and data.inputs[1].shape == (8, 8, 3)
    with pytest.raises(DataError, match="no column 'path'"):
        load_image_table(good)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n" + "".join(f"img/missing{i}.png,a\n" for i in range(5)) + "img/0.png,b\n")
    with pytest.raises(DataError, match=r"5 of 6 image path\(s\).*missing0\.png.*missing2\.png"):
        load_image_table(bad)
    pq = tmp_path / "t.parquet"
    import pandas as pd

    pd.DataFrame({"path": [str(tmp_path / "img" / f"{i}.png") for i in range(4)], "label": [0, 1, 0, 1]}).to_parquet(pq)
    assert load_image_table(pq).class_names == ["0", "1"]


def test_text_tables_and_bad_text(tmp_path):
    from autoft.data import LabelledData, load_csv
    from autoft.errors import DataError

    import pandas as pd

    rows = [{"text": "hello there", "label": "greet"}, {"text": "  ", "label": "greet"},
            {"text": "bye now", "label": "leave"}]
    (tmp_path / "t.jsonl").write_text("\n".join(pd.Series(r).to_json() for r in rows) + "\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    for name in ("t.jsonl", "t.parquet"):
        d = load_csv(tmp_path / name)
        assert d.inputs == ["hello there", "bye now"] and "skipped 1 row(s) with an empty text" in d.notes
    with pytest.raises(DataError, match="same label"):
        LabelledData(["a", "b"], [0, 0], ["x", "y"], "text", "one.csv").validate()


def test_class_too_small_for_the_split(tmp_path):
    from autoft.errors import DataError

    for c, n in (("many", 10), ("few", 1)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    data = load_image_folder(tmp_path)
    with pytest.raises(DataError, match="class 'few' has only 1 example"):
        stratified_split(data.labels, val=0.2, test=0.2, class_names=data.class_names, source=str(tmp_path))


def test_task_with_a_fixed_test_folder(tmp_path):
    from autoft.task import parse_task

    for split, n in (("train", 8), ("test", 3)):
        for c in ("x", "y"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    task = parse_task({"name": "t", "modality": "image", "search_space": "imagenet_convnets",
                       "data": {"source": "image_folder", "path": str(tmp_path / "train"),
                                "test_path": str(tmp_path / "test"), "num_workers": 1, "memory_budget_mb": 64},
                       "split": {"val": 0.25}})
    td = task.prepare()
    assert td.splits.sizes() == {"train": 12, "val": 4, "test": 6}
    assert len(td.data) == 22 and td.num_workers == 1 and td.memory_budget == 64 << 20
    assert all(td.data.inputs[i].shape == (8, 8, 3) for i in td.splits.test)
