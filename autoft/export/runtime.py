"""Serve predictions from an exported folder, without autoft's training code.

This module imports only the standard library, NumPy, ``autoft.errors`` and — when they are
needed — torch (``torch.export`` programs, TorchScript and preprocessing), Pillow (image files),
onnxruntime (``backend="onnx"``) and a tokenizer (``transformers`` or ``tokenizers``, text).  It never
imports ``autoft.core``, ``autoft.zoo``, ``autoft.data`` or ``autoft.engines``, so a folder can be served
anywhere these packages are installed.

>>> model = load_exported("exports/digits")            # verifies the folder against manifest.json
>>> preds = model.predict(["a.png", "b.png"])           # or arrays, a folder, PIL images
>>> preds.labels, preds.probabilities

Backends (:data:`BACKENDS`): ``"pt2"`` (``model.pt2``, a ``torch.export`` program), ``"onnx"``
(``model.onnx``, onnxruntime) and ``"torchscript"`` (``model.ts``, legacy: ``torch.jit.load`` is deprecated).
``"auto"`` takes the first of :data:`MODEL_FORMATS` that the folder holds and that loads here.

Preprocessing is implemented here and training calls these same functions (``autoft.data``): images
→ EXIF orientation applied, RGB, float in [0, 1], grey repeated to RGB; with the weights' preset the
shorter side resized to ``resize_size`` and the centre ``input_size`` square cut out (:func:`preset_image`),
without one resized straight to ``input_size``; normalised; text → the exported tokenizer, truncated to ``max_length``.

What the integrity check covers: every file an export needs (:func:`required_files`: the fixed
metadata files, each model file ``model.json`` names, the whole tokenizer folder) must be listed in
``manifest.json`` with its sha256 and lie inside the folder (no absolute paths, no ``..``, no links out
of it).  This detects corruption and tampering of a copied folder, not a forged one: the manifest is
not signed, so whoever can write the folder can rewrite the manifest too.  That is why ``model.pt2``
is read with :func:`load_pt2`, which refuses any program that could run code while loading
(``torch.export.load`` itself unpickles and executes strings from the file), and ``model.pt`` only
with ``torch.load(weights_only=True)``.  ``model.ts`` (legacy) is a TorchScript archive: load it only
from folders you trust.

Image files are read only when their header declares at most ``max_image_pixels`` pixels
(:data:`DEFAULT_MAX_IMAGE_PIXELS`), checked before decoding, whatever PIL's global limit is.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from autoft.errors import ExportError

log = logging.getLogger(__name__)

FORMAT = "autoft-export"
# The newest folder layout this autoft reads.  1: model.ts and/or model.onnx; 2: adds model.pt2 (a
# torch.export program).  An export records the oldest layout that can serve it (min_format_version):
# a folder that still holds model.ts or model.onnx says 1, since older autoft loads those and ignores model.pt2.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_INFO = "model.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# model formats, in the order backend "auto" prefers them; torchscript is legacy (torch.jit is deprecated)
MODEL_FORMATS = ("pt2", "onnx", "torchscript")
LEGACY_FORMATS = ("torchscript",)
BACKENDS = ("auto", *MODEL_FORMATS)
# written by every export (autoft.export.export); model.json names the model files, preprocessing.json the tokenizer
CALIBRATION = "calibration.json"  # optional: temperature and binary decision threshold (autoft.evaluation)
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


def min_format_version(files: dict) -> int:
    """The oldest folder layout (format version) whose readers can serve a folder with these model files."""
    return 1 if any(files.get(k) for k in ("torchscript", "onnx")) else 2


def required_files(folder: Path, info: dict, pre: dict) -> list[str]:
    """The files an export needs, from its (verified) ``model.json`` and ``preprocessing.json``:
    :data:`REQUIRED_FILES`, the model files named in ``model.json`` (``files``: pt2, onnx and/or
    torchscript, and state_dict) and, for text, every file of the tokenizer folder.  Each must lie inside
    ``folder``; any of them not listed in the manifest makes the folder unverifiable."""
    folder = Path(folder)
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict):
        raise ExportError(f"exported model {folder}: {MODEL_INFO} has no 'files' map; the folder was altered")
    need = list(REQUIRED_FILES)
    models = [k for k in MODEL_FORMATS if files.get(k)]
    if not models:
        raise ExportError(f"exported model {folder}: {MODEL_INFO} names no model file ({', '.join(MODEL_FORMATS)})")
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
        raise ExportError("serving an exported model needs PyTorch (preprocessing, and the pt2 and TorchScript "
                          "backends): pip install torch") from None
    return torch


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("backend 'onnx' needs the onnxruntime package, which is not installed: "
                          "pip install onnxruntime  (or pip install 'autoft[onnx]'), or load the model "
                          "with backend='pt2'") from None
    return onnxruntime


# --------------------------------------------------------------------------------------------
# torch.export programs (model.pt2): checked before torch.export.load sees them
#
# torch.export.load is not a safe loader: it unpickles tensor subclasses with torch.load(weights_only=False)
# (and sample inputs when weights_only=True fails), pickle.loads "opaque" constants, loads TorchBind objects,
# sympify()s (= eval) the shape expressions of the graph, exec()s its guards_code when .module() is called, and
# writes parameter names into generated Python code.  load_pt2 reads the archive itself first and accepts it
# only when none of that can run code: plain tensors, ATen operators, and expressions and guards made of
# nothing but symbols, numbers, arithmetic, comparisons and tensor sizes (checked on their syntax trees).
PT2_ENTRIES = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                         r"|models/model\.json|data/sample_inputs/model\.pt"
                         r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                         r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_PLAIN = re.compile(r"[A-Za-z0-9_.]*")  # every other string of the program: names, operators, dtypes
_OP_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.\w+|torch\.sym_\w+|math\.\w+")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# the sympy classes and torch's sympy functions a shape expression may call (none of them parses a string)
_SYM_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "IntTrueDiv",
    "TruncToInt", "RoundToInt", "Identity"})
_SYM_NAMES = frozenset({"True", "False", "true", "false", "oo", "zoo", "nan"})
_SYM_KEYWORDS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                           "infinite", "zero", "nonzero", "even", "odd", "commutative", "evaluate"})
_POW_CALLS = frozenset({"Pow", "PowByNatural"})
_MAX_EXPONENT = 64  # Pow(10, 10**18) would hang the loader: exponents are small constants
_ARITH = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class _Unsafe(ValueError):
    """A part of a .pt2 archive that load_pt2 does not let torch.export.load see."""


def _small_int(node) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" \
            and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value <= _MAX_EXPONENT


def _number(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float, bool) \
        and (type(node.value) is not int or abs(node.value) < 2 ** 63)


def _check_sym_node(node, expr: str) -> None:
    """A sympy expression as written by torch.export (``Mul(Integer(384), Symbol('s53', positive=True))``)."""
    if _number(node):
        return
    if isinstance(node, ast.Name) and node.id in _SYM_NAMES:
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not, ast.Invert)):
        return _check_sym_node(node.operand, expr)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITH):
        if isinstance(node.op, ast.Pow) and not _small_int(node.right):
            raise _Unsafe(f"shape expression {expr[:200]!r}: a power whose exponent is not a small constant")
        _check_sym_node(node.left, expr)
        return _check_sym_node(node.right, expr)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_sym_node(v, expr)
        return
    if isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE) for op in node.ops):
        for v in [node.left, *node.comparators]:
            _check_sym_node(v, expr)
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYM_CALLS:
        name, args = node.func.id, node.args
        for kw in node.keywords:
            if kw.arg not in _SYM_KEYWORDS or not (isinstance(kw.value, ast.Constant)
                                                   and isinstance(kw.value.value, bool)):
                raise _Unsafe(f"shape expression {expr[:200]!r}: keyword {kw.arg!r} is not a sympy assumption")
        if name == "Symbol":
            if len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) \
                    and _SYMBOL.fullmatch(args[0].value):
                return
            raise _Unsafe(f"shape expression {expr[:200]!r}: Symbol() of something else than a symbol name")
        if name in _POW_CALLS and (len(args) != 2 or not _small_int(args[1])):
            raise _Unsafe(f"shape expression {expr[:200]!r}: a power whose exponent is not a small constant")
        for a in args:
            _check_sym_node(a, expr)
        return
    raise _Unsafe(f"shape expression {expr[:200]!r} holds {type(node).__name__}"
                  + (f" {ast.unparse(node)[:80]!r}" if isinstance(node, ast.AST) else "")
                  + ", which is not a plain sympy expression")


def _parse(text: str, what: str) -> ast.AST:
    if not isinstance(text, str) or len(text) > 20_000:
        raise _Unsafe(f"{what} is not a string of at most 20000 characters")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Unsafe(f"{what} {text[:200]!r} is not an expression") from None


def _check_guard_node(node, guard: str) -> None:
    """A guard such as ``L['input_ids'].size()[1] == L['attention_mask'].size()[1]``."""
    if _number(node):
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        return _check_guard_node(node.operand, guard)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITH) and not isinstance(node.op, ast.Pow):
        _check_guard_node(node.left, guard)
        return _check_guard_node(node.right, guard)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_guard_node(v, guard)
        return
    if isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE) for op in node.ops):
        for v in [node.left, *node.comparators]:
            _check_guard_node(v, guard)
        return
    # an input's size or stride: L['name'](['key' or int]...).size()[int], or .storage_offset() / .dim() / .numel()
    if isinstance(node, ast.Subscript) and _number(node.slice):
        node = node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("size", "stride") and not node.args and not node.keywords \
                and _is_input(node.func.value):
            return
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr in ("storage_offset", "dim", "numel") and not node.args and not node.keywords \
            and _is_input(node.func.value):
        return
    raise _Unsafe(f"guard {guard[:200]!r} is not a comparison of input sizes and numbers")


def _is_input(node) -> bool:
    while isinstance(node, ast.Subscript):
        key = node.slice
        if not (isinstance(key, ast.Constant) and (type(key.value) is int or (isinstance(key.value, str)
                                                                             and _SYMBOL.fullmatch(key.value)))):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def _check_treespec(text) -> None:
    try:
        doc = json.loads(text)
    except (TypeError, ValueError):
        raise _Unsafe("an input/output spec is not JSON") from None

    def walk(spec):
        if not isinstance(spec, dict):
            raise _Unsafe("an input/output spec is not a tree of tuples, lists and dicts")
        if spec.get("type") not in (None, "builtins.tuple", "builtins.list", "builtins.dict"):
            raise _Unsafe(f"an input/output spec holds type {str(spec.get('type'))[:80]!r}; "
                          "only tuples, lists and dicts of tensors are accepted")
        ctx = spec.get("context")
        if ctx is not None:
            try:
                ctx = json.loads(ctx) if isinstance(ctx, str) else ctx
            except ValueError:
                raise _Unsafe("an input/output spec has a context that is not JSON") from None
            if ctx is not None and not (isinstance(ctx, list) and all(isinstance(k, (str, int)) for k in ctx)):
                raise _Unsafe("an input/output spec has a context that is not a list of keys")
        for child in spec.get("children_spec") or []:
            walk(child)

    if not (isinstance(doc, list) and len(doc) == 2):
        raise _Unsafe("an input/output spec is not [protocol, tree]")
    walk(doc[1])


def _no_control_chars(text: str, where: str) -> None:
    if any(not c.isprintable() and c not in "\n\t" for c in text):
        raise _Unsafe(f"{where} holds control characters")


def _check_program(doc, path=()) -> None:
    """Every string of ``models/model.json``: see the comment above :data:`PT2_ENTRIES`."""
    if isinstance(doc, dict):
        if "target" in doc:  # a graph node (no other part of the program has a 'target')
            target = doc["target"]
            if not (isinstance(target, str) and _OP_TARGET.fullmatch(target)):
                raise _Unsafe(f"node target {str(target)[:120]!r} is not an ATen operator")
        for key, value in doc.items():
            if not isinstance(key, str) or not _PLAIN.fullmatch(key):
                raise _Unsafe(f"key {str(key)[:80]!r} in {'.'.join(path) or 'the program'}")
            if key == "metadata":  # stack traces, module paths: free text that is never evaluated
                _check_metadata(value)
            elif key == "expr_str":
                _check_sym_node(_parse(value, "shape expression"), value)
            elif key == "guards_code":
                if not isinstance(value, list):
                    raise _Unsafe("guards_code is not a list")
                for guard in value:
                    _check_guard_node(_parse(guard, "guard"), guard)
            elif key in ("in_spec", "out_spec"):
                _check_treespec(value)
            elif key == "torch_version":
                if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.+\-]*", value)):
                    raise _Unsafe("torch_version is not a version")
            else:
                _check_program(value, (*path, key))
    elif isinstance(doc, list):
        for value in doc:
            _check_program(value, path)
    elif isinstance(doc, str) and not _PLAIN.fullmatch(doc):
        raise _Unsafe(f"string {doc[:120]!r} in {'.'.join(path) or 'the program'} is not a name")


def _check_metadata(value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _no_control_chars(str(k), "node metadata")
            _check_metadata(v)
    elif isinstance(value, list):
        for v in value:
            _check_metadata(v)
    elif isinstance(value, str):
        _no_control_chars(value, "node metadata")


def _check_payload(config_bytes: bytes, prefix: str, what: str) -> None:
    try:
        config = json.loads(config_bytes).get("config")
    except (ValueError, AttributeError):
        raise _Unsafe(f"the {what} config is not JSON") from None
    if not isinstance(config, dict):
        raise _Unsafe(f"the {what} config has no 'config' map")
    for fqn, meta in config.items():
        if not _FQN.fullmatch(fqn):
            raise _Unsafe(f"{what} name {fqn[:120]!r} is not a dotted name")
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _Unsafe(f"{what} {fqn} is stored with pickle")
        if not re.fullmatch(rf"{prefix}_\d+", str(meta.get("path_name"))):
            raise _Unsafe(f"{what} {fqn} is stored as {str(meta.get('path_name'))[:80]!r}, not as plain tensor bytes")


def check_pt2_archive(data: bytes) -> None:
    """Raise :class:`ExportError` unless ``data`` (a ``torch.export.save`` archive) is one that
    ``torch.export.load`` can read without running code from it: see the comment above :data:`PT2_ENTRIES`."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _Unsafe(f"not a .pt2 archive ({exc})") from None
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names) or len(set(names)) != len(names):
        raise _Unsafe("not a .pt2 archive of one model (one top folder, no repeated names)")
    (root,) = roots
    rel = {n.split("/", 1)[1]: i for n, i in zip(names, infos)}
    odd = sorted(n for n in rel if not PT2_ENTRIES.fullmatch(n))
    if odd:
        raise _Unsafe(f"the archive holds {', '.join(odd[:5])}: only a plain program (graph, tensors, sample "
                      "inputs) is accepted, not compiled code, pickled objects or extra files")
    if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(data) for i in infos):
        raise _Unsafe("the archive has compressed entries (torch.export.save stores them uncompressed)")
    for need in ("archive_format", "models/model.json", "data/sample_inputs/model.pt",
                 "data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        if need not in rel:
            raise _Unsafe(f"the archive has no {need}")

    def read(name: str) -> bytes:
        return zf.read(f"{root}/{name}")

    if read("archive_format") != b"pt2":
        raise _Unsafe("archive_format is not 'pt2'")
    _check_payload(read("data/weights/model_weights_config.json"), "weight", "weight")
    _check_payload(read("data/constants/model_constants_config.json"), "tensor", "constant")
    torch = _torch()
    try:  # torch.export.load tries weights_only=True first: when it succeeds here, it succeeds there
        sample = torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), weights_only=True)
    except Exception as exc:
        raise _Unsafe(f"the sample inputs are not plain tensors ({type(exc).__name__})") from None
    if not isinstance(sample, (tuple, dict)):
        raise _Unsafe("the sample inputs are not a tuple")
    try:
        program = json.loads(read("models/model.json"))
    except ValueError:
        raise _Unsafe("models/model.json is not JSON") from None
    _check_program(program)


