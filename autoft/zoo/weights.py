"""Pretrained weights resolved the torchvision way: a URL plus a sha256, through a cache folder.

Lookup: ``<folder>/<file>``, where the folder is ``<AUTOFT_HOME>/weights`` (see :mod:`autoft.home`)
unless the spec names another (torchvision's ``$TORCH_HOME/hub/checkpoints``).  A file that is
present is hashed before anything reads it: against the full sha256 where the record has one,
otherwise against the hash prefix in its name (torchvision's ``<name>-<first 8 hex of sha256>.pth``,
the check ``torch.hub`` applies only at download time).  A missing file is downloaded only when the
network is allowed (``AUTOFT_OFFLINE`` unset), then verified the same way before it is kept.  Files
are read with ``torch.load(..., weights_only=True)`` only: no pickled code ever runs, even in a
file whose hash matches.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoft.errors import WeightsError
from autoft.home import offline, weights_dir

log = logging.getLogger(__name__)
_VERIFIED: dict[tuple[str, float, int], str] = {}


# torch.hub's convention: the hash prefix is what follows the last '-' up to the first '.'
HASH_PREFIX = re.compile(r"-([a-f0-9]{8,64})\.")
AUTOFT_HINT = "or point AUTOFT_HOME at a folder whose weights/ sub-folder holds it"


@dataclass(frozen=True)
class WeightsSpec:
    """Where a weights file comes from and what it must hash to.

    ``sha256``: the full hash, or ``None`` to check the prefix in the file name instead
    (torchvision's files).  ``folder``: the cache folder, default ``<AUTOFT_HOME>/weights`` (called
    at lookup time, so that environment variables set later count); ``hint``: how to point autoft at another folder."""

    url: str
    sha256: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    folder: Callable[[], Path] | None = field(default=None, hash=False, compare=False)
    hint: str = field(default=AUTOFT_HINT, hash=False, compare=False)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def expected(self) -> str:
        """The full sha256, or the prefix in the file name; a file with neither is never trusted."""
        if self.sha256:
            return self.sha256.lower()
        m = HASH_PREFIX.search(self.filename)
        if m is None:
            raise WeightsError(f"weights file '{self.filename}' has no recorded sha256 and no hash prefix "
                               "in its name; refusing to load a file that cannot be verified.")
        return m.group(1)

    def local_path(self) -> Path:
        return Path((self.folder or weights_dir)()) / self.filename

    def is_available(self) -> bool:
        return self.local_path().is_file()


def sha256_of(path: Path) -> str:
    """sha256 of a file, memoised on (path, mtime, size) so repeated trials do not re-hash."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _VERIFIED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


def _matches(digest: str, expected: str) -> bool:
    return digest.startswith(expected) if len(expected) < 64 else digest == expected


def _kind(expected: str) -> str:
    return "sha256" if len(expected) == 64 else "sha256 starting with"


def resolve(spec: WeightsSpec) -> Path:
    """Return the verified local path of ``spec``, downloading it if allowed and missing."""
    path = spec.local_path()
    expected = spec.expected
    if not path.is_file():
        if offline():
            raise WeightsError(
                f"weights file '{spec.filename}' is not in {path.parent} and downloads are disabled "
                f"(AUTOFT_OFFLINE/HF_HUB_OFFLINE is set). Download it from {spec.url} into that folder, "
                f"{spec.hint}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        log.info("downloading %s to %s", spec.url, path)
        try:
            torch.hub.download_url_to_file(spec.url, str(tmp), progress=False)
        except Exception as exc:  # network errors come in many types
            tmp.unlink(missing_ok=True)
            raise WeightsError(
                f"weights file '{spec.filename}' is not in {path.parent} and could not be downloaded "
                f"from {spec.url} ({type(exc).__name__}: {exc}). Put the file in that folder by hand, "
                f"{spec.hint}.") from None
        digest = sha256_of(tmp)
        if not _matches(digest, expected):
            tmp.unlink(missing_ok=True)
            raise WeightsError(f"downloaded {spec.url} has sha256 {digest}, expected {_kind(expected)} "
                               f"{expected}; the file was discarded.")
        tmp.replace(path)
    digest = sha256_of(path)
    if not _matches(digest, expected):
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, expected {_kind(expected)} {expected}. The file "
            "is corrupt or not the published one; refusing to load it (it was not read). Delete it (it "
            "will be downloaded again) or replace it with the original.")
    return path


def load_state(spec: WeightsSpec) -> dict:
    """The verified file's contents, read with ``weights_only=True`` (tensors and plain containers)."""
    return read_state_file(resolve(spec))


def read_state_file(path: Path) -> dict:
    """A file's tensors: safetensors files through ``safetensors`` (no code can run), anything else
    with ``torch.load(..., weights_only=True)``.  Call only on a verified file."""
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"reading {path} needs the 'safetensors' package: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"could not read weights file {path} ({type(exc).__name__}: {exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":  # (pickle itself is not imported in autoft)
            raise WeightsError(f"could not read weights file {path} ({type(exc).__name__}: {exc})") from None
        # torch's message suggests weights_only=False; relay only what it found in the file
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        found = f" (it refers to {m.group(1)})" if m else ""
        raise WeightsError(
            f"weights file {path} holds more than tensors{found}. Reading it would run pickled code, "
            "which autoft never allows (torch.load with weights_only=True refused it); it was not loaded. "
            "Use a checkpoint that holds only a state dict of tensors.") from None


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


# --- files that are not downloaded by autoft ---------------------------------------------------------

def verify_file(path: Path, sha256: str, what: str = "weights file") -> Path:
    """Check that ``path`` exists and hashes to ``sha256`` (full hash, or a prefix of at least 8
    hex digits) before anything reads it; :class:`WeightsError` naming the file otherwise."""
    path = Path(path)
    expected = (sha256 or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise WeightsError(f"{what} {path}: the recorded sha256 {sha256!r} is not a hex digest; refusing to load "
                           "a file that cannot be verified (write the file's full sha256, e.g. from 'sha256sum')")
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    digest = sha256_of(path)
    if not _matches(digest, expected):
        raise WeightsError(
            f"{what} {path} has sha256 {digest}, expected {_kind(expected)} {expected}. The file is corrupt or "
            "not the declared one; refusing to load it (it was not read).")
    return path


def load_verified(path: Path, sha256: str, what: str = "weights file") -> dict:
    """``verify_file`` then :func:`read_state_file`."""
    return read_state_file(verify_file(path, sha256, what))


def verify_hub_blob(path: Path, what: str = "weights file") -> Path:
    """A file in a Hugging Face hub cache (``.../snapshots/<rev>/<file>``, a link to
    ``.../blobs/<sha256>`` for large files): its content must hash to its blob name."""
    path = Path(path)
    blob = path.resolve()
    name = blob.name
    if not re.fullmatch(r"[0-9a-f]{64}", name):
        raise WeightsError(f"{what} {path} is not a content-addressed blob of a Hugging Face cache (its target "
                           f"{blob} is not named by a sha256); refusing to load a file that cannot be verified")
    verify_file(blob, name, what)
    return path


def package_file_sha256(package: str, relpath: str) -> str | None:
    """The sha256 an installed distribution's RECORD lists for one of its files (None if unlisted)."""
    import base64
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.as_posix() == relpath and f.hash is not None and f.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None
