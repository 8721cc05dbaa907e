"""Serve predictions from an exported folder, without autoft's training code.

This module imports only the standard library, NumPy, ``autoft.errors`` and — when they are
needed — torch (TorchScript and preprocessing), Pillow (image files), onnxruntime (``backend="onnx"``)
and a tokenizer (``transformers`` or ``tokenizers``, text).  It never imports ``autoft.core``,
``autoft.zoo``, ``autoft.data`` or ``autoft.engines``, so a folder can be served anywhere these
packages are installed.

>>> model = load_exported("exports/digits")            # verifies the folder against manifest.json
>>> preds = model.predict(["a.png", "b.png"])           # or arrays, a folder, PIL images
>>> preds.labels, preds.probabilities

Preprocessing is re-implemented here with exactly the same operations as training
(``autoft.data.encode``): images → float in [0, 1], grey repeated to RGB, bilinear antialiased resize
to ``input_size``, normalised; text → the exported tokenizer, truncated to ``max_length``.

What the integrity check covers: every file an export needs (:func:`required_files`: the fixed
metadata files, each model file ``model.json`` names, the whole tokenizer folder) must be listed in
``manifest.json`` with its sha256 and lie inside the folder (no absolute paths, no ``..``, no links out
of it).  This detects corruption and tampering of a copied folder, not a forged one: the manifest is
not signed, so whoever can write the folder can rewrite the manifest too.

Image files are read only when their header declares at most ``max_image_pixels`` pixels
(:data:`DEFAULT_MAX_IMAGE_PIXELS`), checked before decoding, whatever PIL's global limit is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from autoft.errors import ExportError

log = logging.getLogger(__name__)

FORMAT = "autoft-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_INFO = "model.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BACKENDS = ("auto", "torchscript", "onnx")
MODEL_FORMATS = ("torchscript", "onnx")
# written by every export (autoft.export.export); model.json names the model files, preprocessing.json the tokenizer
REQUIRED_FILES = ("config.yaml", "classes.json", "preprocessing.json", "metrics.json", MODEL_INFO, "README.md")
# 50 million pixels: a 48 MP photo (8000x6000) still reads; decoded it is 150 MB of uint8 RGB and about
# 600 MB as the float32 tensor preprocessing makes of it before resizing to the model's input (32-224 px).
# PIL's own default (89.5 million, an error only at twice that) lets a 10000x10000 image through: gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


# --------------------------------------------------------------------------------------------
# manifest
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"no exported model at {folder}: the folder does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder} is not an autoft export: {MANIFEST} is missing "
                          "(create one with 'autoft export --task NAME --out DIR')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); the folder was altered or corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise ExportError(f"{path} is not an autoft export manifest (expected format '{FORMAT}' and a 'files' map)")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{folder} was exported in format version {version}; this autoft reads up to "
                          f"{FORMAT_VERSION}: upgrade autoft to load it")
    return manifest


def inside(folder: Path, name, what: str = "file") -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder`` (after ``..`` and
    links are resolved); otherwise an :class:`ExportError`.  Every path an export names goes through this."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\0" in name:
        raise ExportError(f"exported model {folder}: {what} {name!r} is not a file name; the folder was altered "
                          "or corrupted. Export the model again.")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise ExportError(f"exported model {folder}: {what} '{name}' is an absolute path, outside the folder; an "
                          "export only uses files inside its own folder, so it was altered. Export the model again.")
    path = folder / name
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise ExportError(f"exported model {folder}: {what} '{name}' cannot be resolved ({exc})") from None
    if not real.is_relative_to(root):
        raise ExportError(f"exported model {folder}: {what} '{name}' resolves to {real}, outside the folder; an "
                          "export only uses files inside its own folder, so it was altered. Export the model again.")
    return path


def _files_under(folder: Path) -> list[str]:
    """Relative names of every non-folder entry under ``folder`` (links included, not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        out += [(base / n).relative_to(folder).as_posix() for n in filenames]
        out += [(base / n).relative_to(folder).as_posix() for n in dirnames if (base / n).is_symlink()]
    return sorted(out)


def _load_json(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"exported model {folder} is incomplete: missing file {name}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); the folder was altered or corrupted") from None


def required_files(folder: Path, info: dict, pre: dict) -> list[str]:
    """The files an export needs, from its (verified) ``model.json`` and ``preprocessing.json``:
    :data:`REQUIRED_FILES`, the model files named in ``model.json`` (``files``: torchscript and/or
    onnx, and state_dict) and, for text, every file of the tokenizer folder.  Each must lie inside
    ``folder``; any of them not listed in the manifest makes the folder unverifiable."""
    folder = Path(folder)
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict):
        raise ExportError(f"exported model {folder}: {MODEL_INFO} has no 'files' map; the folder was altered")
    need = list(REQUIRED_FILES)
    models = [k for k in MODEL_FORMATS if files.get(k)]
    if not models:
        raise ExportError(f"exported model {folder}: {MODEL_INFO} names no model file (torchscript or onnx)")
    for key in [*models, "state_dict"]:
        if not files.get(key):
            raise ExportError(f"exported model {folder}: {MODEL_INFO} names no {key} file")
        inside(folder, files[key], f"the {key} file in {MODEL_INFO}")
        need.append(PurePosixPath(files[key]).as_posix())
    if isinstance(pre, dict) and pre.get("modality") == "text":
        tok = pre.get("tokenizer", "tokenizer")
        tok_dir = inside(folder, tok, "the tokenizer folder in preprocessing.json")
        if not tok_dir.is_dir():
            raise ExportError(f"exported model {folder} is incomplete: the tokenizer folder '{tok}' is missing")
        tok_files = [f"{PurePosixPath(tok).as_posix()}/{n}" for n in _files_under(tok_dir)]
        if not tok_files:
            raise ExportError(f"exported model {folder} is incomplete: the tokenizer folder '{tok}' is empty")
        need += tok_files  # the tokenizer reads whatever its folder holds: every file of it must be checked
    return list(dict.fromkeys(need))


