"""timm models: ``timm:<model name>`` (optionally with its pretrained tag, ``timm:resnet50.a1_in1k``).

Needs the optional ``timm`` package.  Nothing is imported until a ``timm:`` name is used.

* Preprocessing: the model's pretrained config, as timm's own eval transform reads it
  (``timm.data.resolve_data_config``): crop = the input size, resize = floor(crop / crop_pct),
  its interpolation, mean and std.
* Stages, from timm's own structure: the stem, then every block of the model's stage containers
  (``layer1..4`` of ResNet, ``blocks`` of EfficientNet / MobileNetV3 / ViT, ``stages`` of ConvNeXt,
  ``s1..s4`` of RegNet, ``layers`` of Swin; a stage's downsampling layer goes with its first block),
  then the layers ``forward_features`` applies last (a conv head is a stage of its own, a norm joins
  the last block), then timm's ``forward_head(pre_logits=True)`` with the classifier removed
  (``reset_classifier(0)``): a stage when it has parameters (MobileNetV3's conv head, ConvNeXt's
  norm), else the pool.  Supported classes: ResNet, EfficientNet, MobileNetV3, ConvNeXt,
  VisionTransformer, SwinTransformer, RegNet; others are refused by name.
* Weights, through timm's own sources but never read unverified: the Hugging Face hub cache
  (``hf_hub_id``; each file must hash to its content-addressed blob name; downloaded first when the
  network is allowed) or timm's URL (torch hub's cache folder; the hash prefix in the file name);
  read with safetensors or ``torch.load(weights_only=True)``, then handed to timm's loader
  (``pretrained_cfg_overlay={"state_dict": ...}``: its filters and checks apply).  A local file is
  declared in a zoo file (``architecture: timm:<name>``, :mod:`autoft.zoo.local`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from autoft.errors import UnknownBackboneError, WeightsError, did_you_mean
from autoft.home import offline
from autoft.zoo._api import (INTERPOLATIONS, BackboneRecord, ImagePreset, WeightsSource, count_parameters,
                             empty_init, register_resolver)
from autoft.zoo.base import Backbone, Preprocessing
from autoft.zoo.weights import WeightsSpec, load_state, read_state_file, verify_file, verify_hub_blob

PREFIX = "timm:"
SUPPORTED = ("ResNet", "EfficientNet", "MobileNetV3", "ConvNeXt", "VisionTransformer", "SwinTransformer", "RegNet")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm():
    try:
        import timm
    except ImportError:
        raise WeightsError("timm backbones need the 'timm' package: pip install 'autoft[timm]' (or pip install timm)") \
            from None
    return timm


# --- records ------------------------------------------------------------------------------------

def pretrained_cfg(model_name: str):
    """timm's pretrained config for ``model_name`` (with or without a tag); nothing is built."""
    timm = _timm()
    arch = model_name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise UnknownBackboneError(f"unknown timm model '{model_name}'{did_you_mean(arch, timm.list_models())}")
    cfg = timm.models.get_pretrained_cfg(model_name, allow_unregistered=False)
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise UnknownBackboneError(f"timm model '{model_name}' has no pretrained config"
                                   + (f"; its pretrained tags: {', '.join(tags[:10])}" if tags else ""))
    return cfg


