"""The backbone zoo: every backbone as an ordered list of stages (see :mod:`autoft.zoo.base`).

Records (:mod:`autoft.zoo._api`) say where each backbone's weights come from, how its inputs are
prepared and its metadata, without building it.  Families:

* ``resnet20`` ... ``resnet56``: CIFAR-10 ResNets (:mod:`autoft.zoo.cifar_resnet`);
* every torchvision classifier by its torchvision name (:mod:`autoft.zoo.torchvision_models`);
* ``timm:<model name>``: any timm model of a supported family (:mod:`autoft.zoo.timm_models`,
  needs the optional ``timm`` package);
* Hugging Face text encoders: ``minilm``, ``hf:<hub name>`` or a folder holding ``config.json``
  (:mod:`autoft.zoo.hf_text`; BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2/v3, ModernBERT);
* local checkpoints declared in a zoo file (``./zoo.yaml`` or ``$AUTOFT_ZOO``), and the built-in
  ImageNet checkpoints of ``$AUTOFT_HOME/weights/imagenet`` (:mod:`autoft.zoo.local`).

``get_backbone(name)`` builds one (pretrained); ``get_record(name)`` / ``describe_backbones()``
describe them without building anything.
"""
from __future__ import annotations

from autoft.zoo import cifar_resnet, hf_text, local, timm_models, torchvision_models  # noqa: F401 (registration)
from autoft.zoo._api import (BackboneRecord, ImagePreset, TextPreset, WeightsSource, describe_backbones, get_record,
                             list_records, register, register_backbone, register_resolver)
from autoft.zoo.base import Backbone, Preprocessing
from autoft.zoo.local import zoo_files

BackboneSpec = BackboneRecord  # the former name
get_spec = get_record

__all__ = ["Backbone", "BackboneRecord", "BackboneSpec", "ImagePreset", "Preprocessing", "TextPreset",
           "WeightsSource", "describe_backbones", "get_backbone", "get_preset", "get_record", "get_spec",
           "list_backbones", "register", "register_backbone", "register_resolver", "zoo_files"]


def list_backbones() -> list[BackboneRecord]:
    """The listed records (built-in names, zoo files, and names resolved so far)."""
    return list_records()


def get_backbone(name: str, pretrained: bool = True) -> Backbone:
    return get_record(name).build(pretrained=pretrained)


def get_preset(name: str) -> ImagePreset | TextPreset:
    """The preprocessing preset of backbone ``name`` (for ``torchvision.transforms.v2`` pipelines:
    ``get_preset(name).transforms()``), without building it."""
    return get_record(name).complete().preset
