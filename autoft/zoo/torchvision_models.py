"""Every torchvision classifier (``torchvision.models.list_models(module=torchvision.models)``).

Names are torchvision's (``resnet50``, ``vit_b_16``, ``swin_t``, ...).  Each record carries the
DEFAULT weights' URL (sha256 = the hash prefix in the file name), their preprocessing preset
(resize, crop, interpolation, mean, std, read from ``weights.transforms``) and reported ImageNet
accuracy; stage counts, feature widths and parameter counts come from a table made by
:func:`compute_metadata` (checked by the tests against every architecture), so nothing is built
to list them.

Weights load from ``$TORCH_HOME/hub/checkpoints`` (torchvision's cache); offline without the file,
a :class:`WeightsError` says which file to put where.  autoft reads the file itself, never through
``torch.hub`` (which unpickles with ``weights_only=False`` and hash-checks only what it
downloads): the file's sha256 must start with the prefix in its name (``resnet18-f37072fd.pth``)
before it is read, and it is read with ``torch.load(..., weights_only=True)`` (see
:mod:`autoft.zoo.weights`).  A local checkpoint of a torchvision architecture is declared in a zoo
file (:mod:`autoft.zoo.local`) and loads through :func:`build_with_state`.

Stages, one generic rule (:func:`split`): each family names the modules its ``forward`` runs up to
the input of its last classification layer (the *trunk*; that layer and the dropout right before
it are left to autoft's head).  Containers of blocks are opened; a new stage starts at every block
(a module with parameters that is not a lone conv/linear/norm layer) and at every conv or linear
layer of a flat layer sequence (VGG, MNASNet's stem); norms, activations, pooling and dropout join
the stage before them; trailing pooling (global average, flatten, class token) is the parameter-free
``pool``.  Family rules: ResNet/ResNeXt/Wide-ResNet, RegNet, MobileNet v2/v3, EfficientNet v1/v2,
MNASNet, ShuffleNet v2, SqueezeNet (its classifier is a 1x1 conv: features are pooled before it),
VGG, AlexNet (the pretrained fc6/fc7 layers are stages), DenseNet (each dense layer is a stage:
the state is the concatenation so far), GoogLeNet and Inception v3 (auxiliary heads are not
part of the backbone; the input transform of their pretrained weights is the stem's first step),
ViT (stem = patch embedding + class token + position embedding; each encoder block a stage), Swin
v1/v2 and MaxViT (each block a stage; patch merging layers are stages of their own).
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from autoft.errors import WeightsError
from autoft.home import offline
from autoft.zoo._api import (BackboneRecord, ImagePreset, WeightsSource, count_parameters, empty_init,
                             register, register_provider)
from autoft.zoo._torchvision_table import TABLE
from autoft.zoo.base import Backbone, Preprocessing
from autoft.zoo.weights import WeightsSpec, load_state, read_state_file, verify_file


def list_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


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


def preset(name: str) -> ImagePreset:
    """The DEFAULT weights' evaluation preset (torchvision's ``weights.transforms()``)."""
    tr = _weights_enum(name).transforms()
    return ImagePreset(crop_size=int(tr.crop_size[0]), resize_size=int(tr.resize_size[0]),
                       interpolation=tr.interpolation.value, mean=tuple(tr.mean), std=tuple(tr.std))


# --- the architecture --------------------------------------------------------------------------------

def arch_kwargs(name: str) -> dict:
    """Constructor arguments that torchvision's builder sets when it loads the DEFAULT weights (the
    architecture must be the same with and without weights, so exports rebuild it)."""
    w = _weights_enum(name)
    kwargs: dict = {"num_classes": len(w.meta["categories"])}
    if name.startswith("vit_"):
        kwargs["image_size"] = int(w.meta["min_size"][0])
    if name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    return kwargs


def make_net(name: str) -> nn.Module:
    """torchvision's architecture for ``name``, randomly initialised (no weights read)."""
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        return torchvision.models.get_model(name, weights=None, **arch_kwargs(name))


