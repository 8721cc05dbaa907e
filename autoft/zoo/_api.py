"""Backbone records and the registry (in the style of torchvision's ``models/_api.py``).

A :class:`BackboneRecord` says everything about a backbone that is known *without building it*:
where its weights come from (:class:`WeightsSource`: a URL + sha256, a hub name, a local file +
sha256, an installed package), how its inputs are prepared (:class:`ImagePreset`: resize, crop,
interpolation, mean, std; :class:`TextPreset`: tokenizer and max length), and metadata (number of
stages, feature width, parameters, reported accuracy, licence).  ``record.build(pretrained)``
makes the :class:`~autoft.zoo.base.Backbone`.

Registration: ``@register_backbone(name, ...)`` on a builder function, :func:`register` for a
record made in a loop, and ``@register_resolver(prefix)`` for open families whose names are not
listed in advance (``timm:<model>``, ``hf:<hub name>``, a folder).  :func:`get_record` finds a
name (exact names and aliases, then the zoo files of :mod:`autoft.zoo.local`, then the resolvers)
or raises :class:`UnknownBackboneError` with a did-you-mean; :func:`describe_backbones` gives the
rows ``autoft backbones`` prints, without building any network.

Metadata that a family cannot state up front (a timm model's stage count, a Hugging Face folder's
parameter count) is filled in by the record's ``lazy(missing)`` function the first time it is asked for:
from a config file, or from the architecture built with parameters on PyTorch's ``meta`` device
(:func:`empty_init`: no memory, no initialisation, no weights read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoft.errors import UnknownBackboneError, did_you_mean

if TYPE_CHECKING:
    from autoft.zoo.base import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


# --- presets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePreset:
    """How an image becomes the network's input, as the weights were trained and evaluated.

    ``resize_size``: the shorter side is resized to this (``interpolation``, antialiased), then the
    centre ``crop_size`` x ``crop_size`` is cut out; ``None`` resizes the whole image straight to
    ``crop_size`` x ``crop_size`` (no crop, the aspect ratio is not kept).  Then the values are
    scaled to [0, 1] and normalised with ``mean`` and ``std`` (per channel).  This is what
    ``torchvision.transforms.v2`` does with these numbers; :meth:`transforms` builds that pipeline.
    """

    crop_size: int
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer, got {self.crop_size!r}")
        if self.resize_size is not None and (isinstance(self.resize_size, bool) or not isinstance(self.resize_size, int)
                                             or self.resize_size < self.crop_size):
            raise ValueError(f"resize_size must be an integer >= crop_size ({self.crop_size}) or null, "
                             f"got {self.resize_size!r}")
        if len(self.mean) != len(self.std) or not self.mean or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need one value per channel (std > 0), got {self.mean} and {self.std}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def transforms(self):
        """The ``torchvision.transforms.v2`` pipeline for this preset (PIL image or uint8 tensor in,
        normalised float tensor out)."""
        from torchvision.transforms import InterpolationMode, v2

        mode = InterpolationMode(self.interpolation)
        resize = self.resize_size if self.resize_size is not None else [self.crop_size, self.crop_size]
        return v2.Compose([v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(self.crop_size),
                           v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(self.mean), list(self.std))])


@dataclass(frozen=True)
class TextPreset:
    """How a text becomes token ids: the tokenizer (a folder or hub name) and the tokens kept."""

    tokenizer: str | None
    max_length: int = 128

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- weights -----------------------------------------------------------------------------------

WEIGHT_KINDS = ("url", "file", "hub", "package", "timm")


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from, and what they must hash to.

    ``kind``: ``url`` (downloaded into a cache folder, verified by ``sha256`` or the hash prefix in
    the file name), ``file`` (a local file the user declared, verified by ``sha256``), ``hub``
    (a Hugging Face hub model, verified against the content hashes of the hub cache), ``package``
    (files inside an installed Python package, verified against the package's RECORD), ``timm``
    (timm's pretrained tag: its hub cache or URL, verified as for hub/url).
    """

    kind: str
    location: str
    sha256: str | None = None

    def __post_init__(self):
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weights kind must be one of {WEIGHT_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f" (sha256 {self.sha256[:12]}...)" if self.sha256 else "")


# --- records -----------------------------------------------------------------------------------

Preset = ImagePreset | TextPreset


