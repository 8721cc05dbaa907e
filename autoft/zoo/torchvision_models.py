"""torchvision ImageNet classifiers: torchvision's architectures and weights records.

Weights load from ``$TORCH_HOME/hub/checkpoints`` (torchvision's cache); offline without the
file, a :class:`WeightsError` says which file to put where.  autoft reads the file itself, never
through ``torch.hub`` (which unpickles with ``weights_only=False`` and hash-checks only what it
downloads): the file's sha256 must start with the prefix in its name (``resnet18-f37072fd.pth``)
before it is read, and it is read with ``torch.load(..., weights_only=True)`` (see
:mod:`autoft.zoo.weights`).  Stages: the stem, then every residual / inverted-residual / ConvNeXt
block, then (where the network has one) its last conv or norm layer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoft.errors import WeightsError
from autoft.home import offline
from autoft.zoo.base import Backbone, BackboneSpec, Preprocessing
from autoft.zoo.weights import WeightsSpec, load_state

MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "convnext_tiny")


def _weights_enum(name: str):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def checkpoint_dir() -> Path:
    """torchvision's cache folder, ``$TORCH_HOME/hub/checkpoints`` (read when called)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_spec(name: str) -> WeightsSpec:
    """The download URL and, through the hash prefix in its file name, the sha256 to check."""
    return WeightsSpec(_weights_enum(name).url, folder=checkpoint_dir,
                       hint="or set TORCH_HOME to a folder whose hub/checkpoints/ holds it")


def checkpoint_path(name: str) -> Path:
    return weights_spec(name).local_path()


def _load_pretrained(name: str, net: nn.Module) -> None:
    spec = weights_spec(name)
    state = load_state(spec)  # hash-checked, then torch.load(weights_only=True)
    if not isinstance(state, dict):
        raise WeightsError(f"{spec.local_path()} is not a state dict (it holds a {type(state).__name__})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{spec.local_path()} does not match torchvision's {name}: {exc}") from None


def _flatten_blocks(seq: nn.Sequential) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in seq:
        out.extend(list(m) if isinstance(m, nn.Sequential) and len(m) and not _is_leaf_seq(m) else [m])
    return out


def _is_leaf_seq(m: nn.Sequential) -> bool:
    """A Sequential of plain layers (conv/norm/act) is one stage, not a list of blocks."""
    return any(isinstance(c, (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)) for c in m.children()) or \
        type(m).__name__ in ("Conv2dNormActivation",)


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def build(name: str, pretrained: bool = True) -> Backbone:
    import torchvision

    weights = _weights_enum(name) if pretrained else None
    if pretrained and not checkpoint_path(name).is_file() and offline():
        raise WeightsError(_missing_message(name))
    # the architecture alone (torchvision's weights= path would load through torch.hub), same
    # definition as with weights: for these models the weights only fix num_classes=1000
    net = torchvision.models.get_model(name, weights=None)
    if pretrained:
        _load_pretrained(name, net)
    if name.startswith("resnet"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [stem, *net.layer1, *net.layer2, *net.layer3, *net.layer4]
        width = net.fc.in_features
    elif name.startswith("convnext"):
        stages = _flatten_blocks(net.features)
        # the classifier's LayerNorm2d belongs to the feature extractor; torchvision applies it
        # *after* global pooling (LN of the mean is not the mean of LN), so the last stage pools too
        stages.append(nn.Sequential(net.avgpool, net.classifier[0]))
        width = net.classifier[2].in_features
    else:  # mobilenet_v3_*, efficientnet_*
        stages = _flatten_blocks(net.features)
        width = stages[-1].out_channels if hasattr(stages[-1], "out_channels") else \
            net.classifier[0].in_features
    size = 224
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if weights is not None:
        tr = weights.transforms()
        size = int(tr.crop_size[0])
        mean, std = tuple(tr.mean), tuple(tr.std)
    pre = Preprocessing(modality="image", input_size=size, mean=mean, std=std)
    meta = {"weights": str(weights) if weights is not None else None}
    if weights is not None:
        meta["imagenet_top1"] = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return Backbone(name, stages, _Pool(), width, pre, meta)


def _missing_message(name: str) -> str:
    w = _weights_enum(name)
    return (f"torchvision weights for '{name}' are not on this machine: expected "
            f"{checkpoint_path(name)}. Download {w.url} into that folder (or set TORCH_HOME to a "
            "folder whose hub/checkpoints/ holds it).")


def specs() -> list[BackboneSpec]:
    return [BackboneSpec(name=n, family="torchvision", modality="image",
                         builder=lambda pretrained=True, n=n: build(n, pretrained),
                         available=lambda n=n: checkpoint_path(n).is_file(),
                         description=f"torchvision {n} (ImageNet-1K)") for n in MODELS]
