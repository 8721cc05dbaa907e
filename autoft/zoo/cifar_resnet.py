"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, option-A shortcuts).

Written to match the published state-dict keys of akamaster/pytorch_resnet_cifar10
(``module.conv1.weight``, ``module.layerS.I.convJ.weight``, ...).  Stages: the stem
(conv-bn-relu) then each residual block, so ResNet-(6n+2) has 3n + 1 stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoft.errors import WeightsError
from autoft.zoo._api import ImagePreset, WeightsSource, register_backbone
from autoft.zoo.base import Backbone, Preprocessing
from autoft.zoo.weights import WeightsSpec, load_state, read_state_file

_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
WEIGHTS: dict[int, WeightsSpec] = {
    20: WeightsSpec(_BASE + "resnet20-12fca82f.th",
                    "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
                    {"cifar10_top1": 91.25}),
    32: WeightsSpec(_BASE + "resnet32-d509ac18.th",
                    "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
                    {"cifar10_top1": 92.49}),
    44: WeightsSpec(_BASE + "resnet44-014dd654.th",
                    "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
                    {"cifar10_top1": 92.83}),
    56: WeightsSpec(_BASE + "resnet56-4bfd9763.th",
                    "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
                    {"cifar10_top1": 93.39}),
}
PRESET = ImagePreset(crop_size=32, resize_size=None, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225))
PREPROCESSING = Preprocessing.from_preset(PRESET)
LICENCE = "BSD-2-Clause (akamaster/pytorch_resnet_cifar10)"


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the channels."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Stem(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class CifarResNet(nn.Module):
    """The published module tree (so that ``load_state_dict`` matches key for key)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def blocks(self) -> list[nn.Module]:
        return [*self.layer1, *self.layer2, *self.layer3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for block in self.blocks():
            out = block(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_published(depth: int) -> tuple[CifarResNet, dict]:
    """The published network with its weights, and the checkpoint's metadata (``best_prec1``)."""
    spec = WEIGHTS[depth]
    return _from_checkpoint(depth, load_state(spec), str(spec.local_path()))


def _from_checkpoint(depth: int, ckpt, where: str) -> tuple[CifarResNet, dict]:
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and "conv1.weight" in {
            k.removeprefix("module.") for k in ckpt}:
        ckpt = {"state_dict": ckpt}  # a bare state dict (a local checkpoint)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{where} is not a CIFAR ResNet checkpoint (no 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    net = CifarResNet(depth)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{where} does not match ResNet-{depth}: {exc}") from None
    meta = {k: (float(v) if torch.is_tensor(v) else v) for k, v in ckpt.items() if k != "state_dict"}
    return net, meta


def split(net: CifarResNet) -> tuple[list[nn.Module], nn.Module, int]:
    """Stages (stem, then each residual block), the pool, the feature width."""
    return [Stem(net.conv1, net.bn1), *net.blocks()], GlobalAvgPool(), 64


def build(depth: int, pretrained: bool = True) -> Backbone:
    if pretrained:
        net, meta = load_published(depth)
    else:
        net, meta = CifarResNet(depth), {}
    meta = {**WEIGHTS[depth].meta, **meta, "weights": WEIGHTS[depth].filename if pretrained else None}
    stages, pool, width = split(net)
    return Backbone(f"resnet{depth}", stages, pool, width, PREPROCESSING, meta)


def build_from_file(depth: int, path, sha256: str, name: str, preprocessing: Preprocessing | None = None,
                    pretrained: bool = True, **backbone_kwargs) -> Backbone:
    """A CIFAR ResNet with the weights of a local (verified) checkpoint."""
    from autoft.zoo.weights import verify_file

    if pretrained:
        net, meta = _from_checkpoint(depth, read_state_file(verify_file(path, sha256)), str(path))
    else:
        net, meta = CifarResNet(depth), {}
    stages, pool, width = split(net)
    return Backbone(name, stages, pool, width, preprocessing or PREPROCESSING, meta, **backbone_kwargs)


def _params(depth: int) -> int:
    n = (depth - 2) // 6
    # stem conv + bn, then per block two 3x3 convs + two bns (widths 16, 32, 64)
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += c_in * c * 9 + c * c * 9 + 4 * c
            c_in = c
    return total


def _register(depth: int):
    w = WEIGHTS[depth]
    return register_backbone(
        f"resnet{depth}", family="cifar_resnet", modality="image",
        weights=WeightsSource("url", w.url, w.sha256), preset=PRESET, num_stages=3 * ((depth - 2) // 6) + 1,
        feature_dim=64, num_params=_params(depth), metrics={"CIFAR-10 acc@1": w.meta["cifar10_top1"]},
        licence=LICENCE, available_fn=w.is_available, architecture=f"cifar_resnet:resnet{depth}",
        description=f"CIFAR-10 ResNet-{depth} (He et al. 2016), 32x32 input")


@_register(20)
def resnet20(pretrained: bool = True) -> Backbone:
    return build(20, pretrained)


@_register(32)
def resnet32(pretrained: bool = True) -> Backbone:
    return build(32, pretrained)


@_register(44)
def resnet44(pretrained: bool = True) -> Backbone:
    return build(44, pretrained)


@_register(56)
def resnet56(pretrained: bool = True) -> Backbone:
    return build(56, pretrained)
