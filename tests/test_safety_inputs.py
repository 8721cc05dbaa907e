"""Security audit: untrusted files on disk never run code, exhaust memory or get deleted.

* torchvision checkpoints are hash-checked before they are read and read with
  ``torch.load(weights_only=True)`` only (a planted pickle never runs);
* image folders skip decompression bombs (by the size their header declares, before decoding);
* the feature cache evicts only the files it wrote;
* split errors name the class by its label.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from autoft.core.cache import DiskCache
from autoft.data import load_image_folder, stratified_split
from autoft.data.datasets import DEFAULT_MAX_IMAGE_PIXELS
from autoft.errors import DataError, WeightsError
from autoft.task import Task
from autoft.zoo import get_backbone, torchvision_models

# --- 1. torchvision weights: verified, never unpickled -------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _plant_payload(path: Path, marker: Path) -> str:
    torch.save({"conv1.weight": torch.zeros(1), "fc": _Payload(marker)}, path)
    assert not marker.exists()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rename_weights(monkeypatch, name: str, digest: str) -> str:
    """Point ``name``'s torchvision weights record at a file called ``<name>-<digest[:8]>.pth``."""
    weights = torchvision_models._weights_enum(name)
    url = weights.url.rsplit("/", 1)[0] + f"/{name}-{digest[:8]}.pth"
    monkeypatch.setattr(weights.value, "url", url)
    return url.rsplit("/", 1)[-1]


def test_planted_torchvision_checkpoint_is_refused_unread(torch_home, tmp_path):
    marker = tmp_path / "code-ran"
    planted = torchvision_models.checkpoint_path("resnet18")
    assert planted.parent == torch_home
    digest = _plant_payload(planted, marker)
    expected = planted.name.rsplit("-", 1)[1].split(".")[0]  # resnet18-f37072fd.pth
    assert not digest.startswith(expected)
    with pytest.raises(WeightsError) as err:
        get_backbone("resnet18", pretrained=True)
    msg = str(err.value)
    assert not marker.exists(), "the planted pickle was unpickled"
    assert str(planted) in msg and "sha256" in msg
    assert expected in msg and digest in msg
    assert "not on this machine" not in msg  # not misreported as missing
    assert planted.is_file()  # reported, not silently deleted


