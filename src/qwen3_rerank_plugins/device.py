"""Device and dtype resolution, done once per model and logged."""

from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Pick the device to run on.

    ``"auto"`` (or ``None``) picks CUDA, then Apple MPS, then CPU. An explicit accelerator that is
    not available is an error, never a silent CPU fallback.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The resolved ``torch.device`` (CUDA devices always carry an index).

    Raises:
        ValueError: If the string is not a device name.
        RuntimeError: If the requested accelerator is not available on this machine.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
            ) from exc
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")

    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} was requested but CUDA is not available "
                "(no NVIDIA GPU, or torch was installed without CUDA support). "
                "Use device='cpu' or device='auto'."
            )
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={device!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and not _mps_available():
        raise RuntimeError(f"device={device!r} was requested but Apple MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device type {resolved.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Pick the weights' dtype for a device.

    ``"auto"``: bfloat16 on CUDA GPUs that support it, float16 on other CUDA GPUs and on MPS,
    float32 on CPU (half precision on CPU is slow without dedicated hardware).

    Raises:
        ValueError: For an unknown dtype name or a dtype that is not a floating type.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
