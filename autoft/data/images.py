"""Image files read lazily: a sequence of paths that decodes an image only when it is indexed.

:func:`scan_images` reads every file's *header* once (size, mode; no pixels), so that unreadable and
truncated files, decompression bombs and images that need converting are known, counted and named
before any trial, without holding a single decoded image.  :class:`ImageFiles` is the list the rest
of autoft indexes (``data.inputs[i]`` is an HxWx3 uint8 array, decoded on the spot): EXIF orientation
applied and 16-bit, CMYK, palette, grey and RGBA images converted to RGB exactly as the exported
model's runtime does (:func:`autoft.export.runtime.to_rgb`).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoft.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _truncated(path: Path, fmt: str | None) -> bool:
    """A cheap end-of-file check for the two common formats (no decoding): a JPEG ends with its EOI
    marker, a PNG with its IEND chunk.  Catches files cut short by a failed copy or download."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 32))
            tail = f.read()
    except OSError:
        return True
    if fmt == "JPEG":
        return b"\xff\xd9" not in tail[-16:]
    if fmt == "PNG":
        return b"IEND" not in tail
    return False


@dataclass
class ScanResult:
    paths: list[Path] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)  # positions (in the given paths) that are readable
    sizes: list[tuple[int, int]] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)

    def notes(self, max_image_pixels: int) -> list[str]:
        notes = [f"converted {n} {mode} image(s) to RGB" for mode, n in sorted(self.converted.items())]
        if self.skipped:
            notes.append(f"skipped {len(self.skipped)} unreadable image(s): " + "; ".join(self.skipped[:5])
                         + (" ..." if len(self.skipped) > 5 else ""))
        if self.too_large:
            notes.append(f"skipped {len(self.too_large)} image(s) declaring more than {max_image_pixels} pixels "
                         "(possible decompression bombs; raise data.max_image_pixels to load them): "
                         + "; ".join(self.too_large[:5]) + (" ..." if len(self.too_large) > 5 else ""))
        if len(set(self.sizes)) > 1:
            notes.append(f"images have {len(set(self.sizes))} different sizes; each is resized and cropped "
                         "to the backbone's input")
        return notes


def scan_images(paths: list[Path], max_image_pixels: int) -> ScanResult:
    """Header of every file: which are readable, their sizes and modes (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    out = ScanResult(paths=list(paths))
    for i, f in enumerate(paths):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(f)  # the header only
            with opened as im:
                w, h = im.size
                if w * h > max_image_pixels:
                    out.too_large.append(f"{f} ({w}x{h})")
                    continue
                if _truncated(Path(f), im.format):
                    out.skipped.append(f"{f} (truncated)")
                    continue
                if im.mode != "RGB":
                    out.converted[im.mode] += 1
                out.keep.append(i)
                out.sizes.append((h, w))
        except Image.DecompressionBombError as exc:
            m = re.search(r"\((\d+) pixels\)", str(exc))
            out.too_large.append(f"{f} ({m.group(1)} pixels)" if m else f"{f} (DecompressionBombError)")
        except FileNotFoundError:
            out.skipped.append(f"{f} (FileNotFoundError)")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            out.skipped.append(f"{f} ({type(exc).__name__})")
    return out


def decode_image(path: str | os.PathLike, max_image_pixels: int | None = None) -> np.ndarray:
    """One image file → HxWx3 uint8 (EXIF orientation applied, converted to RGB)."""
    from PIL import Image

    from autoft.export.runtime import to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_image_pixels is not None and im.size[0] * im.size[1] > max_image_pixels:
                raise DataError(f"{path}: declares {im.size[0]}x{im.size[1]} pixels, above max_image_pixels")
            im.load()
            return np.asarray(to_rgb(im), dtype=np.uint8)


class ImageFiles(Sequence):
    """A list of image files that decodes on indexing (``files[i]`` → HxWx3 uint8).

    Holds only the paths (and their sizes and modification times, which make its :meth:`digest`), so it
    is cheap to copy into DataLoader worker processes.  A file that fails to decode later (changed on
    disk after the scan) raises :class:`DataError` naming it."""

    def __init__(self, paths: list[str | os.PathLike], max_image_pixels: int | None = None):
        self.paths = [str(p) for p in paths]
        self.max_image_pixels = max_image_pixels
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ImageFiles(self.paths[i], self.max_image_pixels)
        path = self.paths[i]
        try:
            return decode_image(path, self.max_image_pixels)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"could not decode image {path} ({type(exc).__name__}: {exc}); it changed since it "
                            "was scanned, or is damaged past its header") from None

    def __add__(self, other: "ImageFiles") -> "ImageFiles":
        return ImageFiles(self.paths + list(other.paths), self.max_image_pixels)

    def digest(self) -> str:
        """Paths, sizes and modification times: changes when a file is added, removed or rewritten."""
        if self._digest is None:
            h = hashlib.sha256()
            for p in self.paths:
                try:
                    st = os.stat(p)
                    h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\0".encode("utf-8", "surrogatepass"))
                except OSError:
                    h.update(f"{p}|missing\0".encode("utf-8", "surrogatepass"))
            self._digest = h.hexdigest()
        return self._digest

    def __getstate__(self):
        return {"paths": self.paths, "max_image_pixels": self.max_image_pixels, "_digest": self._digest}

    def __setstate__(self, st):
        self.__dict__.update(st)


def list_class_folder(path: Path) -> tuple[list[Path], list[str], list[Path]]:
    """(files, class name per file, class folders) of a folder with one sub-folder per class."""
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected one sub-folder per class)")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {path} has no sub-folders; expected one sub-folder per class "
                        "holding that class's images")
    files, names = [], []
    for cdir in class_dirs:
        for f in sorted(cdir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                names.append(cdir.name)
    return files, names, class_dirs
