"""Local checkpoints: the built-in ImageNet checkpoints of ``$AUTOFT_HOME/weights/imagenet`` and
backbones users declare in a zoo file (architecture + weights file + sha256 + preprocessing)."""
from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from torch import nn

from autoft.errors import ConfigError, UnknownBackboneError, WeightsError
from autoft.zoo import describe_backbones, get_backbone, get_preset, get_record, local
from autoft.zoo import torchvision_models as tv
from autoft.zoo.checks import finetune_step, staged_features

BUILTIN = {"mobilenet_v2_folded": ("mobilenet_v2", "mobilenet_v2-9dbee5a2.pth"),
           "mobilenet_v3_small_folded": ("mobilenet_v3_small", "mobilenet_v3_small-67f29a29.pth"),
           "squeezenet1_1_folded": ("squeezenet1_1", "squeezenet1_1-2e52c517.pth")}
ANT, BEE = 310, 309  # ImageNet class indices


def _photos(assets, n: int = 12):
    from PIL import Image

    out = []
    for cls in ("ants", "bees"):
        files = sorted((assets / "data" / "hymenoptera" / "val" / cls).glob("*.jpg"))[:n]
        out += [(Image.open(f).convert("RGB"), cls) for f in files]
    return out


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_imagenet_checkpoints(name, assets):
    arch, filename = BUILTIN[name]
    rec = get_record(name)
    assert rec.family == "local" and rec.available() and rec.architecture == f"torchvision:{arch}"
    assert rec.weights_source().sha256 == hashlib.sha256(
        (assets / "weights" / "imagenet" / filename).read_bytes()).hexdigest()
    assert rec.stage_count() == tv.TABLE[arch][0]
    bb = get_backbone(name)
    assert bb.freeze_norm_stats and bb.meta["batchnorm"] == "frozen"
    assert bb.preprocessing.image_preset() == get_preset(name)
    # the same tensors as torchvision's own network with the file loaded strictly
    net = tv.make_net(arch)
    net.load_state_dict(torch.load(assets / "weights" / "imagenet" / filename, weights_only=True))
    net.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _, classifier = tv.trunk(net)
    captured = {}
    classifier.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        net(x)
    ref = captured["x"].mean([2, 3]) if captured["x"].dim() == 4 else captured["x"]
    assert (staged_features(bb, x) - ref).abs().max() <= 1e-5


def test_mobilenet_v2_checkpoint_and_preset_recognise_ants_and_bees(assets):
    """Real weights through the backbone's stages with its own preset (resize 256, crop 224): the
    checkpoint's ImageNet classifier, applied to the pooled features, names most photos right
    (the assets' README measured 17/20 ants and 16/20 bees)."""
    bb = get_backbone("mobilenet_v2_folded").eval()
    state = torch.load(assets / "weights" / "imagenet" / BUILTIN["mobilenet_v2_folded"][1], weights_only=True)
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]})
    tf = get_preset("mobilenet_v2_folded").transforms()
    photos = _photos(assets)
    x = torch.stack([tf(img) for img, _ in photos])
    with torch.no_grad():
        pred = fc(staged_features(bb, x)).argmax(1).tolist()
    right = sum((p == ANT and c == "ants") or (p == BEE and c == "bees") for p, (_, c) in zip(pred, photos))
    assert right >= 16, (right, len(photos))


def test_folded_batch_norm_stays_frozen_while_fine_tuning():
    """Folded checkpoints: batch-norm layers stay in eval mode even in trained stages (batch statistics
    would wreck the features); their weights and biases still train."""
    bb = get_backbone("mobilenet_v3_small_folded")
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bns]
    bb.train()
    assert not any(m.training for m in bns)
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    finetune_step(bb, x)  # every stage
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    assert any(m.weight.requires_grad for m in bns)


def test_builtin_space_uses_them_offline():
    from autoft.space import load_space, num_stages
    from autoft.task import BUILTIN_SPACES

    space = load_space(BUILTIN_SPACES / "imagenet_convnets.yaml")
    assert set(space.backbones) == set(BUILTIN)
    assert all(get_record(b).available() for b in space.backbones)
    assert [num_stages(b) for b in sorted(BUILTIN)] == [19, 14, 9]


