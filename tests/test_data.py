"""The data layer: stratified splits, loaders (image folder, CSV/TSV, npz), validation, encoding."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoft.data import LabelledData, encode, load_csv, load_image_folder, load_npz, stratified_split
from autoft.errors import DataError
from autoft.zoo.cifar_resnet import PREPROCESSING as CIFAR_PRE


# --- stratified splits ------------------------------------------------------------------------------

def _as_sets(s):
    return set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())


def test_split_is_deterministic_for_a_seed(digits):
    a = stratified_split(digits.labels, seed=0)
    b = stratified_split(digits.labels, seed=0)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    c = stratified_split(digits.labels, seed=1)
    assert not np.array_equal(a.test, c.test)
    assert not np.array_equal(a.val, c.val)
    assert a.sizes() == c.sizes()  # same sizes, different members


@pytest.mark.parametrize("seed", [0, 7])
def test_split_is_disjoint_covering_and_stratified(digits, seed):
    y = digits.labels
    s = stratified_split(y, val=0.15, test=0.15, seed=seed)
    tr, va, te = _as_sets(s)
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(range(len(y)))
    assert len(s.train) + len(s.val) + len(s.test) == len(y)
    for part, frac in ((s.val, 0.15), (s.test, 0.15), (s.train, 0.70)):
        counts = Counter(y[part].tolist())
        for cls, n in Counter(y.tolist()).items():
            assert abs(counts[cls] - n * frac) <= 1, (cls, counts[cls], n * frac)
    assert s.sizes() == {"train": len(s.train), "val": len(s.val), "test": len(s.test)}


def test_few_shot_split_gives_exact_counts(digits):
    y = digits.labels
    s = stratified_split(y, seed=0, train_per_class=20)
    assert Counter(y[s.train].tolist()) == {c: 20 for c in range(10)}
    assert Counter(y[s.val].tolist()) == {c: 20 for c in range(10)}
    assert len(s.test) == len(y) - 400
    tr, va, te = _as_sets(s)
    assert not (tr & va or tr & te or va & te) and tr | va | te == set(range(len(y)))

    s5 = stratified_split(y, seed=0, train_per_class=20, val_per_class=5)
    assert Counter(y[s5.val].tolist()) == {c: 5 for c in range(10)}


def test_split_errors():
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match=r"class 1 has only 2 example\(s\).*at least 3"):
        stratified_split(labels, val=0.15, test=0.15, source="tiny.csv")
    with pytest.raises(DataError, match="tiny.csv"):
        stratified_split(labels, val=0.15, test=0.15, source="tiny.csv")
    with pytest.raises(DataError, match=r"class 1 has 2 examples; few-shot splitting needs at least 9"):
        stratified_split(labels, train_per_class=4)
    with pytest.raises(DataError, match="sum below 1"):
        stratified_split(labels, val=0.6, test=0.5)
    # two examples per class suffice without a test split
    s = stratified_split(labels, val=0.15, test=0.0)
    assert len(s.test) == 0 and Counter(labels[s.val].tolist()) == {0: 2, 1: 1}


# --- LabelledData validation -------------------------------------------------------------------------

def test_labelled_data_validate():
    with pytest.raises(DataError, match="empty"):
        LabelledData([], [], [], "text", "empty.csv").validate()
    with pytest.raises(DataError, match=r"same label \('spam'\).*at least 2 classes"):
        LabelledData(["a", "b"], [1, 1], ["ham", "spam"], "text", "one.csv").validate()
    with pytest.raises(DataError, match="3 inputs but 2 labels"):
        LabelledData(["a", "b", "c"], [0, 1], ["x", "y"], "text", "bad.csv")
    ok = LabelledData(["a", "b"], [0, 1], ["x", "y"], "text", "ok.csv")
    assert ok.validate() is ok and ok.num_classes == 2 and len(ok) == 2


def test_fingerprint_tracks_content():
    a = LabelledData(["a", "b"], [0, 1], ["x", "y"], "text")
    assert a.fingerprint() == LabelledData(["a", "b"], [0, 1], ["x", "y"], "text").fingerprint()
    assert a.fingerprint() != LabelledData(["a", "c"], [0, 1], ["x", "y"], "text").fingerprint()
    assert a.fingerprint() != LabelledData(["a", "b"], [1, 0], ["x", "y"], "text").fingerprint()


# --- image folders ----------------------------------------------------------------------------------

def _save(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)  # (H, W) → L, (H, W, 3) → RGB, (H, W, 4) → RGBA


def test_image_folder_converts_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / ".hidden").mkdir()
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    _save(tmp_path / "cat" / "rgb.png", rgb)
    _save(tmp_path / "cat" / "grey.png", grey)
    _save(tmp_path / "dog" / "rgba.png", rgba)
    _save(tmp_path / "dog" / "big.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    (tmp_path / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "dog" / "readme.txt").write_text("not an image, ignored")

    data = load_image_folder(tmp_path)
    assert data.class_names == ["cat", "dog"]
    assert data.modality == "image"
    assert len(data) == 4  # the corrupt file is skipped, the .txt ignored
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]
    assert all(x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3 for x in data.inputs)
    assert {x.shape for x in data.inputs} == {(10, 12, 3), (20, 20, 3), (16, 16, 3), (40, 30, 3)}
    by_shape = {x.shape: x for x in data.inputs}
    assert np.array_equal(by_shape[(10, 12, 3)], rgb)
    assert all(np.array_equal(by_shape[(20, 20, 3)][..., c], grey) for c in range(3))
    assert np.array_equal(by_shape[(16, 16, 3)], rgba[..., :3])

    notes = " | ".join(data.notes)
    assert "converted 1 L image(s) to RGB" in notes
    assert "converted 1 RGBA image(s) to RGB" in notes
    assert "skipped 1 unreadable image(s)" in notes and "corrupt.png" in notes
    assert "different sizes" in notes

    x = encode(data.inputs, CIFAR_PRE)  # mixed sizes all come out at the backbone's input size
    assert x.shape == (4, 3, 32, 32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path)


# --- CSV / TSV ----------------------------------------------------------------------------------

def test_csv_and_tsv(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text('text,label,extra\n"good, really good",pos,1\nbad,neg,2\nfine,pos,3\n"meh",,4\n')
    data = load_csv(csv)
    assert data.inputs == ["good, really good", "bad", "fine"]  # the row with no label is skipped
    assert data.class_names == ["neg", "pos"]
    assert data.labels.tolist() == [1, 0, 1]
    assert data.modality == "text"

    tsv = tmp_path / "reviews.txt"  # tab-separated, detected from the first line
    tsv.write_text('Label\tSMS\nham\tsee you "later"\nspam\tWIN a prize, now\n')
    data = load_csv(tsv, text_column="SMS", label_column="Label")
    assert data.inputs == ['see you "later"', "WIN a prize, now"]
    assert data.class_names == ["ham", "spam"]


def test_sms_spam_loads(sms_path):
    data = load_csv(sms_path, text_column="SMS", label_column="Label").validate()
    assert len(data) == 5574
    assert data.class_names == ["ham", "spam"]
    assert np.bincount(data.labels).tolist() == [4827, 747]


def test_csv_missing_column_names_it(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("txt,label\nhello,a\n")
    with pytest.raises(DataError) as err:
        load_csv(csv, text_column="text")
    msg = str(err.value)
    assert "no column 'text'" in msg and "data.text_column" in msg and "did you mean 'txt'" in msg
    assert str(csv) in msg
    with pytest.raises(DataError, match="no column 'category'.*data.label_column"):
        load_csv(csv, text_column="txt", label_column="category")


def test_csv_bad_encoding(tmp_path):
    csv = tmp_path / "latin.csv"
    csv.write_bytes("text,label\ncaf\u00e9 au lait,drink\nthé,drink\ntoast,food\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_csv(csv)
    msg = str(err.value)
    assert "not valid utf-8" in msg and str(csv) in msg and "encoding" in msg
    data = load_csv(csv, encoding="latin-1")
    assert data.inputs[0] == "caf\u00e9 au lait"


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "none.csv")


# --- npz ----------------------------------------------------------------------------------------

def test_npz_grey_images(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    y = np.array([3, 1, 3, 1, 10, 10])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_npz(tmp_path / "d.npz")
    assert data.class_names == ["1", "3", "10"]  # integer labels in numeric order
    assert data.labels.tolist() == [1, 0, 1, 0, 2, 2]
    assert len(data.inputs) == 6 and data.inputs[0].shape == (8, 8, 1)
    assert np.array_equal(data.inputs[2][..., 0], x[2])
    assert encode(data.inputs, CIFAR_PRE).shape == (6, 3, 32, 32)


def test_npz_float_and_channels_first(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 5, 7)).astype(np.float32)  # NCHW floats in [0, 1]
    x[0, 0, 0, 0] = 1.0
    np.savez(tmp_path / "f.npz", images=x, targets=np.array([0, 1, 0, 1]), class_names=np.array(["no", "yes"]))
    data = load_npz(tmp_path / "f.npz", x_key="images", y_key="targets")
    assert data.class_names == ["no", "yes"]
    assert data.inputs[0].shape == (5, 7, 3) and data.inputs[0].dtype == np.uint8
    assert np.array_equal(data.inputs[1], np.round(np.transpose(x[1], (1, 2, 0)) * 255).astype(np.uint8))

    # values 0..16 (like sklearn's digits): one scale for the whole array, not one per image
    g = rng.integers(0, 17, (3, 4, 4)).astype(np.float64)
    g[0] = g[0] // 2  # this image's maximum is at most 8
    g[1, 0, 0] = 16
    np.savez(tmp_path / "g.npz", x=g, y=np.array([0, 1, 1]))
    data = load_npz(tmp_path / "g.npz")
    assert np.array_equal(data.inputs[0][..., 0], np.round(g[0] * 255 / 16).astype(np.uint8))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"no array 'labels' \(data.y_key\)"):
        load_npz(tmp_path / "a.npz", y_key="labels")
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"expected images \(N, H, W\)"):
        load_npz(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="could not read"):
        load_npz(tmp_path / "c.npz")


# --- encoding ---------------------------------------------------------------------------------------

def test_encode_digits_for_cifar_resnets(digits):
    x = encode(digits.inputs[:50], CIFAR_PRE)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    mean = torch.tensor(CIFAR_PRE.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_PRE.std).view(1, 3, 1, 1)
    raw = x * std + mean  # undo the normalisation: grey repeated into 3 identical channels in [0, 1]
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-6) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-6)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6

    img = torch.from_numpy(np.stack(digits.inputs[:50])).permute(0, 3, 1, 2).float() / 255.0
    ref = (F.interpolate(img.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", align_corners=False) - mean) / std
    assert torch.allclose(x, ref, atol=1e-6)
    # a black corner is (0 - mean) / std in every channel
    assert torch.allclose(x[0, :, 0, 0], (-mean / std).flatten(), atol=1e-5)