def test_checkpoint_with_matching_name_but_pickled_code_is_refused(torch_home, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    tmp = tmp_path / "payload.pth"
    digest = _plant_payload(tmp, marker)
    filename = _rename_weights(monkeypatch, "resnet18", digest)
    tmp.replace(torch_home / filename)
    assert torchvision_models.checkpoint_path("resnet18") == torch_home / filename
    with pytest.raises(WeightsError) as err:
        get_backbone("resnet18", pretrained=True)
    msg = str(err.value)
    assert not marker.exists(), "weights_only=False was used"
    assert str(torch_home / filename) in msg and "weights_only" in msg
    assert "not on this machine" not in msg


def test_full_sha256_record_is_checked_and_still_never_unpickles(tmp_path, monkeypatch):
    from autoft.zoo.weights import WeightsSpec, load_state

    monkeypatch.setenv("AUTOFT_HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    marker = tmp_path / "code-ran"
    planted = tmp_path / "weights" / "net-00000000.th"  # the name's prefix is wrong: the record wins
    digest = _plant_payload(planted, marker)
    with pytest.raises(WeightsError, match="weights_only"):
        load_state(WeightsSpec("https://example.org/net-00000000.th", digest))
    with pytest.raises(WeightsError, match=f"sha256 {digest}, expected sha256 {'1' * 64}"):
        load_state(WeightsSpec("https://example.org/net-00000000.th", "1" * 64))
    planted.replace(tmp_path / "weights" / "net.th")
    with pytest.raises(WeightsError, match="cannot be verified"):  # no record, no prefix in the name
        load_state(WeightsSpec("https://example.org/net.th"))
    assert not marker.exists()


def test_genuine_torchvision_checkpoint_loads(torch_home, tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    tmp = tmp_path / "good.pth"
    torch.save(state, tmp)
    filename = _rename_weights(monkeypatch, "resnet18", hashlib.sha256(tmp.read_bytes()).hexdigest())
    tmp.replace(torch_home / filename)
    bb = get_backbone("resnet18", pretrained=True)
    assert torch.equal(bb.stages[0][0].weight, state["conv1.weight"])
    assert torch.equal(bb.stages[-1].conv2.weight, state["layer4.1.conv2.weight"])


def test_torchvision_download_is_verified_before_it_is_read(torch_home, tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOFT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    marker = tmp_path / "code-ran"
    payload = tmp_path / "payload.pth"
    _plant_payload(payload, marker)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):  # a compromised mirror
        calls.append(url)
        Path(dst).write_bytes(payload.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with pytest.raises(WeightsError) as err:
        get_backbone("resnet18", pretrained=True)
    assert calls == [torchvision_models._weights_enum("resnet18").url]
    assert not marker.exists()
    assert "sha256" in str(err.value) and "discarded" in str(err.value)
    assert list(torch_home.iterdir()) == []


# --- 2. decompression bombs in image folders ------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG header declaring width x height 1-bit grey pixels, with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _two_classes(root: Path) -> None:
    from PIL import Image

    for cls in ("ants", "bees"):
        (root / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), (i, 50, 100)).save(root / cls / f"ok{i}.png")


def test_decompression_bomb_is_skipped_and_named(tmp_path):
    _two_classes(tmp_path)
    bomb = tmp_path / "ants" / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    assert bomb.stat().st_size < 200
    data = load_image_folder(tmp_path)
    assert len(data) == 4
    notes = " | ".join(data.notes)
    assert "bomb.png (900000000 pixels)" in notes and "skipped 1 image(s)" in notes


def test_image_above_default_pixel_limit_is_skipped_before_decoding(tmp_path):
    _two_classes(tmp_path)
    big = tmp_path / "bees" / "big.png"
    _png_header_only(big, 10000, 10000)  # 100 M pixels: PIL itself only warns
    assert 10000 * 10000 > DEFAULT_MAX_IMAGE_PIXELS
    data = load_image_folder(tmp_path)
    assert len(data) == 4
    notes = " | ".join(data.notes)
    assert "big.png" in notes and "10000x10000" in notes and "max_image_pixels" in notes


def test_pixel_limit_is_configurable_from_the_task_file(tmp_path):
    from PIL import Image

    _two_classes(tmp_path)
    Image.new("RGB", (40, 40)).save(tmp_path / "bees" / "large.png")  # 1600 pixels
    assert len(load_image_folder(tmp_path)) == 5
    small = load_image_folder(tmp_path, max_image_pixels=1000)
    assert len(small) == 4 and "large.png (40x40)" in " | ".join(small.notes)

    task = Task.model_validate({"name": "t", "modality": "image",
                                "data": {"source": "image_folder", "path": str(tmp_path),
                                         "max_image_pixels": 1000}})
    assert task.data.max_image_pixels == 1000
    assert len(task.load_data()) == 4
    default = Task.model_validate({"name": "t", "modality": "image",
                                   "data": {"source": "image_folder", "path": str(tmp_path)}})
    assert default.data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(Exception, match="max_image_pixels"):
        Task.model_validate({"name": "t", "modality": "image",
                             "data": {"source": "image_folder", "path": "x", "max_image_pixels": 0}})


def test_pixel_limit_does_not_use_or_change_pils_global_limit(tmp_path, monkeypatch):
    from PIL import Image

    _two_classes(tmp_path)
    _png_header_only(tmp_path / "ants" / "big.png", 10000, 10000)
    before = Image.MAX_IMAGE_PIXELS
    data = load_image_folder(tmp_path, max_image_pixels=500)  # 20x20 images load
    assert len(data) == 4 and Image.MAX_IMAGE_PIXELS == before
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own check off: ours still holds
    data = load_image_folder(tmp_path)
    assert len(data) == 4 and "big.png (10000x10000)" in " | ".join(data.notes)
    with pytest.raises(DataError, match=r"no readable images.*5 declare more than 10 pixels.*max_image_pixels"):
        load_image_folder(tmp_path, max_image_pixels=10)


# --- 3. the feature cache deletes only its own files ---------------------------------------------

def test_cache_eviction_spares_files_it_did_not_write(tmp_path):
    mine = {"notes.pt": b"user notes", "model.pt": b"x" * 300_000, "abc.pt": b"y",
            ".hidden.pt": b"z", "backup.tmp": b"keep me"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, (1000, 1000))  # older than anything the cache writes (and than 1 h)
    one = torch.zeros(64 * 1024)  # 256 KiB
    disk = DiskCache(tmp_path, max_bytes=int(1.5 * one.nelement() * one.element_size()) + 4096)
    for i in range(3):
        disk.put(f"k{i}", one + i)
    assert disk.evictions >= 2
    assert disk.path("k2").exists() and not disk.path("k0").exists()
    assert [p.name for _, _, p in disk.entries()] == [disk.path("k2").name]
    disk.clear()
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data, name


# --- 4. split errors name the label ---------------------------------------------------------------

def test_split_error_names_the_class_label():
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match=r"class 'spam' has only 2 example\(s\)"):
        stratified_split(labels, source="sms.csv", class_names=["ham", "spam"])
    with pytest.raises(DataError, match=r"class 'spam' has 2 examples; few-shot"):
        stratified_split(labels, train_per_class=4, class_names=["ham", "spam"])


def test_task_split_error_names_the_class_label(tmp_path):
    csv = tmp_path / "sms.csv"
    csv.write_text("text,label\n" + "".join(f"hello {i},ham\n" for i in range(10)) + "win,spam\nprize,spam\n")
    task = Task.model_validate({"name": "t", "modality": "text", "data": {"source": "csv", "path": str(csv)}})
    with pytest.raises(DataError, match=r"class 'spam' has only 2"):
        task.prepare()
