"""Where models run: the default device and dtype, devices checked before anything moves onto them, and a model's
placement read cheaply.

Example:
    >>> default_device_and_dtype("cpu", None)
    (device(type='cpu'), torch.float32)
"""

from __future__ import annotations

import torch

from ..base.errors import DeviceError, InvalidRequestError
from ..weights.storage import compute_dtype

__all__ = ["default_device_and_dtype", "check_device", "placement"]


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when there is a GPU, else CPU in fp32; either can be overridden. A device that does not exist
    here is refused now, not at the first tensor moved onto it."""
    dev = _device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidRequestError(f"dtype must be a torch floating-point dtype (torch.float16, ...), got {dtype!r}")
    if dtype is None:
        dtype = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    return dev, dtype


def check_device(name: str | torch.device) -> torch.device:
    """``name`` as a device of this machine; a :class:`DeviceError` now for one it does not have."""
    return _device(name)


def _device(name: str | torch.device) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r}: this machine has no CUDA device torch can use (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):  # meta: shapes only, for tracing and tests
        raise DeviceError(f"device {name!r}: sdxl-control runs on cpu, cuda or mps")
    return dev


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a model's first parameter (for a model kept in fp8, the dtype it computes in).

    diffusers' ``model.device`` / ``model.dtype`` walk every module to answer (milliseconds on a full UNet, several
    times per call); our models are moved and cast whole, so the first parameter speaks for all.
    """
    first = next(model.parameters())
    return first.device, compute_dtype(model) or first.dtype