def _check_listed(folder: Path, listed, names) -> None:
    unlisted = [n for n in names if n not in listed]
    if unlisted:
        raise ExportError(f"exported model {folder}: {', '.join(unlisted)} not listed in {MANIFEST}; an export lists "
                          "every file it needs with its sha256, so the folder was altered (or not written by "
                          "autoft export). Export the model again.")


def _check_hashes(folder: Path, entries: dict, names) -> None:
    missing, altered = [], []
    for name in names:
        p = folder / name
        entry = entries[name]
        if not p.is_file():
            missing.append(name)
        elif not isinstance(entry, dict) or sha256_file(p) != entry.get("sha256"):
            altered.append(name)
    if missing:
        raise ExportError(f"exported model {folder} is incomplete: missing file(s) {', '.join(missing)} "
                          f"(listed in {MANIFEST}). Copy the whole folder, or export the model again.")
    if altered:
        raise ExportError(f"exported model {folder}: file(s) {', '.join(altered)} changed since the export "
                          f"(sha256 differs from {MANIFEST}); the folder was altered or corrupted. "
                          "Restore the original files or export the model again.")


def verify_folder(folder: Path, manifest: dict | None = None) -> dict:
    """Check an exported folder against its ``manifest.json``.

    Every listed file must lie inside the folder and match its sha256; every file the export needs
    (:func:`required_files`) must be listed.  Files on disk that the manifest does not list are not
    used by loading (except in the tokenizer folder, where they are an error) and only logged.
    This detects corruption and tampering of a copied folder, not a forged one: the manifest is unsigned.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    entries = manifest["files"]
    for name in entries:
        inside(folder, name, f"{MANIFEST} entry")
    # the fixed files first: model.json and preprocessing.json say which other files are needed
    _check_listed(folder, entries, REQUIRED_FILES)
    _check_hashes(folder, entries, REQUIRED_FILES)
    need = required_files(folder, _load_json(folder, MODEL_INFO), _load_json(folder, "preprocessing.json"))
    _check_listed(folder, entries, need)
    _check_hashes(folder, entries, sorted(entries))
    extra = [n for n in _files_under(folder) if n != MANIFEST and n not in entries]
    if extra:
        log.warning("exported model %s: file(s) not listed in %s, not checked and not used: %s", folder, MANIFEST,
                    ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    return manifest


# --------------------------------------------------------------------------------------------
# optional dependencies, with messages instead of tracebacks
def _torch():
    try:
        import torch
    except ImportError:
        raise ExportError("serving an exported model needs PyTorch (preprocessing and the TorchScript "
                          "backend): pip install torch") from None
    return torch


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("backend 'onnx' needs the onnxruntime package, which is not installed: "
                          "pip install onnxruntime  (or pip install 'autoft[onnx]'), or load the model "
                          "with backend='torchscript'") from None
    return onnxruntime


# --------------------------------------------------------------------------------------------
# preprocessing (same operations as autoft.data.encode)
def to_uint8_image(arr: np.ndarray) -> np.ndarray:
    """HxW or HxWxC array → HxWxC uint8 (floats in [0, 1] are scaled by 255, larger ranges by 255/max)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ExportError(f"an image array must be HxW or HxWxC, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        hi = a.max() if a.size else 1.0
        a = a * (255.0 / hi) if hi > 1.0 else a * 255.0
        arr = np.clip(a.round(), 0, 255).astype(np.uint8)
    return arr


def read_image(path: Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file → HxWx3 uint8.  Refused (:class:`ExportError`) before decoding when its header
    declares more than ``max_image_pixels`` pixels (``None``: no limit of ours; PIL's global
    ``Image.MAX_IMAGE_PIXELS`` error still applies and is reported the same way)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ExportError("reading image files needs Pillow: pip install pillow") from None
    try:
        with warnings.catch_warnings():
            # our limit decides; PIL's warning (between its global limit and twice it) is not ours to give
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if max_image_pixels is not None and w * h > max_image_pixels:
                    raise ExportError(f"image {path} declares {w}x{h} ({w * h} pixels), more than the limit "
                                      f"{max_image_pixels} (max_image_pixels); not decoding it (a decompression "
                                      "bomb, or an image to shrink first)")
                im.load()
                if im.mode != "RGB":
                    im = im.convert("RGB")
                return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ExportError(f"image file {path} does not exist") from None
    except Image.DecompressionBombError as exc:
        # Image.open refused it before we saw its size: more than twice PIL's global limit
        m = re.search(r"\((\d+) pixels\)", str(exc))
        n = int(m.group(1)) if m else None
        pil_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        if n is not None and max_image_pixels is not None and n > max_image_pixels:
            limit = f"the limit {max_image_pixels} (max_image_pixels)"
        else:
            limit = f"PIL's limit {pil_limit} (twice PIL.Image.MAX_IMAGE_PIXELS)"
        raise ExportError(f"image {path} declares {n if n is not None else 'too many'} pixels, more than {limit}; "
                          "not decoding it (a decompression bomb, or an image to shrink first)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ExportError(f"could not read {path} as an image ({type(exc).__name__}: {exc})") from None


def encode_images(images: list[np.ndarray], pre: dict, batch: int = 512):
    """uint8 HxWxC arrays → normalised float tensor (N, C, S, S), as in training."""
    torch = _torch()
    import torch.nn.functional as F

    size = pre.get("input_size")
    channels = pre.get("channels", 3)
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
    same = len({tuple(x.shape) for x in images}) == 1
    groups = [images[i:i + batch] for i in range(0, len(images), batch)] if same else [[x] for x in images]
    out = []
    for group in groups:
        t = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).float() / 255.0
        if t.shape[1] == 1 and channels == 3:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 4:
            t = t[:, :3]
        if size and tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > size)
        out.append((t - mean) / std)
    return torch.cat(out).contiguous()


class TextEncoder:
    """The exported tokenizer: ``transformers.AutoTokenizer`` when installed, else ``tokenizers``."""

    def __init__(self, folder: Path, max_length: int):
        self.folder, self.max_length = Path(folder), int(max_length)
        self._hf = self._tok = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self._hf = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            return
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ExportError("a text model needs a tokenizer library: pip install tokenizers "
                              "(or transformers)") from None
        tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tok.enable_truncation(self.max_length)
        pad = tok.padding or {}
        tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_type_id=pad.get("pad_type_id", 0),
                           pad_token=pad.get("pad_token", "[PAD]"))
        self._tok = tok

    def __call__(self, texts: list[str]):
        torch = _torch()
        if self._hf is not None:
            enc = self._hf(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
            return enc["input_ids"].long().contiguous(), enc["attention_mask"].long().contiguous()
        encs = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return ids, mask


# --------------------------------------------------------------------------------------------
# backends
class _TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: Path, device: str = "cpu"):
        torch = _torch()
        self.device = device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is marked deprecated; it still loads and runs
            try:
                self.module = torch.jit.load(str(path), map_location=device).eval()
            except RuntimeError as exc:
                raise ExportError(f"could not load the TorchScript model {path}: {exc}") from None

    def __call__(self, tensors: tuple) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.module(*[t.to(self.device) for t in tensors])
        return out.float().cpu().numpy()


