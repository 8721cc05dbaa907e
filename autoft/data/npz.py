"""``.npz`` image arrays, memory-mapped instead of read into memory.

``np.load`` cannot memory-map a member of an ``.npz`` (a zip of ``.npy`` files).  :func:`map_member` does it:

* a member **stored uncompressed** (``np.savez``) is mapped in place: its ``.npy`` header is parsed at its
  offset inside the zip (the local file header says where the data starts) and the pixels are
  ``np.memmap``-ed at that offset;
* a member **compressed** (``np.savez_compressed``) is extracted once, streamed (never whole in memory), to
  a ``.npy`` in the feature cache folder (``<cache>/arrays``, same key and eviction rules as the feature
  files; keyed by the file's path, size, modification time and member) and that file is mapped.

Object arrays are refused (no pickles, as ``allow_pickle=False``).  :class:`NpzImages` is the lazy list of
images the rest of autoft indexes: ``images[i]`` converts one image to HxWxC uint8 with the same rule as
the whole array had before (one scale for the whole array).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoft.errors import DataError

log = logging.getLogger(__name__)
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header: 30 bytes


def _read_npy_header(f, what: str) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise DataError(f"{what}: unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects (pickled); only plain numeric arrays are read")
    return tuple(shape), bool(fortran), np.dtype(dtype)


class NpyMap:
    """An array stored as ``.npy`` bytes at ``offset`` of ``path``, memory-mapped when first used
    (picklable: a DataLoader worker maps the file again)."""

    def __init__(self, path: str | Path, data_offset: int, shape: tuple, dtype, fortran: bool, how: str):
        self.path, self.offset, self.shape = str(path), int(data_offset), tuple(shape)
        self.dtype, self.fortran, self.how = np.dtype(dtype), bool(fortran), how
        self._mm = None

    def array(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                                 order="F" if self.fortran else "C")
        return self._mm

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}


def _extraction_folder() -> Path | None:
    from autoft.core.cache import default_cache_dir

    folder = default_cache_dir()
    return folder / "arrays" if folder is not None else None


def map_member(path: str | Path, name: str, folder: str | Path | None = None) -> NpyMap:
    """The array ``name`` of the ``.npz`` at ``path``, memory-mapped (see the module docstring).
    ``folder``: where a compressed member is extracted (default: the feature cache's ``arrays`` folder)."""
    path = Path(path)
    what = f"{path} (array '{name}')"
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name + ".npy")
    except KeyError:
        raise DataError(f"{path}: no array '{name}'") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"could not read {path} as a NumPy .npz file: {exc}") from None
    if info.flag_bits & 0x1:
        raise DataError(f"{what}: encrypted zip members are not supported")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
            if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise DataError(f"{what}: damaged zip (no local file header at {info.header_offset})")
            fields = _LOCAL_HEADER.unpack(head)
            start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]  # + name + extra field
            f.seek(start)
            shape, fortran, dtype = _read_npy_header(f, what)
            data_offset = f.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if data_offset - start + nbytes > info.file_size:
            raise DataError(f"{what}: the array's header declares {nbytes} bytes, more than the member holds")
        log.info("%s: stored uncompressed, memory-mapped in place (%.1f MB)", what, nbytes / 1e6)
        return NpyMap(path, data_offset, shape, dtype, fortran, "mapped in place (stored uncompressed)")
    return _extract_and_map(path, name, info, folder, what)


def _extract_and_map(path: Path, name: str, info: zipfile.ZipInfo, folder, what: str) -> NpyMap:
    from autoft.core.cache import ArrayStore, default_disk_bytes

    st = path.stat()
    key = repr(sorted({"kind": "npz member", "path": str(path.resolve()), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "member": name, "crc": info.CRC}.items()))
    folder = Path(folder) if folder is not None else _extraction_folder()
    tmpdir = None
    if folder is None:  # no cache folder (AUTOFT_CACHE_DIR=off): a private one, removed with the array
        import tempfile

        tmpdir = tempfile.TemporaryDirectory(prefix="autoft-npz-")
        folder = Path(tmpdir.name)
    store = ArrayStore(folder, default_disk_bytes())
    target = store.path(key)
    reused = store.get_array(key) is not None
    if not reused:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with zipfile.ZipFile(path) as zf, zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)  # streamed: never the whole array in memory
            with open(tmp, "rb") as f:
                _read_npy_header(f, what)  # a member that is no plain .npy is refused before it is kept
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        store.commit(key, target)
    with open(target, "rb") as f:
        shape, fortran, dtype = _read_npy_header(f, what)
        data_offset = f.tell()
    log.info("%s: stored compressed, %s %s and memory-mapped (%.1f MB)", what,
             "extracted earlier to" if reused else "extracted once to", target,
             int(np.prod(shape, dtype=np.int64)) * dtype.itemsize / 1e6)
    m = NpyMap(target, data_offset, shape, dtype, fortran, f"extracted to {target} (stored compressed)")
    m._tmpdir = tmpdir  # kept alive as long as the mapping
    return m


def uint8_scale(arr: np.ndarray, chunk: int = 1024) -> float | None:
    """The one scale of a non-uint8 image array (its maximum, as float64), read in chunks; None for uint8."""
    if arr.dtype == np.uint8:
        return None
    hi = None
    for i in range(0, len(arr), chunk):
        part = arr[i:i + chunk]
        if part.size:
            m = float(np.asarray(part, dtype=np.float64).max())
            hi = m if hi is None or m > hi else hi
    return 1.0 if hi is None else hi


class NpzImages(Sequence):
    """Images of a memory-mapped ``.npz`` array, converted one at a time when indexed.

    ``layout``: ``grey`` (N, H, W), ``nhwc`` or ``nchw``; ``scale``: the whole array's maximum for a
    non-uint8 array (see :func:`autoft.data.datasets._to_uint8_image`), None for uint8."""

    def __init__(self, source: NpyMap, layout: str, scale: float | None, rows: np.ndarray | None = None):
        self.source, self.layout, self.scale = source, layout, scale
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.source.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return NpzImages(self.source, self.layout, self.scale, np.arange(len(self))[i] if self.rows is None
                             else self.rows[i])
        from autoft.data.datasets import _to_uint8_image

        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        j = int(self.rows[i]) if self.rows is not None else i % len(self)
        x = np.asarray(self.source.array()[j])
        if self.layout == "grey":
            x = x[..., None]
        elif self.layout == "nchw":
            x = np.transpose(x, (1, 2, 0))
        return np.ascontiguousarray(_to_uint8_image(x, self.scale))

    def __add__(self, other):
        from autoft.data.lazy import Chain

        return Chain(self, other)

    def digest(self) -> str:
        """The file (path, size, modification time), where the array lies in it, and the rows taken."""
        st = os.stat(self.source.path)
        h = hashlib.sha256(f"{self.source.path}|{st.st_size}|{st.st_mtime_ns}|{self.source.offset}|"
                           f"{self.source.shape}|{self.source.dtype}|{self.layout}|{self.scale}".encode())
        if self.rows is not None:
            h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()
