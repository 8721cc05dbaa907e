"""The backbone zoo: every backbone as an ordered list of stages (see :mod:`autoft.zoo.base`).

``get_backbone(name)`` builds one (pretrained); ``list_backbones()`` lists the registry.  Besides the
registered names, any local folder with a ``config.json`` (or ``hf:<hub name>``) is loaded as a
Hugging Face text encoder.
"""
from __future__ import annotations

from pathlib import Path

from autoft.errors import UnknownBackboneError, did_you_mean
from autoft.zoo import cifar_resnet, hf_text, torchvision_models
from autoft.zoo.base import Backbone, BackboneSpec, Preprocessing

__all__ = ["Backbone", "BackboneSpec", "Preprocessing", "get_backbone", "get_spec", "list_backbones"]

_REGISTRY: dict[str, BackboneSpec] = {}
for _spec in (*cifar_resnet.specs(), *torchvision_models.specs(), *hf_text.specs()):
    _REGISTRY[_spec.name] = _spec
    for _alias in _spec.aliases:
        _REGISTRY[_alias] = _spec


def list_backbones() -> list[BackboneSpec]:
    seen, out = set(), []
    for spec in _REGISTRY.values():
        if spec.name not in seen:
            seen.add(spec.name)
            out.append(spec)
    return out


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("hf:") or (Path(name).is_dir() and (Path(name) / "config.json").is_file()):
        source = name.removeprefix("hf:")
        return BackboneSpec(name=name, family="hf_text", modality="text",
                            builder=lambda pretrained=True: hf_text.build(source, pretrained),
                            available=lambda: Path(source).is_dir(), description=f"text encoder {source}")
    raise UnknownBackboneError(
        f"unknown backbone '{name}'{did_you_mean(name, _REGISTRY)}. Known: {', '.join(sorted(_REGISTRY))}; "
        "or a folder holding a Hugging Face model (config.json), or 'hf:<hub name>'.")


def get_backbone(name: str, pretrained: bool = True) -> Backbone:
    return get_spec(name).build(pretrained=pretrained)