class _OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, input_names: list[str]):
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime could not load {path}: {exc}") from None
        self.input_names = input_names

    def __call__(self, tensors: tuple) -> np.ndarray:
        feed = {n: t.cpu().numpy() for n, t in zip(self.input_names, tensors)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


# --------------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Predicted classes and probabilities for a list of inputs."""

    classes: list[str]
    probabilities: np.ndarray  # (N, num_classes)
    inputs: list[str] = field(default_factory=list)  # a name per input (file path, array[i], text)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for unreadable files in folders

    @property
    def indices(self) -> np.ndarray:
        return self.probabilities.argmax(1) if len(self.probabilities) else np.zeros(0, dtype=np.int64)

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.indices]

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1) if len(self.probabilities) else np.zeros(0)

    def __len__(self) -> int:
        return len(self.probabilities)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per input: input, prediction, probability, then ``p_<class>`` for every class."""
        rows = []
        for name, idx, probs in zip(self.inputs, self.indices, self.probabilities):
            row = {"input": name, "prediction": self.classes[idx], "probability": float(probs[idx])}
            row.update({f"p_{c}": float(p) for c, p in zip(self.classes, probs)})
            rows.append(row)
        return rows

    def __iter__(self):
        return iter(self.to_rows())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class ExportedModel:
    """An exported folder, loaded and verified; ``predict`` turns raw inputs into classes."""

    def __init__(self, folder: str | Path, backend: str = "auto", *, verify: bool = True, device: str = "cpu",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.folder = Path(folder)
        if backend not in BACKENDS:
            raise ExportError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
        if max_image_pixels is not None and (not isinstance(max_image_pixels, int) or max_image_pixels < 1):
            raise ExportError(f"max_image_pixels must be a positive integer or None, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels
        self.manifest = verify_folder(self.folder) if verify else read_manifest(self.folder)
        self.info = self._json(MODEL_INFO)
        self.classes: list[str] = list(self._json("classes.json"))
        self.preprocessing: dict = self._json("preprocessing.json")
        self.modality: str = self.preprocessing["modality"]
        files = self.info.get("files")
        if not isinstance(files, dict):
            raise ExportError(f"exported model {self.folder}: {MODEL_INFO} has no 'files' map; the folder was altered")
        if backend == "auto":
            backend = "torchscript" if files.get("torchscript") else "onnx"
        target = files.get(backend)
        if not target:
            why = self.info.get("export_errors", {}).get(backend)
            have = [k for k in ("torchscript", "onnx") if files.get(k)]
            raise ExportError(f"{self.folder} has no {backend} model" + (f" (export failed: {why})" if why else "")
                              + f"; available: {', '.join(have) or 'none'}")
        path = inside(self.folder, target, f"the {backend} file in {MODEL_INFO}")  # also when verify=False
        if not path.is_file():
            raise ExportError(f"exported model {self.folder} is incomplete: missing file {target}")
        if backend == "torchscript":
            self._run = _TorchScriptBackend(path, device)
        else:
            self._run = _OnnxBackend(path, self.info["inputs"])
        self.backend = backend
        self._text: TextEncoder | None = None
        if self.modality == "text":
            tok_dir = inside(self.folder, self.preprocessing.get("tokenizer", "tokenizer"),
                             "the tokenizer folder in preprocessing.json")
            self._text = TextEncoder(tok_dir, self.preprocessing.get("max_length", 128))
        log.info("loaded %s (%s, %d classes) with backend %s", self.folder, self.info.get("architecture"),
                 len(self.classes), backend)

    def _json(self, name: str):
        return _load_json(self.folder, name)

    @property
    def metrics(self) -> dict:
        return self._json("metrics.json")

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.folder)!r}, architecture={self.info.get('architecture')!r}, "
                f"classes={len(self.classes)}, backend={self.backend!r})")

    # -- inputs --------------------------------------------------------------------------
    def expand_inputs(self, inputs, skipped: list | None = None) -> tuple[list, list[str]]:
        """Raw inputs → (items, names).  Images: files, folders, ``.npy`` batches, arrays, PIL images.

        An image file named explicitly must be readable; unreadable files found in a folder (corrupt,
        not images, larger than ``max_image_pixels``) are skipped with a warning and, when ``skipped``
        is a list, appended to it as ``(file, reason)``."""
        if self.modality == "text":
            if isinstance(inputs, str):
                inputs = [inputs]
            items = list(inputs)
            bad = [type(x).__name__ for x in items if not isinstance(x, str)]
            if bad:
                raise ExportError(f"a text model predicts from strings; got {bad[0]} "
                                  "(read a CSV/TSV file with autoft.export.runtime.read_text_table)")
            return items, [t if len(t) <= 60 else t[:57] + "..." for t in items]
        if isinstance(inputs, (str, Path)) or _is_pil(inputs):
            inputs = [inputs]
        elif isinstance(inputs, np.ndarray):
            inputs = _split_array(inputs)
        items, names = [], []
        for i, x in enumerate(inputs):
            if isinstance(x, (str, Path)):
                p = Path(x)
                if p.is_dir():
                    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                    if not files:
                        raise ExportError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                    bad = []
                    for f in files:
                        try:
                            items.append(read_image(f, self.max_image_pixels))
                        except ExportError as exc:
                            log.warning("skipped unreadable file %s: %s", f, exc)
                            bad.append((str(f), str(exc)))
                            continue
                        names.append(str(f))
                    if len(bad) == len(files):
                        raise ExportError(f"folder {p} holds no readable image: all {len(files)} image file(s) "
                                          f"failed to read, e.g. {bad[0][1]}")
                    if skipped is not None:
                        skipped.extend(bad)
                elif p.suffix.lower() == ".npy":
                    if not p.is_file():
                        raise ExportError(f"array file {p} does not exist")
                    arrs = _split_array(np.load(p, allow_pickle=False))
                    items += [to_uint8_image(a) for a in arrs]
                    names += [f"{p}[{j}]" for j in range(len(arrs))]
                else:
                    items.append(read_image(p, self.max_image_pixels))
                    names.append(str(p))
            elif _is_pil(x):
                items.append(np.asarray(x if x.mode == "RGB" else x.convert("RGB"), dtype=np.uint8))
                names.append(f"image[{i}]")
            elif isinstance(x, np.ndarray):
                items.append(to_uint8_image(x))
                names.append(f"array[{i}]")
            else:
                raise ExportError(f"cannot predict from {type(x).__name__}: give image file paths, folders, "
                                  ".npy files, NumPy arrays (HxW or HxWxC) or PIL images")
        return items, names

    def encode(self, items: list):
        """Raw items (uint8 arrays or strings) → the model's input tensors (a tuple)."""
        if self.modality == "text":
            return self._text(items)
        return (encode_images(items, self.preprocessing),)

    # -- prediction ------------------------------------------------------------------------
    def logits(self, inputs, batch_size: int | None = None) -> np.ndarray:
        items, _ = self.expand_inputs(inputs)
        return self._logits(items, batch_size)

    def _logits(self, items: list, batch_size: int | None) -> np.ndarray:
        n = len(items)
        batch_size = batch_size or (64 if self.modality == "text" else 256)
        if n == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        order = np.arange(n)
        if self.modality == "text":  # similar lengths together: less padding, same numbers
            order = np.argsort([len(t) for t in items], kind="stable")
        out = np.zeros((n, len(self.classes)), dtype=np.float32)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            out[idx] = self._run(self.encode([items[j] for j in idx]))
        return out

    def predict_proba(self, inputs, batch_size: int | None = None) -> np.ndarray:
        return softmax(self.logits(inputs, batch_size))

    def predict(self, inputs, batch_size: int | None = None) -> Predictions:
        """Classes and probabilities of ``inputs`` (see :meth:`expand_inputs` for what is accepted)."""
        skipped: list[tuple[str, str]] = []
        items, names = self.expand_inputs(inputs, skipped)
        preds = self.predict_items(items, names, batch_size)
        preds.skipped = skipped
        return preds

    def predict_items(self, items: list, names: list[str] | None = None, batch_size: int | None = None) -> Predictions:
        """Like :meth:`predict`, for already-read items (uint8 HxWxC arrays or strings)."""
        names = names if names is not None else [f"input[{i}]" for i in range(len(items))]
        return Predictions(self.classes, softmax(self._logits(items, batch_size)), names)


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "mode") and hasattr(x, "convert")