def load_pt2(path: str | Path):
    """A ``torch.export`` program (``torch.export.ExportedProgram``) from a ``.pt2`` file, after
    :func:`check_pt2_archive` accepted the bytes that are then loaded (read once: no file swap between)."""
    torch = _torch()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"could not read {path}: {exc}") from None
    try:
        check_pt2_archive(data)
    except _Unsafe as exc:
        raise ExportError(f"refusing to load {path}: {exc}. autoft loads a .pt2 only when it cannot run code "
                          "while loading; the file was altered or written by something else than autoft export "
                          "with this torch") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ExportError(f"torch {torch.__version__} could not load the torch.export program {path} "
                          f"({type(exc).__name__}: {str(exc)[:300]}); a .pt2 is tied to the torch version that wrote "
                          "it (see model.json 'torch_version'): use that torch, or backend='onnx'") from None


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


def to_rgb(im):
    """A decoded PIL image → RGB, as training reads it: EXIF orientation applied, 16-bit grey scaled to
    8 bits, palette/CMYK/grey converted, alpha dropped (composited on nothing: the colour channels)."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        from PIL import Image

        im = Image.fromarray(np.clip(np.round(a * 255.0 / hi), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


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
                return np.asarray(to_rgb(im), dtype=np.uint8)
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


def _channels(t, channels: int):
    """(N, C, H, W) float: grey repeated to 3 channels, an alpha channel dropped."""
    if t.shape[1] == 1 and channels == 3:
        return t.expand(-1, 3, -1, -1)
    if t.shape[1] == 4:
        return t[:, :3]
    return t


def preset_size(h: int, w: int, resize_size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``resize_size`` (torchvision's rule)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def preset_image(arr: np.ndarray, pre: dict):
    """One uint8 HxWxC array → the network's input (C, S, S) for the weights' preset: values scaled to
    [0, 1], the shorter side resized to ``resize_size`` (``interpolation``, antialiased), the centre
    ``input_size`` square cut out, normalised by ``mean``/``std``.  What ``torchvision.transforms.v2``'s
    Resize, CenterCrop, ToDtype(scale=True) and Normalize do, computed in float32 throughout so that
    training (:mod:`autoft.data`) and serving share these exact numbers."""
    torch = _torch()
    import torch.nn.functional as F

    crop, resize = int(pre["input_size"]), int(pre["resize_size"])
    mode = pre.get("interpolation") or "bilinear"
    t = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1)[None].float() / 255.0
    t = _channels(t, pre.get("channels", 3))
    h, w = t.shape[-2:]
    nh, nw = preset_size(h, w, resize)
    if (nh, nw) != (h, w):
        if mode == "nearest":
            t = F.interpolate(t, size=(nh, nw), mode="nearest")
        else:
            t = F.interpolate(t, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    t = t[..., top:top + crop, left:left + crop]
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((t - mean) / std)[0].contiguous()


def encode_images(images, pre: dict, batch: int = 512):
    """uint8 HxWxC arrays → normalised float tensor (N, C, S, S), as in training.

    With a preset (``resize_size`` in ``preprocessing.json``): :func:`preset_image`, one image at a time.
    Without (older exports, the CIFAR ResNets): the image is resized straight to ``input_size``."""
    torch = _torch()
    import torch.nn.functional as F

    if pre.get("resize_size"):
        out = [preset_image(x, pre) for x in images]
        if not out:
            s = int(pre["input_size"])
            return torch.zeros((0, pre.get("channels", 3), s, s))
        return torch.stack(out).contiguous()
    size = pre.get("input_size")
    channels = pre.get("channels", 3)
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
    out, group = [], []

    def flush():
        t = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).float() / 255.0
        t = _channels(t, channels)
        if size and tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > size)
        out.append((t - mean) / std)
        group.clear()

    for x in images:  # one pass (a lazy sequence decodes each image once); same-shape runs batched
        if group and (x.shape != group[0].shape or len(group) >= batch):
            flush()
        group.append(x)
    if group:
        flush()
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
class _Pt2Backend:
    name = "pt2"

    def __init__(self, path: Path, device: str = "cpu"):
        torch = _torch()
        self.device = device
        program = load_pt2(path)
        try:
            if device != "cpu":
                # an explicit import: torch.export does not import its passes module in every release (2.11)
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            self.module = program.module()
        except Exception as exc:
            raise ExportError(f"could not prepare the torch.export program {path} on {device}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None

    def __call__(self, tensors: tuple) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode():
            out = self.module(*[t.to(self.device) for t in tensors])
        return out.float().cpu().numpy()


class _TorchScriptBackend:
    """Legacy: ``torch.jit.load`` is deprecated (and warns); used only with backend "torchscript", or by
    "auto" for a folder without model.pt2 or a loadable model.onnx."""

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
    threshold: float | None = None  # binary, from calibration.json: positive from this probability on
    positive_index: int | None = None

    @property
    def indices(self) -> np.ndarray:
        if not len(self.probabilities):
            return np.zeros(0, dtype=np.int64)
        if self.threshold is not None and self.positive_index is not None and self.probabilities.shape[1] == 2:
            pos = self.positive_index
            return np.where(self.probabilities[:, pos] >= self.threshold, pos, 1 - pos)
        return self.probabilities.argmax(1)

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
        self.temperature, self.threshold, self.positive_index = 1.0, None, None
        if CALIBRATION in self.manifest["files"]:  # listed = hash-checked above; an unlisted one is not used
            self._calibration(self._json(CALIBRATION))
        files = self.info.get("files")
        if not isinstance(files, dict):
            raise ExportError(f"exported model {self.folder}: {MODEL_INFO} has no 'files' map; the folder was altered")
        have = [k for k in MODEL_FORMATS if files.get(k)]
        if backend == "auto":
            # every model file is checked (inside the folder) before any is loaded, also when verify=False
            paths = {k: self._model_path(files, k) for k in have}
            reasons = []
            for fmt in have:
                try:
                    self._run = self._backend(fmt, paths[fmt], device)
                except ExportError as exc:  # e.g. onnxruntime missing, a .pt2 from another torch
                    reasons.append(f"{fmt}: {exc}")
                    continue
                if reasons:
                    log.warning("exported model %s: backend 'auto' uses %s; could not use %s", self.folder, fmt,
                                "; ".join(reasons))
                backend = fmt
                break
            else:
                raise ExportError(f"exported model {self.folder}: no model file could be loaded: "
                                  + ("; ".join(reasons) or f"{MODEL_INFO} names none"))
        else:
            if not files.get(backend):
                why = self.info.get("export_errors", {}).get(backend)
                raise ExportError(f"{self.folder} has no {backend} model" + (f" (export failed: {why})" if why else "")
                                  + f"; available: {', '.join(have) or 'none'}")
            self._run = self._backend(backend, self._model_path(files, backend), device)
        self.backend = backend
        self._text: TextEncoder | None = None
        if self.modality == "text":
            tok_dir = inside(self.folder, self.preprocessing.get("tokenizer", "tokenizer"),
                             "the tokenizer folder in preprocessing.json")
            self._text = TextEncoder(tok_dir, self.preprocessing.get("max_length", 128))
        log.info("loaded %s (%s, %d classes) with backend %s", self.folder, self.info.get("architecture"),
                 len(self.classes), backend)

    def _model_path(self, files: dict, fmt: str) -> Path:
        target = files[fmt]
        path = inside(self.folder, target, f"the {fmt} file in {MODEL_INFO}")  # also when verify=False
        if not path.is_file():
            raise ExportError(f"exported model {self.folder} is incomplete: missing file {target}")
        return path

    def _backend(self, fmt: str, path: Path, device: str):
        if fmt == "pt2":
            return _Pt2Backend(path, device)
        if fmt == "torchscript":
            return _TorchScriptBackend(path, device)
        return _OnnxBackend(path, self.info["inputs"])

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
                items.append(np.asarray(to_rgb(x), dtype=np.uint8))
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

    def _calibration(self, doc) -> None:
        """Temperature and threshold of ``calibration.json``, checked."""
        where = f"exported model {self.folder}: {CALIBRATION}"
        t = doc.get("temperature", 1.0) if isinstance(doc, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (np.isfinite(t) and t > 0):
            raise ExportError(f"{where} has temperature {t!r}; expected a number above 0")
        self.temperature = float(t)
        th = doc.get("threshold")
        if th is not None:
            pos = doc.get("positive_class")
            if not isinstance(th, (int, float)) or isinstance(th, bool) or not 0 <= th <= 1 \
                    or len(self.classes) != 2 or pos not in self.classes:
                raise ExportError(f"{where}: threshold {th!r} for positive class {pos!r} needs a probability in "
                                  f"[0, 1] and a binary model whose classes include it (classes {self.classes})")
            self.threshold, self.positive_index = float(th), self.classes.index(pos)

    def predict_proba(self, inputs, batch_size: int | None = None) -> np.ndarray:
        """Probabilities: softmax of the logits divided by the export's temperature (1 without calibration)."""
        return softmax(self.logits(inputs, batch_size) / self.temperature)

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
        return Predictions(self.classes, softmax(self._logits(items, batch_size) / self.temperature), names,
                           threshold=self.threshold, positive_index=self.positive_index)


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

    ``backend``: ``"pt2"`` (``model.pt2``, a torch.export program, checked by :func:`load_pt2`), ``"onnx"``
    (needs onnxruntime), ``"torchscript"`` (legacy; ``torch.jit.load`` is deprecated) or ``"auto"``: the first
    of these the folder holds that loads here (a fallback is logged as a warning).
    ``max_image_pixels``: image files whose header declares more pixels are refused before decoding
    (``None``: no limit beyond PIL's own).
    """
    return ExportedModel(folder, backend, verify=verify, device=device, max_image_pixels=max_image_pixels)
