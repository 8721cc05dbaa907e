"""Local checkpoints: backbones declared in a zoo file (architecture + weights file + sha256 + preprocessing).

A zoo file is YAML with one ``backbones:`` mapping; each key is the name search spaces use::

    backbones:
      ants_mobilenet:                                   # the name, e.g. backbone: [ants_mobilenet, resnet18]
        architecture: torchvision:mobilenet_v2          # torchvision:<name> | timm:<name> | cifar_resnet:resnet20 | hf
        weights: ${AUTOFT_HOME}/weights/mine/mobilenet_v2-9dbee5a2.pth   # relative paths: from this file's folder
        sha256: 9dbee5a269d4c111325dea79202865ee9b345be33dea6ac9cabe5f925a567041
        preprocessing: {resize_size: 256, crop_size: 224, interpolation: bilinear,
                        mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
        batchnorm: frozen          # optional: batch-norm layers always in eval mode (folded checkpoints)
        state_dict_key: model      # optional: the state dict is this entry of the file
        strip_prefix: "module."    # optional: removed from every key (DataParallel checkpoints)
        description: my fine-tuned MobileNet   # optional, as are licence and metrics
      my_bert:
        architecture: hf                              # a Hugging Face text encoder folder
        weights: ./models/my-bert                     # the folder (config.json, tokenizer, weights)
        sha256: <sha256 of model.safetensors>         # or {file name: sha256, ...} for shards
        preprocessing: {max_length: 256}

Where autoft looks: the file named by ``AUTOFT_ZOO``, and ``./zoo.yaml`` (the folder autoft runs in,
like ``./tasks`` and ``./search_spaces``); both when both exist.  Every process that resolves a
backbone name (search, workers, export) reads them, so give workers the same ``AUTOFT_ZOO`` or
working folder.  A zoo name may not shadow a built-in name.  Weights are read only after their
sha256 matched, with safetensors or ``torch.load(weights_only=True)``.

Built in (same format, :data:`BUILTIN_ZOO`): three ImageNet checkpoints of torchvision
architectures shipped with the offline assets under ``${AUTOFT_HOME}/weights/imagenet``
(``mobilenet_v2_folded``, ``mobilenet_v3_small_folded``, ``squeezenet1_1_folded``).  They were
recovered from int8 models with batch norm folded into the convolutions, so they fine-tune with
batch-norm statistics frozen (``batchnorm: frozen``).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autoft.errors import ConfigError, did_you_mean
from autoft.zoo._api import (INTERPOLATIONS, BackboneRecord, ImagePreset, TextPreset, WeightsSource, _REGISTRY,
                             _ALIASES, expand_path, get_record, register, register_provider)
from autoft.zoo.base import Backbone, Preprocessing

ZOO_ENV = "AUTOFT_ZOO"
ZOO_FILE = "zoo.yaml"
ARCH_PREFIXES = ("torchvision:", "timm:", "cifar_resnet:")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagePre(_Model):
    crop_size: int = Field(ge=1)
    resize_size: int | None = Field(None, ge=1)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TextPre(_Model):
    max_length: int = Field(128, ge=8, le=8192)
    tokenizer: str | None = None  # default: the model folder


class Entry(_Model):
    architecture: str
    weights: str
    sha256: str | dict[str, str]
    preprocessing: dict | None = None
    batchnorm: Literal["train", "frozen"] = "train"
    state_dict_key: str | None = None
    strip_prefix: str = ""
    description: str = ""
    licence: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        if v != "hf" and not v.startswith(ARCH_PREFIXES):
            raise ValueError(f"architecture must be one of {', '.join(p + '<name>' for p in ARCH_PREFIXES)} or "
                             f"'hf' (a text encoder folder), got {v!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v):
        import re

        for h in (v.values() if isinstance(v, dict) else [v]):
            if not re.fullmatch(r"[0-9a-fA-F]{64}", str(h)):
                raise ValueError(f"sha256 must be the file's full sha256 (64 hex digits, e.g. from 'sha256sum'), "
                                 f"got {h!r}")
        return v


# the three offline ImageNet checkpoints (see /work/shared/assets/README.md): torchvision
# architectures, batch norm folded, each with the preprocessing it was evaluated with
BUILTIN_ZOO = """
backbones:
  mobilenet_v2_folded:
    architecture: torchvision:mobilenet_v2
    weights: ${AUTOFT_HOME}/weights/imagenet/mobilenet_v2-9dbee5a2.pth
    sha256: 9dbee5a269d4c111325dea79202865ee9b345be33dea6ac9cabe5f925a567041
    preprocessing: {resize_size: 256, crop_size: 224, interpolation: bilinear,
                    mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    batchnorm: frozen
    description: ImageNet MobileNetV2 recovered from torchvision's int8 model (pytorch/ios-demo-app), batch norm folded
    licence: BSD-style
    metrics: {ImageNet-1K acc@1: 71.658}
  mobilenet_v3_small_folded:
    architecture: torchvision:mobilenet_v3_small
    weights: ${AUTOFT_HOME}/weights/imagenet/mobilenet_v3_small-67f29a29.pth
    sha256: 67f29a29a2357eff364a907649ccb305a68d9b0b16c52f88618f406d86a92b98
    preprocessing: {resize_size: 256, crop_size: 224, interpolation: bilinear,
                    mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    batchnorm: frozen
    description: ImageNet MobileNetV3-Small (TF-slim, from an int8 TFLite model of weilly0912/ATU_Model_Zoo), batch norm folded
    licence: MIT
  squeezenet1_1_folded:
    architecture: torchvision:squeezenet1_1
    weights: ${AUTOFT_HOME}/weights/imagenet/squeezenet1_1-2e52c517.pth
    sha256: 2e52c5175dffc7cfbf0b00b2d96bb7ff949c4c2864b9f6ff7bff6a3143270f77
    preprocessing: {resize_size: 256, crop_size: 224, interpolation: bilinear,
                    mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    batchnorm: frozen
    description: ImageNet SqueezeNet 1.1 (from an int8 TFLite model of weilly0912/ATU_Model_Zoo), batch norm folded
    licence: MIT
    metrics: {ImageNet-1K acc@1: 59.9}
"""


# --- parsing ------------------------------------------------------------------------------------

def _error(exc: ValidationError, file: str, name: str) -> ConfigError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return ConfigError(err["msg"].removeprefix("Value error, "), file=file, field=f"backbones.{name}.{loc}".rstrip("."))


def parse_zoo(doc: Any, file: str, base: Path | None) -> dict[str, BackboneRecord]:
    """A zoo document → records (not registered)."""
    if not isinstance(doc, dict) or set(doc) != {"backbones"} or not isinstance(doc["backbones"], dict):
        extra = did_you_mean(next(iter(doc), ""), ["backbones"]) if isinstance(doc, dict) and doc else ""
        raise ConfigError(f"a zoo file holds one mapping 'backbones:' (name: declaration){extra}", file=file)
    out = {}
    for name, spec in doc["backbones"].items():
        name = str(name)
        if not name or any(c.isspace() for c in name) or name.startswith(("timm:", "hf:")):
            raise ConfigError(f"backbone name {name!r} must be non-empty, without spaces and without a "
                              "timm:/hf: prefix", file=file, field=f"backbones.{name}")
        if not isinstance(spec, dict):
            raise ConfigError("a declaration is a mapping (architecture, weights, sha256, preprocessing, ...)",
                              file=file, field=f"backbones.{name}")
        try:
            entry = Entry.model_validate(spec)
        except ValidationError as exc:
            raise _error(exc, file, name) from None
        out[name] = entry_record(name, entry, file, base)
    return out


def _preset(entry: Entry, file: str, name: str, text: bool) -> ImagePreset | TextPreset | None:
    pre = entry.preprocessing
    try:
        if text:
            p = TextPre.model_validate(pre or {})
            return TextPreset(p.tokenizer, p.max_length)
        if pre is None:
            raise ConfigError("an image backbone needs 'preprocessing' (crop_size, mean, std; resize_size and "
                              f"interpolation ({'/'.join(INTERPOLATIONS)}) optional): the weights' own preset",
                              file=file, field=f"backbones.{name}.preprocessing")
        p = ImagePre.model_validate(pre)
        return ImagePreset(crop_size=p.crop_size, resize_size=p.resize_size, interpolation=p.interpolation,
                           mean=p.mean, std=p.std)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(err["msg"], file=file, field=f"backbones.{name}.preprocessing.{loc}") from None
    except ValueError as exc:  # ImagePreset's own checks (resize below crop, ...)
        raise ConfigError(str(exc), file=file, field=f"backbones.{name}.preprocessing") from None


def entry_record(name: str, entry: Entry, file: str, base: Path | None) -> BackboneRecord:
    """The record of one declaration; paths are expanded when used (AUTOFT_HOME may change)."""
    arch = entry.architecture
    text = arch == "hf"
    preset = _preset(entry, file, name, text)

    def path() -> Path:
        return expand_path(entry.weights, base, file, f"backbones.{name}.weights")

    if isinstance(entry.sha256, dict) and not text:
        raise ConfigError("sha256 is one hash for an image checkpoint file", file=file, field=f"backbones.{name}.sha256")
    sha = entry.sha256.lower() if isinstance(entry.sha256, str) else {k: v.lower() for k, v in entry.sha256.items()}
    common = dict(description=entry.description or f"{arch} from {entry.weights}", licence=entry.licence,
                  metrics=dict(entry.metrics), weights=WeightsSource("file", entry.weights, sha if isinstance(sha, str)
                                                                     else None))
    if text:
        from autoft.zoo import hf_text

        rec = hf_text.folder_record(name, None, how="declared", sha256=sha, family="local", folder_fn=path,
                                    max_length=preset.max_length, **common)
        if preset.tokenizer:
            tok = preset.tokenizer
            build = rec.builder

            def builder(pretrained: bool = True) -> Backbone:
                bb = build(pretrained)
                bb.preprocessing = Preprocessing(modality="text", tokenizer=str(expand_path(tok, base)),
                                                 max_length=preset.max_length)
                return bb

            rec.builder = builder
        rec.options = {"file": file}
        return rec

    frozen = entry.batchnorm == "frozen"
    pre = Preprocessing.from_preset(preset)

    def builder(pretrained: bool = True) -> Backbone:
        meta = {"weights": str(path()) if pretrained else None, "sha256": sha if pretrained else None,
                "architecture": arch, **{k: v for k, v in entry.metrics.items()}}
        kwargs = dict(pretrained=pretrained, preprocessing=pre, meta=meta, state_key=entry.state_dict_key,
                      strip_prefix=entry.strip_prefix, freeze_norm_stats=frozen)
        if arch.startswith("torchvision:"):
            from autoft.zoo import torchvision_models as tv

            return tv.build_with_state(arch.removeprefix("torchvision:"), name, path(), sha, **kwargs)
        if arch.startswith("timm:"):
            from autoft.zoo import timm_models as tm

            return tm.build(arch.removeprefix("timm:"), name, path=path(), sha256=sha, **kwargs)
        from autoft.zoo import cifar_resnet

        depth = int(arch.removeprefix("cifar_resnet:resnet"))
        if kwargs["state_key"] or kwargs["strip_prefix"]:
            raise ConfigError("state_dict_key/strip_prefix are not used for CIFAR ResNets (their checkpoints are "
                              "read as published)", file=file, field=f"backbones.{name}")
        return cifar_resnet.build_from_file(depth, path(), sha, name, pre, pretrained, freeze_norm_stats=frozen)

    def lazy(missing: set[str]) -> dict:
        target = arch.removeprefix("cifar_resnet:") if arch.startswith("cifar_resnet:") else \
            arch.removeprefix("torchvision:") if arch.startswith("torchvision:") else arch
        rec = get_record(target).complete()
        return {"num_stages": rec.num_stages, "feature_dim": rec.feature_dim, "num_params": rec.num_params}

    if arch.startswith("cifar_resnet:") and arch.removeprefix("cifar_resnet:") not in ("resnet20", "resnet32",
                                                                                      "resnet44", "resnet56"):
        raise ConfigError(f"unknown CIFAR ResNet {arch!r} (resnet20, resnet32, resnet44, resnet56)", file=file,
                          field=f"backbones.{name}.architecture")
    if arch.startswith("torchvision:"):
        from autoft.zoo import torchvision_models as tv

        tv_name = arch.removeprefix("torchvision:")
        if tv_name not in tv.TABLE and tv_name not in tv.list_models():
            raise ConfigError(f"unknown torchvision model {tv_name!r}{did_you_mean(tv_name, tv.TABLE)}", file=file,
                              field=f"backbones.{name}.architecture")
    return BackboneRecord(name=name, family="local", modality="image", builder=builder, preset=preset,
                          architecture=arch, available_fn=lambda: path().is_file(), lazy=lazy,
                          options={"batchnorm": entry.batchnorm, "file": file}, **common)


# --- zoo files ------------------------------------------------------------------------------------

def zoo_files() -> list[Path]:
    """The zoo files in use: ``$AUTOFT_ZOO`` and ``./zoo.yaml`` (absolute paths, existing ones)."""
    out = []
    env = os.environ.get(ZOO_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"{ZOO_ENV}={env} is not a file (it should name a zoo YAML file)")
        out.append(p.resolve())
    cwd = Path.cwd() / ZOO_FILE
    if cwd.is_file() and cwd.resolve() not in out:
        out.append(cwd.resolve())
    return out


_LOCK = threading.Lock()
_CACHE: dict = {"key": None, "records": {}}


def load_zoo_file(path: Path) -> dict[str, BackboneRecord]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the zoo file ({exc})", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=str(path)) from None
    return parse_zoo(doc, str(path), path.parent)


@register_provider
def zoo_records() -> dict[str, BackboneRecord]:
    """The records of the zoo files (re-read when a file changes)."""
    files = zoo_files()
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    with _LOCK:
        if _CACHE["key"] == key:
            return _CACHE["records"]
        records: dict[str, BackboneRecord] = {}
        for f in files:
            for name, rec in load_zoo_file(f).items():
                if name in _REGISTRY or name in _ALIASES:
                    raise ConfigError(f"'{name}' is a built-in backbone; choose another name", file=str(f),
                                      field=f"backbones.{name}")
                if name in records:
                    raise ConfigError(f"backbone '{name}' is also declared in {records[name].options['file']}",
                                      file=str(f), field=f"backbones.{name}")
                records[name] = rec
        _CACHE["key"], _CACHE["records"] = key, records
        return records


for _rec in parse_zoo(yaml.safe_load(BUILTIN_ZOO), "autoft.zoo.local.BUILTIN_ZOO", None).values():
    register(_rec)