# --- zoo files --------------------------------------------------------------------------------------

def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (the working directory) with a zoo.yaml written by the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOFT_ZOO", raising=False)
    return tmp_path


def _write_zoo(folder, backbones: dict) -> None:
    (folder / "zoo.yaml").write_text(yaml.safe_dump({"backbones": backbones}))


PRE = {"resize_size": 72, "crop_size": 64, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}


def test_zoo_file_torchvision_timm_and_cifar_checkpoints(project, assets):
    torch.manual_seed(1)
    net = tv.make_net("resnet18")
    (project / "ckpt").mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, project / "ckpt" / "r18.pth")
    cifar = assets / "weights" / "resnet20-12fca82f.th"
    backbones = {
        "my_resnet": {"architecture": "torchvision:resnet18", "weights": "ckpt/r18.pth",  # relative to zoo.yaml
                      "sha256": _sha(project / "ckpt" / "r18.pth"), "preprocessing": PRE, "state_dict_key": "model",
                      "strip_prefix": "module.", "licence": "mine", "metrics": {"val acc": 0.9}},
        "my_cifar": {"architecture": "cifar_resnet:resnet20", "weights": "${AUTOFT_HOME}/weights/resnet20-12fca82f.th",
                     "sha256": _sha(cifar), "preprocessing": {"crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                     "batchnorm": "frozen"},
    }
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    tnet = timm.create_model("test_convnext")
    from safetensors.torch import save_file

    save_file(tnet.state_dict(), project / "ckpt" / "convnext.safetensors")
    backbones["my_timm"] = {"architecture": "timm:test_convnext", "weights": str(project / "ckpt" / "convnext.safetensors"),
                            "sha256": _sha(project / "ckpt" / "convnext.safetensors"), "preprocessing": PRE}
    _write_zoo(project, backbones)

    rows = {r["name"]: r for r in describe_backbones()}
    assert rows["my_resnet"]["family"] == "local" and rows["my_resnet"]["stages"] == 9
    assert rows["my_resnet"]["weights_local"] == "yes" and rows["my_cifar"]["stages"] == 10
    assert rows["my_timm"]["stages"] == get_record("timm:test_convnext").stage_count()

    bb = get_backbone("my_resnet")
    assert torch.equal(bb.stages[0][0].weight, net.conv1.weight)
    assert bb.preprocessing.image_preset() == get_preset("my_resnet")
    assert (bb.preprocessing.input_size, bb.preprocessing.resize_size, bb.preprocessing.interpolation) == \
        (64, 72, "bicubic")
    assert bb.meta["val acc"] == 0.9 and not bb.freeze_norm_stats
    x = torch.randn(2, 3, 64, 64)
    finetune_step(bb, x, unfreeze=3)

    cb = get_backbone("my_cifar")
    ref = get_backbone("resnet20")
    assert torch.equal(cb.stages[0].conv.weight, ref.stages[0].conv.weight) and cb.freeze_norm_stats
    finetune_step(cb, torch.randn(2, 3, 32, 32))

    tb = get_backbone("my_timm")
    tnet.eval()
    with torch.no_grad():
        tref = tnet.forward_head(tnet.forward_features(x), pre_logits=True)
    assert (staged_features(tb, x) - tref).abs().max() <= 1e-5
    finetune_step(tb, x, unfreeze=2)

    # without weights (an export rebuilds the architecture): the file is not needed
    (project / "ckpt" / "r18.pth").unlink()
    assert get_backbone("my_resnet", pretrained=False).num_stages == 9
    assert not get_record("my_resnet").available()


def test_zoo_file_text_encoder_folder(project):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32)
    model = transformers.AutoModel.from_config(cfg).eval()
    model.save_pretrained(str(project / "tiny-bert"))
    _write_zoo(project, {"tiny_bert": {"architecture": "hf", "weights": "tiny-bert",
                                       "sha256": _sha(project / "tiny-bert" / "model.safetensors"),
                                       "preprocessing": {"max_length": 64}}})
    rec = get_record("tiny_bert")
    assert rec.family == "local" and rec.modality == "text" and rec.complete().num_stages == 3
    bb = get_backbone("tiny_bert")
    assert bb.preprocessing.max_length == 64 and bb.preprocessing.tokenizer == str(project / "tiny-bert")
    ids = torch.randint(1, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    assert (staged_features(bb, (ids, mask)) - (ref * m).sum(1) / m.sum(1)).abs().max() <= 1e-5
    finetune_step(bb, (ids, mask))
    # the declared hash protects the folder's weights
    _write_zoo(project, {"tiny_bert": {"architecture": "hf", "weights": "tiny-bert", "sha256": "0" * 64}})
    with pytest.raises(WeightsError, match="sha256"):
        get_backbone("tiny_bert")


def test_wrong_hash_is_refused_unread(project, monkeypatch):
    torch.save(tv.make_net("squeezenet1_1").state_dict(), project / "s.pth")
    _write_zoo(project, {"s": {"architecture": "torchvision:squeezenet1_1", "weights": "s.pth", "sha256": "a" * 64,
                               "preprocessing": PRE}})

    def refuse(*a, **k):
        raise AssertionError("torch.load must not be called on an unverified file")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(WeightsError) as err:
        get_backbone("s")
    assert "a" * 64 in str(err.value) and str(project / "s.pth") in str(err.value)


def test_zoo_file_from_autoft_zoo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    torch.save(tv.make_net("squeezenet1_1").state_dict(), tmp_path / "elsewhere" / "s.pth")
    _write_zoo(tmp_path / "elsewhere", {"far_squeeze": {"architecture": "torchvision:squeezenet1_1",
                                                        "weights": "s.pth", "sha256": _sha(tmp_path / "elsewhere" / "s.pth"),
                                                        "preprocessing": PRE}})
    with pytest.raises(UnknownBackboneError):
        get_record("far_squeeze")
    monkeypatch.setenv("AUTOFT_ZOO", str(tmp_path / "elsewhere" / "zoo.yaml"))
    assert get_backbone("far_squeeze").num_stages == 9
    assert local.zoo_files() == [(tmp_path / "elsewhere" / "zoo.yaml").resolve()]


@pytest.mark.parametrize("decl, field, message", [
    ({"architecture": "torchvision:mobilenet_v9", "weights": "x.pth", "sha256": "a" * 64, "preprocessing": PRE},
     "architecture", "did you mean 'mobilenet_v2'"),
    ({"architecture": "keras:resnet", "weights": "x.pth", "sha256": "a" * 64, "preprocessing": PRE},
     "architecture", "torchvision:<name>"),
    ({"architecture": "torchvision:resnet18", "weights": "x.pth", "sha256": "a" * 64}, "preprocessing", "crop_size"),
    ({"architecture": "torchvision:resnet18", "weights": "x.pth", "sha256": "abc", "preprocessing": PRE},
     "sha256", "64 hex"),
    ({"architecture": "torchvision:resnet18", "weights": "x.pth", "sha256": "a" * 64,
      "preprocessing": {**PRE, "interpolation": "lanczos"}}, "preprocessing.interpolation", "bilinear"),
    ({"architecture": "torchvision:resnet18", "weights": "x.pth", "sha256": "a" * 64, "preprocessing": PRE,
      "batchnrom": "frozen"}, "batchnrom", "Extra inputs"),
])
def test_zoo_file_errors_name_the_file_and_field(project, decl, field, message):
    _write_zoo(project, {"bad": decl})
    with pytest.raises(ConfigError) as err:
        get_record("bad")
    msg = str(err.value)
    assert "zoo.yaml" in msg and f"backbones.bad.{field}" in msg and message in msg, msg


def test_zoo_names_cannot_shadow_builtins(project):
    _write_zoo(project, {"resnet18": {"architecture": "torchvision:resnet18", "weights": "x.pth", "sha256": "a" * 64,
                                      "preprocessing": PRE}})
    with pytest.raises(ConfigError, match="'resnet18' is a built-in backbone"):
        describe_backbones()


def test_unknown_name_suggests_zoo_and_builtin_names(project):
    with pytest.raises(UnknownBackboneError, match="did you mean 'mobilenet_v2_folded'"):
        get_record("mobilenet_v2_foldd")
    with pytest.raises(UnknownBackboneError, match="timm:<model name>"):
        get_record("no-such-backbone")
