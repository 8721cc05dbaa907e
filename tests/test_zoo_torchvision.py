"""torchvision: every classifier by name, one generic stage split, records known without building.

Random weights only (no ImageNet weights of torchvision's own offline): the split is checked
against the network's own forward pass, the metadata table against the installed torchvision.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from autoft.errors import WeightsError
from autoft.zoo import describe_backbones, get_backbone, get_preset, get_record, torchvision_models as tv
from autoft.zoo._api import empty_init
from autoft.zoo._torchvision_table import TABLE
from autoft.zoo.checks import finetune_step, staged_features


def _reference_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the network's own forward feeds its final classifier (SqueezeNet: pooled first)."""
    _, classifier = tv.trunk(net)
    captured = {}
    handle = classifier.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    ref = captured["x"]
    return ref.mean([2, 3]) if ref.dim() == 4 else ref


def _aux_params(net: nn.Module) -> int:
    return sum(p.numel() for n, m in net.named_children() if m is not None and n in ("aux1", "aux2", "AuxLogits")
               for p in m.parameters())


def _check(net: nn.Module, bb, x: torch.Tensor, unfreeze: int | None = None) -> None:
    net.eval()
    ref = _reference_features(net, x)
    feats = staged_features(bb, x)
    assert feats.shape == (len(x), bb.feature_dim)
    assert (feats - ref).abs().max() <= 1e-5
    with torch.no_grad():
        assert torch.allclose(bb.eval()(x), feats, atol=1e-6)
    # every parameter is in exactly one stage; none of the final classifier's (nor the auxiliary heads')
    _, classifier = tv.trunk(net)
    own = sum(p.numel() for p in bb.parameters())
    assert own == sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in classifier.parameters()) \
        - _aux_params(net)
    assert sum(p.numel() for s in bb.stages for p in s.parameters()) == own
    assert not any(True for _ in bb.pool.parameters())
    finetune_step(bb, x, unfreeze=unfreeze)


# By name (torchvision's own definitions, DEFAULT-weights layout), random weights: small inputs
BY_NAME = {"resnet18": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64, "regnet_x_400mf": 64,
           "squeezenet1_1": 64, "shufflenet_v2_x0_5": 64, "mnasnet0_5": 64, "densenet121": 64, "googlenet": 64,
           "convnext_tiny": 64, "inception_v3": 80, "swin_t": 64, "vit_b_32": 224}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_generic_split_equals_forward_by_name(name):
    torch.manual_seed(0)
    bb = get_backbone(name, pretrained=False)
    assert bb.num_stages == get_record(name).num_stages == TABLE[name][0]
    assert bb.feature_dim == get_record(name).feature_dim
    assert bb.preprocessing.image_preset() == get_preset(name)
    size = BY_NAME[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    _check_by_rebuild(name, bb, x)


def _check_by_rebuild(name: str, bb, x: torch.Tensor) -> None:
    """Rebuild the network with the backbone's weights and compare (the backbone keeps no link to it)."""
    net = tv.make_net(name)
    stages, _, _ = tv.split(net)
    # load the backbone's stage tensors into the fresh network's stages (same structure, same order)
    fresh = nn.ModuleList(stages).state_dict()
    mine = bb.stages.state_dict()
    assert list(fresh) == list(mine)
    nn.ModuleList(stages).load_state_dict(mine)
    _check(net, bb, x, unfreeze=2 if name in ("vit_b_32", "swin_t", "convnext_tiny", "inception_v3") else None)


# Small instances of the same classes (the split works on any instance): ViT, Swin v1/v2, MaxViT, VGG
def _small_nets():
    import torchvision.models as M
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    from torchvision.models.vgg import make_layers

    return {
        "vit": (lambda: M.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                                            mlp_dim=32, num_classes=5), 32, 4),
        "vit_pre_logits": (lambda: M.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                       hidden_dim=16, mlp_dim=32, num_classes=5,
                                                       representation_size=12), 32, 4),
        "swin": (lambda: M.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                           window_size=[2, 2], num_classes=5), 32, 6),
        "swin_v2": (lambda: M.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                              window_size=[2, 2], num_classes=5, block=SwinTransformerBlockV2,
                                              downsample_layer=PatchMergingV2), 32, 4),
        "maxvit": (lambda: M.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                    block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=5), 32, 5),
        "vgg_bn": (lambda: _small_vgg(M.VGG(make_layers([8, "M", 16, 16, "M"], batch_norm=True))), 32, 5),
    }


def _small_vgg(net):
    """VGG's classifier is sized for 512 channels (fc6: 25088 x 4096); the same layers, smaller."""
    net.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                   nn.ReLU(True), nn.Dropout(), nn.Linear(32, 5))
    return net


@pytest.mark.parametrize("kind", ["vit", "vit_pre_logits", "swin", "swin_v2", "maxvit", "vgg_bn"])
def test_generic_split_equals_forward_small_instances(kind):
    from autoft.zoo.base import Backbone, Preprocessing

    make, size, n_stages = _small_nets()[kind]
    torch.manual_seed(0)
    net = make().eval()
    stages, pool, width = tv.split(net)
    assert len(stages) == n_stages
    bb = Backbone(kind, stages, pool, width, Preprocessing("image", size, (0.5,) * 3, (0.5,) * 3))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    _check(net, bb, x)


