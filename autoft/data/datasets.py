"""Labelled datasets for image and text classification.

Sources: scikit-learn's bundled ``digits``; an ``image_folder`` (one sub-folder per class) and an
``image_table`` (CSV/Parquet of paths and labels), both read lazily (headers scanned, pixels decoded
when indexed, :mod:`autoft.data.images`); a text table (CSV/TSV/JSONL/Parquet) of text and label;
NumPy ``npz`` arrays (memory-mapped, :mod:`autoft.data.npz`).  Every loader returns a
:class:`LabelledData` and raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoft.errors import DataError
from autoft.export.runtime import DEFAULT_MAX_IMAGE_PIXELS  # light: the standard library and NumPy

log = logging.getLogger(__name__)
from autoft.data.images import IMAGE_SUFFIXES  # noqa: E402
# Images whose header declares more than DEFAULT_MAX_IMAGE_PIXELS pixels are skipped before decoding
# (decompression bombs: a 196-byte PNG can declare 30000x30000).  The same limit as predicting from an
# exported model: a 48 MP photo (8000x6000) loads, 10000x10000 does not.  data.max_image_pixels
# in a task file overrides it.
__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_SUFFIXES", "LabelledData", "load_csv", "load_digits_data",
           "load_image_folder", "load_image_table", "load_npz"]


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
        if callable(getattr(self.inputs, "digest", None)):  # image files: paths, sizes, mtimes (not decoded)
            h.update(self.inputs.digest().encode())
            self._fingerprint = h.hexdigest()[:16]
            return self._fingerprint
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


def _to_uint8_image(arr: np.ndarray, hi: float | None = None) -> np.ndarray:
    """uint8 as it is; other dtypes scaled by ``hi`` (default: ``arr``'s own maximum) to 0..255."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if hi is None:
            hi = a.max() if a.size else 1.0
        a = a * (255.0 / hi) if hi > 1.0 else a * 255.0
        arr = np.clip(a.round(), 0, 255).astype(np.uint8)
    return arr


def load_image_folder(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> LabelledData:
    """One sub-folder per class, read lazily: only the headers are read here (no pixels); ``inputs`` is an
    :class:`~autoft.data.images.ImageFiles` that decodes an image when indexed (EXIF orientation applied,
    converted to RGB).  Unreadable or truncated images and images whose header declares more than
    ``max_image_pixels`` pixels are skipped (named in ``notes`` and the log), never decoded; images
    converted to RGB (grey, 16-bit, CMYK, palette, RGBA) are counted in ``notes``."""
    from autoft.data.images import list_class_folder

    if max_image_pixels < 1:
        raise DataError(f"max_image_pixels must be at least 1, got {max_image_pixels}")
    files, names, class_dirs = list_class_folder(path)
    return _image_files(files, names, str(path), max_image_pixels, what=f"image folder {path}",
                        looked=f"{', '.join(sorted(IMAGE_SUFFIXES))} in {len(class_dirs)} class folders")


def _image_files(files: list, names: list[str], source: str, max_image_pixels: int, what: str,
                 looked: str, class_names: list[str] | None = None) -> LabelledData:
    from autoft.data.images import ImageFiles, scan_images

    scan = scan_images(files, max_image_pixels)
    notes = scan.notes(max_image_pixels)
    for n in notes:
        log.warning("%s: %s", source, n)
    if not scan.keep:
        raise DataError(f"{what} holds no readable images (looked for {looked}"
                        + (f"; {len(scan.too_large)} declare more than {max_image_pixels} pixels "
                           "(data.max_image_pixels)" if scan.too_large else "") + ")")
    kept = [names[i] for i in scan.keep]
    if class_names is None:
        labels, classes = _labels_from_names(kept, source)
    else:
        classes = list(class_names)
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[n] for n in kept], dtype=np.int64)
    inputs = ImageFiles([files[i] for i in scan.keep], max_image_pixels)
    return LabelledData(inputs, labels, classes, "image", source, notes)


def load_image_table(path: Path, path_column: str = "path", label_column: str = "label", sep: str | None = None,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> LabelledData:
    """A CSV/TSV or Parquet table of image paths (relative to the table's folder, or absolute) and labels,
    read lazily like an image folder.  Missing columns, and paths that do not exist (the first few named),
    are errors."""
    df = _read_table(path, sep, "utf-8")
    _need_columns(df, path, (("path_column", path_column), ("label_column", label_column)))
    df = df[[path_column, label_column]].astype(str)
    df = _drop_empty_labels(df, label_column, path)
    base = path.parent
    files = [Path(p) if Path(p).is_absolute() else base / p for p in df[path_column].tolist()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(files)} image path(s) in column '{path_column}' do not "
                        f"exist, e.g. {', '.join(missing[:3])} (relative paths are relative to the table's folder)")
    return _image_files(files, df[label_column].str.strip().tolist(), str(path), max_image_pixels,
                        what=f"image table {path}", looked=f"the {len(files)} files it lists")


