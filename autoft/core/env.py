"""On/off switches read from environment variables (``AUTOFT_LATENCY``, ``AUTOFT_GPU_RESIDENT``, ...): one rule."""
from __future__ import annotations

import os

OFF = ("0", "off", "no", "false")
ON = ("1", "on", "yes", "true")


def env_flag(name: str, default: bool) -> bool:
    """``name`` as a switch: 0/off/no/false is off, 1/on/yes/true is on, unset or anything else is ``default``."""
    value = os.environ.get(name, "").strip().lower()
    return False if value in OFF else True if value in ON else default
