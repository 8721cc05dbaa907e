"""The device of a search, decided once.

``resolve_device`` turns the task's ``device`` (``cpu``, ``auto``, ``cuda``, ``cuda:N``, ``mps``) into
the device every part of a search uses (the ranking, the trials, the final check): ``auto`` is the
first CUDA GPU when there is one, else Apple's MPS, else the CPU. Asking for a device that is not
there is an error, not a silent fall back to the CPU.
"""
from __future__ import annotations

import torch

from autoft.errors import ConfigError


def resolve_device(spec: str | None) -> str:
    spec = (spec or "cpu").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{spec}' was asked for, but this machine has no CUDA GPU that torch can use "
                              "(use device: auto or cpu)", field="device")
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{spec}': this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                              field="device")
        return spec
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' was asked for, but MPS is not available here", field="device")
        return spec
    if spec != "cpu":
        raise ConfigError(f"device '{spec}' is not one of cpu, auto, cuda, cuda:N, mps", field="device")
    return spec