def _split_array(arr: np.ndarray) -> list[np.ndarray]:
    """One image (HxW, HxWxC with C in 1/3/4) or a batch (NxHxW, NxHxWxC) → list of images."""
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return [arr]
    if arr.ndim in (3, 4):
        return list(arr)
    raise ExportError(f"an image array must be HxW, HxWxC, NxHxW or NxHxWxC; got shape {arr.shape}")


def read_table(path: str | Path, columns: list[str], sep: str | None = None) -> dict[str, list[str]]:
    """Columns of a CSV / TSV file (tab-separated when the suffix is .tsv or the header has a tab)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"table {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline()
        if sep is None:
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in header else ","
        f.seek(0)
        reader = csv.DictReader(f, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
        for col in columns:
            if col not in (reader.fieldnames or []):
                raise ExportError(f"{path}: no column '{col}'; columns are {reader.fieldnames}")
        rows = list(reader)
    return {col: [(r.get(col) or "") for r in rows] for col in columns}


def read_text_table(path: str | Path, text_column: str = "text", sep: str | None = None) -> list[str]:
    """The texts of one column of a CSV / TSV file."""
    return read_table(path, [text_column], sep)[text_column]


def load_exported(folder: str | Path, backend: str = "auto", *, verify: bool = True, device: str = "cpu",
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ExportedModel:
    """Load an exported folder (checking every file it needs against ``manifest.json``).

    ``backend``: ``"torchscript"`` (default when present), ``"onnx"`` (needs onnxruntime) or ``"auto"``.
    ``max_image_pixels``: image files whose header declares more pixels are refused before decoding
    (``None``: no limit beyond PIL's own).
    """
    return ExportedModel(folder, backend, verify=verify, device=device, max_image_pixels=max_image_pixels)
