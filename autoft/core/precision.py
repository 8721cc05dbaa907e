"""Numeric precision of a trial: ``auto | fp32 | bf16 | fp16`` (``TrialConfig.precision``).

* ``fp32``: no autocast; the exact computation autoft has always done (the default on CPU).
* ``bf16`` / ``fp16``: the trainable part of the network (unfrozen stages, pooling, head) and the loss
  run under :func:`torch.autocast` with that dtype; weights, gradients and optimizer states stay
  float32 (mixed precision, not half-precision training). ``fp16`` adds a gradient scaler
  (:class:`torch.amp.GradScaler`) so that small gradients do not underflow; bf16 has float32's range
  and needs none.
* ``auto``: bf16 on a CUDA GPU that computes it natively (compute capability 8.0 or newer: A100,
  H100, RTX 30xx/40xx), else fp32 (the CPU, MPS, older GPUs: ``fp16`` is never picked for you).

What stays float32 whatever the precision: the **frozen prefix** (it is computed with autocast off, and
the feature cache stores it in float32, so a cached entry is the same whichever precision a trial
asked for, and ``use_cache=True`` still gives the same numbers as ``use_cache=False``), the weights,
the optimizer, the loss value that is reported and the logits handed to the metrics.

What autocast does to exactness: a bf16/fp16 trial is **not** bit-for-bit the fp32 trial; matrix
products and convolutions of the trainable part round their inputs to 8 (bf16) or 11 (fp16) bits of
mantissa, so losses and scores differ in the 2nd-3rd significant digit and a search ranks
configurations by slightly noisier scores. Exported models are float32 and their parity checks
compare float32 to float32.
"""
from __future__ import annotations

import contextlib

import torch

from autoft.core.env import env_flag
from autoft.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_bf16_native(device: torch.device | str | None = None) -> bool:
    """True when ``device`` (a CUDA GPU) computes bfloat16 natively (Ampere, compute capability >= 8)."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        return False
    try:
        return torch.cuda.get_device_capability(dev)[0] >= 8
    except Exception:  # noqa: BLE001 - an unusual driver: do not guess
        return False


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """The precision a trial runs in on ``device``: ``fp32``, ``bf16`` or ``fp16``."""
    p = (precision or "auto").strip().lower()
    if p not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}", field="precision")
    dev = torch.device(device)
    if p == "auto":
        return "bf16" if dev.type == "cuda" and cuda_bf16_native(dev) else "fp32"
    if p != "fp32" and dev.type not in ("cuda", "cpu", "mps"):
        raise ConfigError(f"precision '{p}' is not supported on device '{dev}'", field="precision")
    return p


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    return _DTYPES.get(precision)


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` for the resolved ``precision`` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def no_autocast(device: torch.device | str):
    """Autocast switched off (the frozen prefix always runs in float32); a no-op when it is not on."""
    dev = torch.device(device)
    try:
        on = torch.is_autocast_enabled(dev.type)
    except (TypeError, RuntimeError):
        on = False
    return torch.autocast(device_type=dev.type, enabled=False) if on else contextlib.nullcontext()


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (disabled, it passes ``backward``/``step`` through)."""
    dev = torch.device(device)
    enabled = precision == "fp16"
    return torch.amp.GradScaler(dev.type if enabled else "cpu", enabled=enabled)


def channels_last(backbone, device: torch.device | str) -> bool:
    """Whether to use the channels-last memory format: image backbones on CUDA (tensor cores read
    NHWC; on the CPU autoft keeps the contiguous format it always used). ``AUTOFT_CHANNELS_LAST=0``: never."""
    if not env_flag("AUTOFT_CHANNELS_LAST", True):
        return False
    return torch.device(device).type == "cuda" and getattr(backbone.preprocessing, "modality", "") == "image"


def configure_backends(device: torch.device | str) -> None:
    """cuDNN autotuning on CUDA is off unless ``AUTOFT_CUDNN_BENCHMARK=1``: it autotunes every new batch shape
    (training batch, last partial batch, prefix and evaluation batches) before its first use, and a search's
    trials are short. Measured on an H100 (benchmarks/results/gpu-*.md): a first MobileNetV2 trial on the
    ants/bees photos took 6.7 s with it and 2.4 s without, later epochs ran at the same speed."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = env_flag("AUTOFT_CUDNN_BENCHMARK", False)