# DenseNet checkpoints keep the pre-0.4 key names ('norm.1'); torchvision renames them on load
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_into(net: nn.Module, state, where: str, name: str) -> None:
    if not isinstance(state, dict):
        raise WeightsError(f"{where} is not a state dict (it holds a {type(state).__name__})")
    if type(net).__name__ == "DenseNet":
        state = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{where} does not match torchvision's {name}: {exc}") from None


# --- the generic split ---------------------------------------------------------------------------------

class Flatten(nn.Flatten):
    """``torch.flatten(x, 1)`` (the global pooling's last step)."""


class GlobalMean(nn.Module):
    """``x.mean([2, 3])`` (ShuffleNet, MNASNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean([2, 3])


class ClassToken(nn.Module):
    """The class token of a ViT: ``x[:, 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class Identity(nn.Module):
    def forward(self, x):
        return x


class TransformInput(nn.Module):
    """GoogLeNet/Inception v3 with their pretrained weights re-normalise ImageNet-normalised inputs
    to mean 0.5 / std 0.5 (``transform_input=True``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x_ch0, x_ch1, x_ch2), 1)


class ViTStem(nn.Module):
    """torchvision ViT up to the first encoder block: patch embedding, class token, position
    embedding, dropout."""

    def __init__(self, net):
        super().__init__()
        self.patch_size, self.image_size, self.hidden_dim = net.patch_size, net.image_size, net.hidden_dim
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.pos_embedding = net.encoder.pos_embedding
        self.dropout = net.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class DenseLayer(nn.Module):
    """One DenseNet layer as a stage: the state is the concatenation of every earlier output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer([x])], 1)


_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_POOLING = (nn.AdaptiveAvgPool2d, nn.Flatten, GlobalMean, ClassToken)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_block(m: nn.Module) -> bool:
    """Starts a stage: a conv/linear layer, or a module with parameters that is not a norm."""
    return isinstance(m, _WEIGHT_LAYERS) or (_has_params(m) and not isinstance(m, _NORMS))


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _WEIGHT_LAYERS + _NORMS) or not _has_params(m)


def _expand(m: nn.Module) -> list[nn.Module]:
    """Open containers of blocks (and flat layer lists with several conv/linear layers)."""
    if type(m).__name__ == "_DenseBlock":
        return [DenseLayer(layer) for layer in m.values()]
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        children = list(m)
        n_weight = sum(isinstance(c, _WEIGHT_LAYERS) for c in children)
        if any(not _is_layer(c) for c in children) or n_weight > 1:
            return [u for c in children for u in _expand(c)]
    return [m]


def group_stages(trunk: list[nn.Module]) -> tuple[list[nn.Module], nn.Module]:
    """The generic rule: the trunk's units → (stages, pool)."""
    units = [u for m in trunk for u in _expand(m)]
    groups: list[list[nn.Module]] = []
    leading: list[nn.Module] = []
    for u in units:
        if _is_block(u):
            groups.append(leading + [u] if not groups else [u])
            leading = []
        elif groups:
            groups[-1].append(u)
        else:
            leading.append(u)
    if not groups:
        raise ValueError("the network has no layer with parameters")
    tail: list[nn.Module] = []
    while len(groups[-1]) > 1 and isinstance(groups[-1][-1], _POOLING):
        tail.insert(0, groups[-1].pop())
    stages = [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]
    pool = Identity() if not tail else tail[0] if len(tail) == 1 else nn.Sequential(*tail)
    return stages, pool


