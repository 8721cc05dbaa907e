"""Labelled datasets for image and text classification, loaded into memory.

Sources: scikit-learn's bundled ``digits``; an ``image_folder`` (one sub-folder per class);
a ``csv`` / TSV of text and label; NumPy ``npz`` arrays.  Every loader returns a
:class:`LabelledData` and raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoft.errors import DataError
from autoft.export.runtime import DEFAULT_MAX_IMAGE_PIXELS  # light: the standard library and NumPy

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Images whose header declares more than DEFAULT_MAX_IMAGE_PIXELS pixels are skipped before decoding
# (decompression bombs: a 196-byte PNG can declare 30000x30000).  The same limit as predicting from an
# exported model: a 48 MP photo (8000x6000) loads, 10000x10000 does not.  data.max_image_pixels
# in a task file overrides it.
__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_SUFFIXES", "LabelledData", "load_csv", "load_digits_data",
           "load_image_folder", "load_npz"]


@dataclass
class LabelledData:
    """Inputs and integer labels. ``inputs`` is a list of HxWxC uint8 arrays (image) or strings (text)."""

    inputs: list
    labels: np.ndarray
    class_names: list[str]
    modality: str
    source: str = ""
    notes: list[str] = field(default_factory=list)  # what was converted or skipped while loading

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.inputs) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Content hash: changes whenever the inputs, labels or classes change (memoised)."""
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.sha256()
        h.update(repr(self.class_names).encode())
        h.update(self.labels.tobytes())
        for x in self.inputs:
            h.update(x.encode("utf-8", "surrogatepass") if isinstance(x, str) else np.ascontiguousarray(x).tobytes())
            h.update(b"\0")
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def validate(self) -> "LabelledData":
        if len(self) == 0:
            raise DataError(f"{self.source}: the dataset is empty (no examples were loaded)")
        counts = Counter(self.labels.tolist())
        if len(counts) < 2:
            only = self.class_names[next(iter(counts))] if counts else "?"
            raise DataError(f"{self.source}: every example has the same label ('{only}'); "
                            "classification needs at least 2 classes")
        return self


def _labels_from_names(names: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    classes = sorted({str(n) for n in names})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[str(n)] for n in names], dtype=np.int64), classes


def load_digits_data() -> LabelledData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    return LabelledData(list(images), d.target, [str(c) for c in d.target_names], "image", "digits")


def _to_uint8_image(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        hi = a.max() if a.size else 1.0
        a = a * (255.0 / hi) if hi > 1.0 else a * 255.0
        arr = np.clip(a.round(), 0, 255).astype(np.uint8)
    return arr


def load_image_folder(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> LabelledData:
    """One sub-folder per class.  Unreadable images and images whose header declares more than
    ``max_image_pixels`` pixels are skipped (named in ``notes`` and the log), never decoded."""
    from PIL import Image, UnidentifiedImageError

    if max_image_pixels < 1:
        raise DataError(f"max_image_pixels must be at least 1, got {max_image_pixels}")
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected one sub-folder per class)")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {path} has no sub-folders; expected one sub-folder per class "
                        "holding that class's images")
    inputs, names, skipped, too_large, converted = [], [], [], [], Counter()
    for cdir in class_dirs:
        for f in sorted(cdir.rglob("*")):
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with warnings.catch_warnings():
                    # PIL warns above its own global limit; ours is checked below, from the header
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    opened = Image.open(f)  # reads the header only
                with opened as im:
                    w, h = im.size
                    if w * h > max_image_pixels:
                        too_large.append(f"{f} ({w}x{h})")
                        continue
                    im.load()
                    if im.mode != "RGB":
                        converted[im.mode] += 1
                        im = im.convert("RGB")
                    inputs.append(np.asarray(im, dtype=np.uint8))
                    names.append(cdir.name)
            except Image.DecompressionBombError as exc:  # above 2x PIL's global limit: PIL refuses it
                m = re.search(r"\((\d+) pixels\)", str(exc))
                too_large.append(f"{f} ({m.group(1)} pixels)" if m else f"{f} (DecompressionBombError)")
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                skipped.append(f"{f} ({type(exc).__name__})")
    notes = [f"converted {n} {mode} image(s) to RGB" for mode, n in sorted(converted.items())]
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped[:5])
                     + (" ..." if len(skipped) > 5 else ""))
    if too_large:
        notes.append(f"skipped {len(too_large)} image(s) declaring more than {max_image_pixels} pixels "
                     "(possible decompression bombs; raise data.max_image_pixels to load them): "
                     + "; ".join(too_large[:5]) + (" ..." if len(too_large) > 5 else ""))
    sizes = {x.shape[:2] for x in inputs}
    if len(sizes) > 1:
        notes.append(f"images have {len(sizes)} different sizes; all are resized to the backbone's input")
    for n in notes:
        log.warning("%s: %s", path, n)
    if not inputs:
        raise DataError(f"image folder {path} holds no readable images (looked for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))} in {len(class_dirs)} class folders"
                        + (f"; {len(too_large)} declare more than {max_image_pixels} pixels "
                           "(data.max_image_pixels)" if too_large else "") + ")")
    labels, classes = _labels_from_names(names, str(path))
    return LabelledData(inputs, labels, classes, "image", str(path), notes)