def preset_from_cfg(cfg) -> ImagePreset:
    """timm's eval transform for these pretrained weights, as an :class:`ImagePreset`."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    crop = int(data["input_size"][-1])
    resize = max(crop, math.floor(crop / float(data.get("crop_pct") or 1.0)))
    interp = data.get("interpolation", "bilinear")
    return ImagePreset(crop_size=crop, resize_size=resize, interpolation=interp if interp in INTERPOLATIONS else "bicubic",
                       mean=tuple(data["mean"]), std=tuple(data["std"]))


def weights_location(cfg) -> WeightsSource | None:
    if cfg.hf_hub_id:
        return WeightsSource("timm", f"hf-hub:{cfg.hf_hub_id}")
    if cfg.url:
        return WeightsSource("timm", cfg.url)
    return None


def _url_spec(url: str) -> WeightsSpec:
    return WeightsSpec(url, folder=lambda: Path(torch.hub.get_dir()) / "checkpoints",
                       hint="or set TORCH_HOME to a folder whose hub/checkpoints/ holds it (timm's cache)")


def _hub_cached(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for f in HUB_FILES:
        path = try_to_load_from_cache(repo, f)
        if isinstance(path, str):
            return Path(path)
    return None


def weights_available(cfg) -> bool:
    if cfg.hf_hub_id:
        try:
            if _hub_cached(cfg.hf_hub_id) is not None:
                return True
        except ImportError:
            pass
    return bool(cfg.url) and _url_spec(cfg.url).is_available()


def load_pretrained_state(model_name: str, cfg) -> dict:
    """The pretrained state dict, verified before it is read."""
    errors = []
    if cfg.hf_hub_id:
        try:
            path = _hub_cached(cfg.hf_hub_id)
            if path is None and not offline():
                from huggingface_hub import hf_hub_download

                for f in HUB_FILES:
                    try:
                        path = Path(hf_hub_download(cfg.hf_hub_id, f))
                        break
                    except Exception as exc:  # noqa: PERF203 (the next file name)
                        errors.append(f"{cfg.hf_hub_id}/{f}: {type(exc).__name__}")
            if path is not None:
                return read_state_file(verify_hub_blob(path))
            errors.append(f"hub model {cfg.hf_hub_id} is not in the Hugging Face cache (HF_HOME)")
        except ImportError:
            errors.append("huggingface_hub is not installed")
    if cfg.url:
        if not cfg.url.endswith((".pth", ".pt", ".bin", ".safetensors", ".th")):
            errors.append(f"{cfg.url} is not a state-dict file autoft can read")
        else:
            try:
                return load_state(_url_spec(cfg.url))
            except WeightsError as exc:
                errors.append(str(exc))
    if not errors:
        errors.append("its pretrained config names no weights")
    raise WeightsError(f"pretrained weights of timm model '{model_name}' are not available"
                       + (" (downloads are disabled: AUTOFT_OFFLINE/HF_HUB_OFFLINE)" if offline() else "")
                       + ": " + "; ".join(errors))


def make_model(model_name: str, state: dict | None = None) -> nn.Module:
    """timm's model (its pretrained config's class count); ``state`` loaded through timm's loader."""
    timm = _timm()
    if state is None:
        return timm.create_model(model_name, pretrained=False)
    try:
        return timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay={"state_dict": state, "source": "timm", "file": None})
    except RuntimeError as exc:
        raise WeightsError(f"the weights do not match timm's {model_name}: {exc}") from None


# --- stages -------------------------------------------------------------------------------------