def trunk(net: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The family rule: the modules ``net.forward`` runs up to the final classifier, and that
    classifier layer (a Linear; SqueezeNet's 1x1 conv)."""
    kind = type(net).__name__
    pool, flat = nn.AdaptiveAvgPool2d(1), Flatten()
    if kind == "ResNet":
        return [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4,
                net.avgpool, flat], net.fc
    if kind == "RegNet":
        return [net.stem, net.trunk_output, net.avgpool, flat], net.fc
    if kind == "MobileNetV2":
        return [net.features, pool, flat], net.classifier[-1]
    if kind == "MobileNetV3":  # classifier: Linear, Hardswish, Dropout, Linear
        return [net.features, net.avgpool, flat, net.classifier[0], net.classifier[1]], net.classifier[3]
    if kind == "EfficientNet":
        return [net.features, net.avgpool, flat], net.classifier[-1]
    if kind == "ConvNeXt":  # classifier: LayerNorm2d, Flatten, Linear
        return [net.features, net.avgpool, net.classifier[0], flat], net.classifier[2]
    if kind == "SqueezeNet":  # classifier: Dropout, final 1x1 conv, ReLU, pool
        return [net.features, pool, flat], net.classifier[1]
    if kind == "ShuffleNetV2":
        return [net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5, GlobalMean()], net.fc
    if kind == "MNASNet":
        return [net.layers, GlobalMean()], net.classifier[-1]
    if kind == "VGG":  # classifier: fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8
        return [net.features, net.avgpool, flat, *net.classifier[:5]], net.classifier[6]
    if kind == "AlexNet":  # classifier: Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8
        return [net.features, net.avgpool, flat, *net.classifier[:6]], net.classifier[6]
    if kind == "DenseNet":
        return [net.features, nn.ReLU(), pool, flat], net.classifier
    if kind == "GoogLeNet":
        head = [TransformInput()] if net.transform_input else []
        return [*head, net.conv1, net.maxpool1, net.conv2, net.conv3, net.maxpool2, net.inception3a,
                net.inception3b, net.maxpool3, net.inception4a, net.inception4b, net.inception4c, net.inception4d,
                net.inception4e, net.maxpool4, net.inception5a, net.inception5b, net.avgpool, flat], net.fc
    if kind == "Inception3":
        head = [TransformInput()] if net.transform_input else []
        return [*head, net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
                net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
                net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool,
                flat], net.fc
    if kind == "VisionTransformer":
        pre = [net.heads.pre_logits, net.heads.act] if hasattr(net.heads, "pre_logits") else []
        return [ViTStem(net), *net.encoder.layers, net.encoder.ln, ClassToken(), *pre], net.heads.head
    if kind == "SwinTransformer":
        return [net.features, net.norm, net.permute, net.avgpool, net.flatten], net.head
    if kind == "MaxVit":  # classifier: pool, Flatten, LayerNorm, Linear, Tanh, Linear
        layers = [layer for block in net.blocks for layer in block.layers]
        return [net.stem, *layers, *net.classifier[:5]], net.classifier[5]
    raise WeightsError(f"no stage rule for torchvision architecture {kind}")


def split(net: nn.Module) -> tuple[list[nn.Module], nn.Module, int]:
    """``net`` → (stages, pool, feature width): the generic rule on the family's trunk."""
    modules, classifier = trunk(net)
    stages, pool = group_stages(modules)
    width = classifier.in_features if isinstance(classifier, nn.Linear) else classifier.in_channels
    return stages, pool, int(width)


# --- building -------------------------------------------------------------------------------------

def _missing_message(name: str) -> str:
    w = _weights_enum(name)
    return (f"torchvision weights for '{name}' are not on this machine: expected "
            f"{checkpoint_path(name)}. Download {w.url} into that folder (or set TORCH_HOME to a "
            "folder whose hub/checkpoints/ holds it).")


def _meta(name: str) -> dict:
    w = _weights_enum(name)
    acc = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return {"weights": str(w), "imagenet_top1": acc}


def build(name: str, pretrained: bool = True) -> Backbone:
    if pretrained and not checkpoint_path(name).is_file() and offline():
        raise WeightsError(_missing_message(name))
    # the architecture alone (torchvision's weights= path would load through torch.hub)
    net = make_net(name)
    if pretrained:
        spec = weights_spec(name)
        load_into(net, load_state(spec), str(spec.local_path()), name)  # hash-checked, weights_only
    stages, pool, width = split(net)
    meta = _meta(name) if pretrained else {"weights": None}
    return Backbone(name, stages, pool, width, Preprocessing.from_preset(preset(name)), meta)


def build_with_state(arch: str, name: str, path: Path | None, sha256: str | None, preprocessing: Preprocessing,
                     pretrained: bool = True, state_key: str | None = None, strip_prefix: str = "",
                     meta: dict | None = None, **backbone_kwargs) -> Backbone:
    """torchvision architecture ``arch`` with a local checkpoint (verified against ``sha256``)."""
    net = make_net(arch)
    if pretrained:
        state = read_state_file(verify_file(path, sha256))
        if state_key:
            if not isinstance(state, dict) or state_key not in state:
                raise WeightsError(f"{path} has no '{state_key}' entry (state_dict_key)")
            state = state[state_key]
        if strip_prefix and isinstance(state, dict):
            state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
        load_into(net, state, str(path), arch)
    stages, pool, width = split(net)
    return Backbone(name, stages, pool, width, preprocessing, dict(meta or {}), **backbone_kwargs)


# --- metadata without building -----------------------------------------------------------------------

def compute_metadata(name: str) -> tuple[int, int, int]:
    """(stages, feature width, backbone parameters) of ``name``, from the architecture built with
    its parameters on the meta device (no memory, no weights)."""
    with empty_init():
        net = make_net(name)
    stages, _, width = split(net)
    return len(stages), width, count_parameters(stages)


def table_row(name: str) -> tuple:
    """One row of :data:`autoft.zoo._torchvision_table.TABLE` (see :func:`print_table`)."""
    n, width, params = compute_metadata(name)
    p = preset(name)
    w = _weights_enum(name)
    acc = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return (n, width, params, p.crop_size, p.resize_size, p.interpolation, p.mean, p.std, acc,
            w.meta.get("license"))


def _record(name: str, row: tuple | None) -> BackboneRecord:
    """The record from the table row (no torchvision import), or computed for a model newer than the table."""
    if row is None:
        row = table_row(name)
    n, width, params, crop, resize, interp, mean, std, acc, licence = row
    return BackboneRecord(
        name=name, family="torchvision", modality="image",
        builder=lambda pretrained=True: build(name, pretrained),
        weights=lambda: WeightsSource("url", _weights_enum(name).url),
        preset=ImagePreset(crop_size=crop, resize_size=resize, interpolation=interp, mean=mean, std=std),
        num_stages=n, feature_dim=width, num_params=params,
        metrics={"ImageNet-1K acc@1": acc} if acc is not None else {},
        licence=licence or "BSD-3-Clause (torchvision; weights may carry their own terms)",
        description=f"torchvision {name} (ImageNet-1K)", architecture=f"torchvision:{name}",
        available_fn=lambda: checkpoint_path(name).is_file())


for _name, _row in TABLE.items():
    register(_record(_name, _row))


@register_provider
@functools.lru_cache(maxsize=1)
def _newer_models() -> dict[str, BackboneRecord]:
    """Models of the installed torchvision that the table does not know (asked for only when a name
    is not found or the zoo is listed)."""
    try:
        names = list_models()
    except Exception:
        return {}
    return {n: _record(n, None) for n in names if n not in TABLE}


def print_table() -> None:
    """Print :mod:`autoft.zoo._torchvision_table` for the installed torchvision:
    ``python -c "from autoft.zoo.torchvision_models import print_table; print_table()"``."""
    import torchvision

    print(f'"""Metadata of torchvision {torchvision.__version__.split("+")[0]}\'s classifiers, without building them.\n\n'
          'Made by ``autoft.zoo.torchvision_models.print_table()`` (the tests check it against the installed\n'
          'torchvision).  name: (stages, feature width, backbone parameters, crop, resize, interpolation,\n'
          'mean, std, ImageNet-1K acc@1, licence URL or None)\n"""\n\nTABLE = {')
    for n in list_models():
        print(f"    {n!r}: {table_row(n)!r},")
    print("}")
