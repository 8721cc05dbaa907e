"""Where autoft keeps downloaded weights, data and caches.

``AUTOFT_HOME`` (environment variable) wins; otherwise ``$XDG_CACHE_HOME/autoft`` or
``~/.cache/autoft``.  Weights live in ``<home>/weights``, data in ``<home>/data``.
"""
from __future__ import annotations

import os
from pathlib import Path


def autoft_home() -> Path:
    env = os.environ.get("AUTOFT_HOME")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "autoft").resolve()


def weights_dir() -> Path:
    return autoft_home() / "weights"


def offline() -> bool:
    """True when downloads are forbidden (``AUTOFT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "") in ("1", "true", "yes") for v in ("AUTOFT_OFFLINE", "HF_HUB_OFFLINE"))
