"""timm backbones (``timm:<model name>``): stages from timm's structure, preset from its pretrained
config, weights through its hub cache (offline, pre-filled, hash-checked).  Random weights."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch

timm = pytest.importorskip("timm")

from autoft.errors import UnknownBackboneError, WeightsError  # noqa: E402
from autoft.zoo import get_backbone, get_preset, get_record, timm_models as tm  # noqa: E402
from autoft.zoo.base import Backbone, Preprocessing  # noqa: E402
from autoft.zoo.checks import finetune_step, staged_features  # noqa: E402

# timm's own small test models and two small real ones: one per supported class
BY_NAME = {"test_resnet": "ResNet", "test_efficientnet": "EfficientNet", "test_convnext": "ConvNeXt",
           "test_vit": "VisionTransformer", "mobilenetv3_small_050": "MobileNetV3", "regnetx_002": "RegNet"}


def _reference(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _classifier_params(model) -> int:
    return sum(p.numel() for p in model.get_classifier().parameters())


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_stages_equal_timms_forward(name):
    torch.manual_seed(0)
    bb = get_backbone(f"timm:{name}", pretrained=False)
    torch.manual_seed(0)
    ref_model = timm.create_model(name, pretrained=False).eval()  # same init → same weights
    assert type(ref_model).__name__ == BY_NAME[name]
    # every parameter in exactly one stage; the classifier's in none
    own = sum(p.numel() for p in bb.parameters())
    assert own == sum(p.numel() for p in ref_model.parameters()) - _classifier_params(ref_model)
    assert sum(p.numel() for s in bb.stages for p in s.parameters()) == own
    assert not any(True for _ in bb.pool.parameters())
    rec = get_record(f"timm:{name}").complete()  # metadata without weights (meta device)
    assert (rec.num_stages, rec.feature_dim, rec.num_params) == (bb.num_stages, bb.feature_dim, own)
    assert bb.preprocessing.image_preset() == rec.preset
    size = rec.preset.crop_size if name == "test_vit" else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = _reference(ref_model, x)
    feats = staged_features(bb, x)
    assert feats.shape == (2, bb.feature_dim) and (feats - ref).abs().max() <= 1e-5
    finetune_step(bb, x, unfreeze=3)
    finetune_step(bb, x)


def test_swin_stages_equal_timms_forward():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                            num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = _reference(model, x)
    classifier = _classifier_params(model)
    total = sum(p.numel() for p in model.parameters())
    stages, pool, width = tm.split(model)
    assert len(stages) == 5  # patch embedding, 2 blocks, (patch merging + block), block with the final norm
    bb = Backbone("swin", stages, pool, width, Preprocessing("image", 32, (0.5,) * 3, (0.5,) * 3))
    assert sum(p.numel() for p in bb.parameters()) == total - classifier
    assert (staged_features(bb, x) - ref).abs().max() <= 1e-5
    finetune_step(bb, x)


def test_preset_is_timms_eval_transform(assets):
    """crop = input size, resize = floor(crop / crop_pct), timm's interpolation, mean and std: the
    same tensors as timm's own eval transform on a photo."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    img = Image.open(next((assets / "data" / "hymenoptera" / "val" / "ants").glob("*.jpg"))).convert("RGB")
    for name in ("resnet18", "vit_tiny_patch16_224", "test_convnext"):
        p = get_preset(f"timm:{name}")
        cfg = resolve_data_config({}, pretrained_cfg=tm.pretrained_cfg(name).to_dict())
        assert p.crop_size == cfg["input_size"][-1] and p.interpolation == cfg["interpolation"]
        assert p.mean == tuple(cfg["mean"]) and p.std == tuple(cfg["std"])
        ref = create_transform(**cfg)(img)
        assert (p.transforms()(img) - ref).abs().max() < 1e-5
    assert get_preset("timm:resnet18").resize_size == 235  # floor(224 / 0.95)


def _fill_hub_cache(root, repo: str, files: dict) -> None:
    base = root / f"models--{repo.replace('/', '--')}"
    rev = "1" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, src in files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, base / "blobs" / digest)
        os.symlink(os.path.relpath(base / "blobs" / digest, snap), snap / name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no URL weights either
    return tmp_path / "hub"


def test_pretrained_weights_from_the_hub_cache_offline(hub_cache, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = timm.create_model("test_resnet", pretrained=False)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    repo = tm.pretrained_cfg("test_resnet").hf_hub_id
    assert not get_record("timm:test_resnet").available()
    with pytest.raises(WeightsError, match="not in the Hugging Face cache"):
        get_backbone("timm:test_resnet")
    _fill_hub_cache(hub_cache, repo, {"model.safetensors": tmp_path / "w.safetensors"})
    assert get_record("timm:test_resnet").available()
    bb = get_backbone("timm:test_resnet")
    first = next(m for m in bb.stages[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(first.weight, next(m for m in src.modules() if isinstance(m, torch.nn.Conv2d)).weight)
    x = torch.randn(2, 3, 64, 64)
    src.eval()
    assert (staged_features(bb, x) - _reference(src, x)).abs().max() <= 1e-5
    # the blob no longer matches its content hash: refused before it is read
    blob = next((hub_cache / f"models--{repo.replace('/', '--')}" / "blobs").iterdir())
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        get_backbone("timm:test_resnet")


def test_unknown_timm_name_suggests_one():
    with pytest.raises(UnknownBackboneError, match="did you mean 'resnet18'"):
        get_record("timm:resnet18x")


def test_unsupported_timm_class_is_named():
    with pytest.raises(WeightsError, match="no stage rule.*supported: ResNet"):
        get_backbone("timm:test_byobnet", pretrained=False)