@dataclass(eq=False)
class BackboneRecord:
    """A zoo entry: what the backbone is, known without building it, and how to build it.

    ``builder(pretrained: bool) -> Backbone``.  ``weights`` may be a callable returning the
    :class:`WeightsSource` (read when asked: a family's records may follow environment variables).
    ``lazy(missing: set[str]) -> dict`` fills metadata left ``None`` here (keys among num_stages,
    feature_dim, num_params, preset); it must not read weights.  ``available() -> bool``: the weights are on this machine.
    """

    name: str
    family: str
    modality: str  # "image" | "text"
    builder: Callable[..., "Backbone"]
    weights: WeightsSource | Callable[[], WeightsSource | None] | None = None
    preset: Preset | None = None
    num_stages: int | None = None
    feature_dim: int | None = None
    num_params: int | None = None  # parameters of the backbone (the classifier it was trained with excluded)
    metrics: dict[str, float] = field(default_factory=dict)  # reported accuracy, e.g. {"ImageNet-1K acc@1": 69.8}
    licence: str | None = None
    description: str = ""
    aliases: tuple[str, ...] = ()
    architecture: str | None = None  # the network definition, e.g. "torchvision:mobilenet_v2"
    available_fn: Callable[[], bool] | None = None
    lazy: Callable[[set[str]], dict] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. batchnorm: frozen)
    _filled: bool = field(default=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    # -- building --------------------------------------------------------------------------
    def build(self, pretrained: bool = True) -> "Backbone":
        bb = self.builder(pretrained=pretrained)
        bb.meta.setdefault("family", self.family)
        return bb

    def available(self) -> bool:
        """Whether the pretrained weights are on this machine (nothing is downloaded or read)."""
        if self.available_fn is None:
            return False
        try:
            return bool(self.available_fn())
        except Exception:  # a broken cache folder, a missing optional package: simply not available
            return False

    def weights_source(self) -> WeightsSource | None:
        w = self.weights
        return w() if callable(w) else w

    # -- metadata ----------------------------------------------------------------------------
    def complete(self) -> "BackboneRecord":
        """The record with every metadata field filled (computed once, by ``lazy``)."""
        if not self._filled:
            with self._lock:
                if not self._filled:
                    missing = [k for k in ("num_stages", "feature_dim", "num_params", "preset")
                               if getattr(self, k) is None]
                    if missing and self.lazy is not None:
                        for key, value in self.lazy(set(missing)).items():
                            if getattr(self, key, None) is None:
                                setattr(self, key, value)
                    self._filled = True
        return self

    def stage_count(self) -> int:
        n = self.complete().num_stages
        if n is None:
            raise UnknownBackboneError(f"the stage count of backbone '{self.name}' is not known without building it")
        return int(n)

    def describe(self) -> dict:
        """One row of ``autoft backbones``: nothing is built and no weights are read."""
        row = {"name": self.name, "family": self.family, "modality": self.modality, "stages": None,
               "feature_dim": None, "params_M": None, "weights_local": "yes" if self.available() else "no",
               "weights": str(self.weights_source() or "none"), "description": self.description}
        try:
            self.complete()
        except Exception as exc:  # e.g. timm not installed: the row says why
            row["description"] = f"{self.description} (unavailable: {exc})".strip()
            return row
        row["stages"] = self.num_stages
        row["feature_dim"] = self.feature_dim
        row["params_M"] = None if self.num_params is None else round(self.num_params / 1e6, 2)
        return row


# --- the registry ------------------------------------------------------------------------------

_REGISTRY: dict[str, BackboneRecord] = {}
_ALIASES: dict[str, str] = {}
_RESOLVERS: list[tuple[str, Callable[[str], BackboneRecord | None]]] = []
_RESOLVED: dict[str, BackboneRecord] = {}
# dynamic providers (the zoo files): called on every lookup, return {name: record}
_PROVIDERS: list[Callable[[], dict[str, BackboneRecord]]] = []
PREFIX_HINTS: list[str] = []  # shown in the unknown-name message, e.g. "'timm:<model name>'"


def register(record: BackboneRecord) -> BackboneRecord:
    """Add ``record`` (and its aliases) to the registry; a name may be registered once."""
    for key in (record.name, *record.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"backbone name '{key}' is already registered")
    _REGISTRY[record.name] = record
    for alias in record.aliases:
        _ALIASES[alias] = record.name
    return record


def register_backbone(name: str, **fields) -> Callable:
    """Decorator: register the decorated ``builder(pretrained=True) -> Backbone`` under ``name``
    with the record ``fields`` (family, modality, weights, preset, num_stages, ...)."""
    def deco(builder: Callable) -> Callable:
        register(BackboneRecord(name=name, builder=builder, **fields))
        return builder
    return deco


def register_resolver(prefix: str, hint: str | None = None) -> Callable:
    """Decorator: ``resolver(name) -> BackboneRecord | None`` for names starting with ``prefix``
    (``""``: any name; tried last, in registration order)."""
    def deco(fn: Callable[[str], BackboneRecord | None]) -> Callable:
        _RESOLVERS.append((prefix, fn))
        _RESOLVERS.sort(key=lambda r: r[0] == "")  # prefixed resolvers first
        if hint:
            PREFIX_HINTS.append(hint)
        return fn
    return deco


def register_provider(fn: Callable[[], dict[str, BackboneRecord]]) -> Callable:
    _PROVIDERS.append(fn)
    return fn


def _provided() -> dict[str, BackboneRecord]:
    out: dict[str, BackboneRecord] = {}
    for fn in _PROVIDERS:
        out.update(fn())
    return out


def known_names() -> list[str]:
    return [*_REGISTRY, *_ALIASES, *_provided()]


def get_record(name: str) -> BackboneRecord:
    """The record for ``name``; :class:`UnknownBackboneError` with a did-you-mean otherwise."""
    if not isinstance(name, str) or not name:
        raise UnknownBackboneError(f"a backbone name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _ALIASES:
        return _REGISTRY[_ALIASES[name]]
    provided = _provided()
    if name in provided:
        return provided[name]
    if name in _RESOLVED:
        return _RESOLVED[name]
    for prefix, fn in _RESOLVERS:
        if name.startswith(prefix):
            record = fn(name)
            if record is not None:
                _RESOLVED[name] = record
                return record
    known = known_names()
    hints = "; or " + ", ".join(PREFIX_HINTS) if PREFIX_HINTS else ""
    raise UnknownBackboneError(f"unknown backbone '{name}'{did_you_mean(name, known)}. Known: "
                               f"{', '.join(sorted(known))}{hints}.")


def list_records(family: str | None = None) -> list[BackboneRecord]:
    """Every listed record (built-in and zoo files; resolver families only once they were named)."""
    seen: dict[str, BackboneRecord] = {}
    for rec in (*_REGISTRY.values(), *_provided().values(), *_RESOLVED.values()):
        if rec.name not in seen and (family is None or rec.family == family):
            seen[rec.name] = rec
    return list(seen.values())


def describe_backbones(names: list[str] | None = None, family: str | None = None) -> list[dict]:
    """Rows for ``autoft backbones``: name, family, modality, stages, feature_dim, params_M,
    weights_local ("yes"/"no"), weights (where they come from), description.  No network is built
    and no weights are read.  ``names``: these backbones (any resolvable name, e.g. ``timm:resnet50``)
    instead of the listed ones."""
    records = [get_record(n) for n in names] if names else list_records(family)
    return [r.describe() for r in records]


# --- helpers for families ------------------------------------------------------------------------

@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Build modules with their parameters on the ``meta`` device: the structure and the shapes,
    no memory and no weights (initialisers run on meta tensors, which costs nothing).  Buffers stay
    real (they are small), so constructors that compute with tensors still work."""
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def count_parameters(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def memoize(fn: Callable) -> Callable:
    return functools.lru_cache(maxsize=None)(fn)


_VAR = re.compile(r"\$\$|\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# the task files' rule (autoft.task.expand_vars), without importing the training code
ALLOWED_VARS = ("AUTOFT_HOME", "HOME", "TMPDIR", "USER", "XDG_CACHE_HOME", "XDG_DATA_HOME")


def expand_path(value: str, base: Path | None = None, file: str | None = None, field: str | None = None) -> Path:
    """``${AUTOFT_HOME}``-style variables (those task files may use: AUTOFT_* and a few others; ``$$``
    is a literal ``$``) and ``~`` expanded; relative paths are relative to ``base``."""
    from autoft.errors import ConfigError
    from autoft.home import autoft_home

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        var = m.group(1) or m.group(2)
        if var not in ALLOWED_VARS and not var.startswith("AUTOFT_"):
            raise ConfigError(f"environment variable {var} in '{value}' may not be used here: allowed are "
                              f"{', '.join(ALLOWED_VARS)} and names starting with AUTOFT_", file=file, field=field)
        if var in os.environ:
            return os.environ[var]
        if var == "AUTOFT_HOME":
            return str(autoft_home())
        raise ConfigError(f"environment variable {var} used in '{value}' is not set", file=file, field=field)

    out = Path(os.path.expanduser(_VAR.sub(sub, str(value))))
    if not out.is_absolute() and base is not None:
        out = base / out
    return out
