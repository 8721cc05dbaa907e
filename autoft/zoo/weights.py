"""Pretrained weights resolved the torchvision way: a URL plus a sha256, through a cache folder.

Lookup order: ``<AUTOFT_HOME>/weights/<file>`` (see :mod:`autoft.home`).  A file that is present
must match its sha256 (prefix in the file name, full hash here); a missing file is downloaded
only when the network is allowed (``AUTOFT_OFFLINE`` unset), then verified.  Files are read with
``torch.load(..., weights_only=True)``: no pickled code ever runs.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoft.errors import WeightsError
from autoft.home import offline, weights_dir

log = logging.getLogger(__name__)
_VERIFIED: dict[tuple[str, float, int], str] = {}


@dataclass(frozen=True)
class WeightsSpec:
    url: str
    sha256: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def local_path(self) -> Path:
        return weights_dir() / self.filename

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


def resolve(spec: WeightsSpec) -> Path:
    """Return the verified local path of ``spec``, downloading it if allowed and missing."""
    path = spec.local_path()
    if not path.is_file():
        if offline():
            raise WeightsError(
                f"weights file '{spec.filename}' is not in {path.parent} and downloads are disabled "
                f"(AUTOFT_OFFLINE/HF_HUB_OFFLINE is set). Download it from {spec.url} into that folder, "
                f"or point AUTOFT_HOME at a folder whose weights/ sub-folder holds it.")
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
                f"or set AUTOFT_HOME to a folder whose weights/ sub-folder holds it.") from None
        digest = sha256_of(tmp)
        if digest != spec.sha256:
            tmp.unlink(missing_ok=True)
            raise WeightsError(f"downloaded {spec.url} has sha256 {digest}, expected {spec.sha256}; "
                               "the file was discarded.")
        tmp.replace(path)
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, expected {spec.sha256}. The file is corrupt "
            "or not the published one; refusing to load it. Delete it (it will be downloaded again) "
            "or replace it with the original.")
    return path


def load_state(spec: WeightsSpec) -> dict:
    path = resolve(spec)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"could not read weights file {path}: {exc}") from None