def load_csv(path: Path, text_column: str = "text", label_column: str = "label", sep: str | None = None,
             encoding: str = "utf-8") -> LabelledData:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in _first_line(path, encoding) else ","
    try:
        df = pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False,
                         quoting=3 if sep == "\t" else 0)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid {encoding} text ({exc.reason} at byte {exc.start}); "
                        "set data.encoding in the task file (for example latin-1)") from None
    except Exception as exc:
        raise DataError(f"could not parse {path} as a table separated by {sep!r}: {exc}") from None
    for role, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in df.columns:
            from autoft.errors import did_you_mean

            raise DataError(f"{path}: no column '{col}' (data.{role}){did_you_mean(col, df.columns)}; "
                            f"columns are {list(df.columns)}")
    df = df[[text_column, label_column]]
    empty = (df[label_column].str.strip() == "")
    if empty.any():
        log.warning("%s: skipped %d row(s) with an empty label", path, int(empty.sum()))
        df = df[~empty]
    labels, classes = _labels_from_names(df[label_column].str.strip().tolist(), str(path))
    return LabelledData(df[text_column].tolist(), labels, classes, "text", str(path))


def _first_line(path: Path, encoding: str) -> str:
    with open(path, encoding=encoding, errors="replace") as f:
        return f.readline()


def load_npz(path: Path, x_key: str = "x", y_key: str = "y") -> LabelledData:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"could not read {path} as a NumPy .npz file: {exc}") from None
    for role, key in (("x_key", x_key), ("y_key", y_key)):
        if key not in arrays.files:
            raise DataError(f"{path}: no array '{key}' (data.{role}); arrays are {arrays.files}")
    x, y = arrays[x_key], arrays[y_key]
    if x.ndim not in (3, 4):
        raise DataError(f"{path}: array '{x_key}' has shape {x.shape}; expected images (N, H, W) or (N, H, W, C)")
    if x.ndim == 3:
        x = x[..., None]  # (N, H, W) grey → (N, H, W, 1)
    elif x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))  # NCHW → NHWC
    x = _to_uint8_image(x)  # one scale for the whole array, not one per image
    if "class_names" in arrays.files:
        classes = [str(c) for c in arrays["class_names"]]
        labels = y.astype(np.int64)
    else:
        labels, classes = _labels_from_names([str(v) for v in y.tolist()], str(path))
        if np.issubdtype(y.dtype, np.integer):
            classes = sorted(classes, key=int)
            labels = np.array([classes.index(str(v)) for v in y.tolist()], dtype=np.int64)
    return LabelledData(list(x), labels, classes, "image", str(path))