def _read_table(path: Path, sep: str | None, encoding: str):
    """CSV/TSV (``sep`` or guessed), JSON lines (``.jsonl``) or Parquet (``.parquet``, needs pyarrow), as strings."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            try:
                df = pd.read_parquet(path)
            except ImportError:
                raise DataError(f"reading {path} needs pyarrow: pip install 'autoft[parquet]' (or pyarrow)") from None
            return df.astype({c: str for c in df.columns})
        if suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(path, lines=True, dtype=False, encoding=encoding)
            return df.astype({c: str for c in df.columns})
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"could not read {path} ({type(exc).__name__}: {exc})") from None
    if sep is None:
        sep = "\t" if suffix in (".tsv", ".tab") or "\t" in _first_line(path, encoding) else ","
    try:
        return pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False,
                           quoting=3 if sep == "\t" else 0)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid {encoding} text ({exc.reason} at byte {exc.start}); "
                        "set data.encoding in the task file (for example latin-1)") from None
    except Exception as exc:
        raise DataError(f"could not parse {path} as a table separated by {sep!r}: {exc}") from None


def _need_columns(df, path: Path, roles) -> None:
    for role, col in roles:
        if col not in df.columns:
            from autoft.errors import did_you_mean

            raise DataError(f"{path}: no column '{col}' (data.{role}){did_you_mean(col, df.columns)}; "
                            f"columns are {list(df.columns)}")


def _drop_empty_labels(df, label_column: str, path: Path):
    empty = (df[label_column].str.strip() == "")
    if empty.any():
        log.warning("%s: skipped %d row(s) with an empty label", path, int(empty.sum()))
        df = df[~empty]
    return df


def load_csv(path: Path, text_column: str = "text", label_column: str = "label", sep: str | None = None,
             encoding: str = "utf-8") -> LabelledData:
    """A text table: CSV/TSV, JSON lines (``.jsonl``) or Parquet (``.parquet``).  Rows with an empty label
    or an empty text are skipped and counted."""
    df = _read_table(path, sep, encoding)
    _need_columns(df, path, (("text_column", text_column), ("label_column", label_column)))
    df = df[[text_column, label_column]]
    df = _drop_empty_labels(df, label_column, path)
    notes = []
    blank = df[text_column].str.strip() == ""
    if blank.any():
        notes.append(f"skipped {int(blank.sum())} row(s) with an empty text")
        log.warning("%s: %s", path, notes[-1])
        df = df[~blank]
    labels, classes = _labels_from_names(df[label_column].str.strip().tolist(), str(path))
    return LabelledData(df[text_column].tolist(), labels, classes, "text", str(path), notes)


def _first_line(path: Path, encoding: str) -> str:
    with open(path, encoding=encoding, errors="replace") as f:
        return f.readline()


def load_npz(path: Path, x_key: str = "x", y_key: str = "y") -> LabelledData:
    """Images ``x_key`` and labels ``y_key`` of an ``.npz``.  The images are memory-mapped, not read
    (:mod:`autoft.data.npz`: in place when stored uncompressed, else extracted once to the cache folder) and
    converted to HxWxC uint8 one at a time when indexed; the labels are read."""
    from autoft.data.npz import NpzImages, map_member, uint8_scale

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"could not read {path} as a NumPy .npz file: {exc}") from None
    with arrays:
        for role, key in (("x_key", x_key), ("y_key", y_key)):
            if key not in arrays.files:
                raise DataError(f"{path}: no array '{key}' (data.{role}); arrays are {arrays.files}")
        y = arrays[y_key]
        names = arrays["class_names"] if "class_names" in arrays.files else None
    xm = map_member(path, x_key)
    shape = xm.shape
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: array '{x_key}' has shape {shape}; expected images (N, H, W) or (N, H, W, C)")
    if len(shape) == 3:
        layout = "grey"  # (N, H, W) grey → (N, H, W, 1)
    elif shape[1] in (1, 3) and shape[-1] not in (1, 3):
        layout = "nchw"  # NCHW → NHWC per image
    else:
        layout = "nhwc"
    x = NpzImages(xm, layout, uint8_scale(xm.array()))  # one scale for the whole array, not one per image
    if names is not None:
        classes = [str(c) for c in names]
        labels = y.astype(np.int64)
    else:
        labels, classes = _labels_from_names([str(v) for v in y.tolist()], str(path))
        if np.issubdtype(y.dtype, np.integer):
            classes = sorted(classes, key=int)
            labels = np.array([classes.index(str(v)) for v in y.tolist()], dtype=np.int64)
    return LabelledData(x, labels, classes, "image", str(path), [f"images {xm.how}"])