def test_every_torchvision_model_is_registered_and_splits():
    """All 80 classifiers: registered by name, split by the generic rule (built on the meta device:
    no memory, no weights), and the table of records matches the installed torchvision (stages,
    width, parameters, preset, accuracy).  For the smallest model of each architecture class the
    split also runs stage after stage on meta tensors at the preset's crop size (shapes only) and
    gives (N, feature width)."""
    from autoft.zoo._api import count_parameters

    names = sorted(tv.list_models(), key=lambda n: TABLE[n][2])
    assert len(names) >= 80
    seen_classes = set()
    for name in names:
        rec = get_record(name)
        assert rec.family == "torchvision" and rec.architecture == f"torchvision:{name}"
        with empty_init(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = tv.make_net(name)
        stages, pool, width = tv.split(net)
        p = tv.preset(name)
        row = (len(stages), width, count_parameters(stages), p.crop_size, p.resize_size, p.interpolation, p.mean,
               p.std)
        assert TABLE[name][:8] == row, name  # the table is current
        assert (rec.num_stages, rec.feature_dim, rec.num_params, rec.preset) == (row[0], row[1], row[2], p)
        if type(net).__name__ not in seen_classes:
            seen_classes.add(type(net).__name__)
            net.to("meta")
            x = torch.empty(2, 3, p.crop_size, p.crop_size, device="meta")
            for stage in stages:
                x = stage(x)
            assert tuple(pool(x).shape) == (2, width), name
    assert len(seen_classes) == 17  # every family rule ran


def test_records_are_known_without_building(monkeypatch):
    """describe_backbones and the stage count never build a network nor read weights."""
    import autoft.zoo.torchvision_models as mod

    def refuse(*a, **k):
        raise AssertionError("a network was built")

    monkeypatch.setattr(mod, "make_net", refuse)
    rows = {r["name"]: r for r in describe_backbones()}
    assert {"resnet50", "vit_h_14", "swin_v2_b", "mobilenet_v2", "resnet20", "minilm"} <= set(rows)
    assert rows["resnet50"]["stages"] == 17 and rows["resnet50"]["feature_dim"] == 2048
    assert rows["resnet50"]["params_M"] == pytest.approx(23.51, abs=0.01)
    assert rows["vit_h_14"]["stages"] == 33 and rows["vit_h_14"]["feature_dim"] == 1280
    assert rows["resnet50"]["weights_local"] in ("yes", "no") and rows["resnet50"]["weights"].startswith("url:https://")
    from autoft.space import num_stages

    assert num_stages("efficientnet_b0") == 18
    vit = get_record("vit_h_14")
    assert vit.preset.crop_size == 518 and vit.preset.interpolation == "bicubic"
    assert vit.metrics["ImageNet-1K acc@1"] == pytest.approx(88.552)
    assert vit.licence.startswith("https://github.com/facebookresearch/SWAG")


def test_presets_are_torchvisions_own(assets):
    """The preset (resize, crop, interpolation, mean, std) is the weights' own: its v2 pipeline gives
    what torchvision's ``weights.transforms()`` gives on a photo (exactly for PIL images; uint8
    tensors go through resize kernels that round some pixels differently in v1 and v2)."""
    import torchvision
    from PIL import Image

    photo = next((assets / "data" / "hymenoptera" / "train" / "bees").glob("*.jpg"))
    img = Image.open(photo).convert("RGB")
    tensor = torchvision.transforms.functional.pil_to_tensor(img)
    for name, (resize, crop, interp) in {"resnet50": (232, 224, "bilinear"), "efficientnet_b3": (320, 300, "bicubic"),
                                         "inception_v3": (342, 299, "bilinear"), "swin_v2_t": (260, 256, "bicubic")}.items():
        p = get_preset(name)
        assert (p.resize_size, p.crop_size, p.interpolation) == (resize, crop, interp)
        ref = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        assert (p.transforms()(img) - ref(img)).abs().max() < 1e-5
        assert (p.transforms()(tensor) - ref(tensor)).abs().mean() < 0.01
    pre = get_backbone("squeezenet1_1", pretrained=False).preprocessing
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (224, 256, "bilinear")


def test_pretrained_googlenet_layout_loads_strictly(tmp_path, monkeypatch):
    """GoogLeNet/Inception weights hold the auxiliary heads and need transform_input: the
    architecture is built as torchvision builds it for its weights, the checkpoint loads strictly,
    and the backbone starts with the input transform."""
    import hashlib

    torch.manual_seed(0)
    net = tv.make_net("googlenet")
    assert net.transform_input and net.aux1 is not None
    path = tmp_path / "googlenet-x.pth"
    torch.save(net.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    weights = tv._weights_enum("googlenet")
    name = f"googlenet-{digest[:8]}.pth"
    monkeypatch.setattr(weights.value, "url", f"https://example.org/{name}")
    path.replace(tmp_path / "th" / "hub" / "checkpoints" / name)
    bb = get_backbone("googlenet")
    assert isinstance(bb.stages[0][0], tv.TransformInput)
    assert torch.equal(bb.stages[0][1].conv.weight, net.conv1.conv.weight)
    assert bb.meta["imagenet_top1"] == pytest.approx(69.778)


def test_unknown_torchvision_rule_is_named():
    class Odd(nn.Module):
        pass

    with pytest.raises(WeightsError, match="no stage rule for torchvision architecture Odd"):
        tv.split(Odd())