class TimmHead(nn.Module):
    """timm's ``forward_head(pre_logits=True)``: pooling and whatever timm puts before the classifier."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._model = [model]  # not registered: the calls go through timm's own method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model[0].forward_head(x, pre_logits=True)


class ViTStem(nn.Module):
    """timm ViT up to the first block: patch embedding, class/register tokens, position embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed, self.pos_drop = model.patch_embed, model.pos_drop
        self.patch_drop, self.norm_pre = model.patch_drop, model.norm_pre
        for name in ("cls_token", "reg_token", "pos_embed"):
            p = getattr(model, name, None)
            if isinstance(p, nn.Parameter):
                setattr(self, name, p)
        self._model = [model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model[0]
        return self.norm_pre(self.patch_drop(m._pos_embed(self.patch_embed(x))))


def _stage_blocks(stage: nn.Module) -> list[nn.Module]:
    """A stage container → its blocks (a downsampling layer goes with the first block)."""
    if hasattr(stage, "downsample") and hasattr(stage, "blocks"):
        blocks = list(stage.blocks)
        if not isinstance(stage.downsample, nn.Identity):
            blocks[0] = nn.Sequential(stage.downsample, blocks[0])
        return blocks
    return list(stage.children())


def _structure(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem modules, blocks, tail modules) of ``forward_features``."""
    kind = type(model).__name__
    if kind == "ResNet":
        return [model.conv1, model.bn1, model.act1, model.maxpool], \
            [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name)], []
    if kind == "EfficientNet":
        return [model.conv_stem, model.bn1], [b for s in model.blocks for b in s], [model.conv_head, model.bn2]
    if kind == "MobileNetV3":
        return [model.conv_stem, model.bn1], [b for s in model.blocks for b in s], []
    if kind == "ConvNeXt":
        return [model.stem], [b for s in model.stages for b in _stage_blocks(s)], [model.norm_pre]
    if kind == "RegNet":
        return [model.stem], [b for name in ("s1", "s2", "s3", "s4") for b in _stage_blocks(getattr(model, name))], \
            [model.final_conv]
    if kind == "SwinTransformer":
        return [model.patch_embed], [b for s in model.layers for b in _stage_blocks(s)], [model.norm]
    if kind == "VisionTransformer":
        return [ViTStem(model)], list(model.blocks), [model.norm]
    raise WeightsError(f"timm model class {kind} has no stage rule in autoft (supported: {', '.join(SUPPORTED)})")


def split(model: nn.Module) -> tuple[list[nn.Module], nn.Module, int]:
    """A timm model → (stages, pool, feature width).  Removes its classifier (``reset_classifier(0)``)."""
    stem, blocks, tail = _structure(model)
    model.reset_classifier(0)
    stages: list[nn.Module] = [stem[0] if len(stem) == 1 else nn.Sequential(*stem), *blocks]
    tail = [m for m in tail if not isinstance(m, nn.Identity)]
    if any(isinstance(m, (nn.Conv2d, nn.Linear)) or any(isinstance(c, (nn.Conv2d, nn.Linear)) for c in m.modules())
           for m in tail):
        stages.append(nn.Sequential(*tail))  # a conv head: a stage of its own
    elif tail:
        stages[-1] = nn.Sequential(stages[-1], *tail)  # a norm joins the last block
    used = {id(m) for s in stages for m in s.modules()}
    # the children forward_features does not run (containers of the blocks above excluded)
    head = {name: m for name, m in model.named_children()
            if m is not None and not any(id(sub) in used for sub in m.modules())}
    head_module = TimmHead(model, head)
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    if any(True for _ in head_module.parameters()):
        return [*stages, head_module], nn.Identity(), width
    return stages, head_module, width


# --- building -----------------------------------------------------------------------------------

def build(model_name: str, name: str, pretrained: bool = True, preprocessing: Preprocessing | None = None,
          path: Path | None = None, sha256: str | None = None, meta: dict | None = None,
          state_key: str | None = None, strip_prefix: str = "", **backbone_kwargs) -> Backbone:
    """``model_name`` with its pretrained weights (or a verified local file ``path``)."""
    cfg = pretrained_cfg(model_name)
    state = None
    if pretrained:
        if path is not None:
            state = read_state_file(verify_file(path, sha256))
            if state_key:
                if not isinstance(state, dict) or state_key not in state:
                    raise WeightsError(f"{path} has no '{state_key}' entry (state_dict_key)")
                state = state[state_key]
            if strip_prefix:
                state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
        else:
            state = load_pretrained_state(model_name, cfg)
    model = make_model(model_name, state)
    stages, pool, width = split(model)
    pre = preprocessing or Preprocessing.from_preset(preset_from_cfg(cfg))
    meta = {"timm_model": model_name, "pretrained_tag": cfg.tag, **(meta or {})}
    return Backbone(name, stages, pool, width, pre, meta, **backbone_kwargs)


def metadata(model_name: str) -> dict:
    """Stages, width and parameters, from the model built on the meta device (no weights)."""
    with empty_init():
        model = make_model(model_name)
    stages, _, width = split(model)
    return {"num_stages": len(stages), "feature_dim": width, "num_params": count_parameters(stages)}


@register_resolver(PREFIX, hint="'timm:<model name>' (pip install timm)")
def _resolve(name: str) -> BackboneRecord:
    model_name = name.removeprefix(PREFIX)
    cfg = pretrained_cfg(model_name)
    return BackboneRecord(
        name=name, family="timm", modality="image", builder=lambda pretrained=True: build(model_name, name, pretrained),
        weights=weights_location(cfg), preset=preset_from_cfg(cfg), licence=cfg.license,
        description=f"timm {model_name} ({cfg.tag or 'default'} weights)", architecture=name,
        available_fn=lambda: weights_available(cfg), lazy=lambda missing: metadata(model_name))
