"""fp8 weight storage (ComfyUI's ``--fp8_e4m3fn-unet``): a model's convolution and linear weights are kept in an
8-bit float between uses and cast to the compute dtype one layer at a time, just before that layer runs; the
layer goes back to 8 bits after it. Resident memory for those weights halves (from bf16/fp16); the result is the
model with its weights rounded to fp8, computed at full precision.

The layers are the ones diffusers' ``enable_layerwise_casting`` picks (linear and convolution layers outside the
model's precision-critical modules: normalisations, embeddings' patch/positional layers), and the casts are the same,
so the numbers equal it; the tests show that. It is written here rather than used from diffusers because diffusers'
hooks cannot be removed (a model once cast stays so), while a generator's settings must be undone exactly, and
because weight patches (LoRA, FaceID) must know the compute dtype of a stored layer: a patch is added at the compute
precision and the patched weight rounded to fp8 once (:mod:`sdxl_control.weights`), as ComfyUI patches fp8 weights.

Example:
    >>> undo = store_weights(unet, "fp8_e4m3fn")   # doctest: +SKIP
    >>> undo()                                      # the layers back in the compute dtype, hooks gone  # doctest: +SKIP
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import InvalidRequestError

__all__ = ["WEIGHT_STORAGE", "compute_dtype", "store_weights", "stored_as", "stored_layers", "storage_dtype"]

WEIGHT_STORAGE: dict[str, torch.dtype] = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# stored layer or model -> the dtype it computes in; weak so that dropped models leave no entries
_COMPUTE: weakref.WeakKeyDictionary[torch.nn.Module, torch.dtype] = weakref.WeakKeyDictionary()
_STORED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()  # model -> storage name


def storage_dtype(name: str) -> torch.dtype:
    """The dtype of a storage name (``"fp8_e4m3fn"``, ``"fp8_e5m2"``); a clear error for any other."""
    if name not in WEIGHT_STORAGE:
        raise InvalidRequestError(f"unknown weight storage {name!r}: use one of {', '.join(WEIGHT_STORAGE)}")
    return WEIGHT_STORAGE[name]


def compute_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype a stored layer, or a model with stored layers, computes in; ``None`` for one that is not stored."""
    return _COMPUTE.get(module)


def stored_as(model: torch.nn.Module) -> str | None:
    """The storage a model's layers are kept in (``"fp8_e4m3fn"``...), ``None`` when in its compute dtype: what a
    model serving it (a ControlNet for a UNet) is kept in too."""
    return _STORED.get(model)


def _skip_patterns(model: Any) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    extra = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
             *(getattr(model, "_skip_layerwise_casting_patterns", None) or ())]  # fmt: skip
    return (*DEFAULT_SKIP_MODULES_PATTERN, *extra)


def stored_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers fp8 storage keeps in 8 bits: as diffusers' ``enable_layerwise_casting`` walks the model, a module
    whose name matches a skip pattern is left out with everything under it, and a supported layer is taken whole."""
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    patterns = _skip_patterns(model)

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[torch.nn.Module]:
        if prefix and any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            yield module
            return
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    return list(walk(model, ""))


def store_weights(model: torch.nn.Module, storage: str) -> Callable[[], None]:
    """Keep ``model``'s layers (see :func:`stored_layers`) in ``storage`` between uses, computing in the dtype the
    model has now; returns the undo, which casts them back to that dtype (their values stay rounded to fp8) and
    removes the hooks. A model already stored is refused."""
    if model in _COMPUTE:
        raise InvalidRequestError("this model's weights are already kept in fp8")
    stored = storage_dtype(storage)
    compute = next(model.parameters()).dtype
    if not compute.is_floating_point or compute.itemsize <= stored.itemsize:
        raise InvalidRequestError(f"fp8 storage needs a model in a wider float dtype, this one is in {compute}")
    handles: list[Any] = []
    layers = stored_layers(model)

    def undo() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for layer in layers:
            layer.to(dtype=compute)
            _COMPUTE.pop(layer, None)
        _COMPUTE.pop(model, None)
        _STORED.pop(model, None)

    def widen(layer: torch.nn.Module, args: Any) -> None:
        layer.to(dtype=compute)

    def narrow(layer: torch.nn.Module, args: Any, output: Any) -> None:
        layer.to(dtype=stored)

    try:
        _COMPUTE[model], _STORED[model] = compute, storage
        for layer in layers:
            _COMPUTE[layer] = compute
            layer.to(dtype=stored)
            handles += [layer.register_forward_pre_hook(widen), layer.register_forward_hook(narrow)]
    except BaseException:
        undo()
        raise
    return undo
