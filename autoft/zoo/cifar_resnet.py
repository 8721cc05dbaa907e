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
from autoft.zoo.base import Backbone, BackboneSpec, Preprocessing
from autoft.zoo.weights import WeightsSpec, load_state

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
PREPROCESSING = Preprocessing(modality="image", input_size=32, mean=(0.485, 0.456, 0.406),
                              std=(0.229, 0.224, 0.225), channels=3)


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
    ckpt = load_state(spec)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{spec.local_path()} is not a CIFAR ResNet checkpoint (no 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    net = CifarResNet(depth)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{spec.local_path()} does not match ResNet-{depth}: {exc}") from None
    meta = {k: (float(v) if torch.is_tensor(v) else v) for k, v in ckpt.items() if k != "state_dict"}
    return net, meta


def build(depth: int, pretrained: bool = True) -> Backbone:
    if pretrained:
        net, meta = load_published(depth)
    else:
        net, meta = CifarResNet(depth), {}
    meta = {**WEIGHTS[depth].meta, **meta, "weights": WEIGHTS[depth].filename if pretrained else None}
    stages = [Stem(net.conv1, net.bn1), *net.blocks()]
    return Backbone(f"resnet{depth}", stages, GlobalAvgPool(), 64, PREPROCESSING, meta)


def specs() -> list[BackboneSpec]:
    out = []
    for depth, w in WEIGHTS.items():
        out.append(BackboneSpec(
            name=f"resnet{depth}", family="cifar_resnet", modality="image",
            builder=lambda pretrained=True, d=depth: build(d, pretrained),
            available=w.is_available,
            description=f"CIFAR-10 ResNet-{depth} (He et al. 2016), 32x32 input"))
    return out
