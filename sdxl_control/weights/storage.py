"""fp8 weight storage (ComfyUI's ``--fp8_e4m3fn-unet``): a model's convolution and linear weights are kept in an
8-bit float between uses and cast to the compute dtype one layer at a time, just before that layer runs; the
layer goes back to 8 bits after it. Resident memory for those weights halves (from bf16/fp16); the result is the
model with its weights rounded to fp8, computed at full precision.

The layers are the ones diffusers' ``enable_layerwise_casting`` picks (linear and convolution layers outside the
model's precision-critical modules: normalisations, embeddings' patch/positional layers), and the casts are the same,
so the numbers equal it; the tests show that. It is written here rather than used from diffusers because diffusers'
hooks cannot be removed (a model once cast stays so), while a generator's settings must be undone exactly, and
because weight patches (LoRA, FaceID) must know the compute dtype of a stored layer: a patch is added at the compute
precision and the patched weight rounded to fp8 once (:mod:`sdxl_control.weights.patches`), as ComfyUI patches fp8
weights.

A third kind, ``"fp8_matmul"``, computes in 8 bits too, on GPUs with fp8 matrix units (compute capability 8.9 and
newer: Ada, Hopper, Blackwell; AMD MI300; Intel XPU): the linear layers among those become torchao's float8 layers
(``Float8DynamicActivationFloat8WeightConfig``: e4m3 weights with a scale per output row for bf16 models, one per
tensor for fp16/fp32, and each input scaled and cast to e4m3 as it arrives, see :data:`FP8_MATMUL_MIN_AMAX`), so
the matrix products themselves run in fp8. Convolutions stay in the compute dtype, and torchao leaves out any layer
whose widths are not multiples of 16. The images are those of torchao's own quantization of the same layers, exactly.

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

from ..base.errors import InvalidRequestError

__all__ = [
    "FP8_MATMUL", "FP8_MATMUL_MIN_AMAX", "WEIGHT_STORAGE", "check_storage", "compute_dtype", "narrowed",
    "store_weights", "stored_as", "stored_layers", "storage_dtype", "widened",
]  # fmt: skip

FP8_MATMUL = "fp8_matmul"
WEIGHT_STORAGE: dict[str, torch.dtype] = {
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, FP8_MATMUL: torch.float8_e4m3fn,
}  # fmt: skip

# where torchao's float8 matrix products run (it checks the GPU's generation itself)
_FP8_MATMUL_DEVICES = ("cuda", "xpu")
# The least absolute maximum an input's scale is taken from. torchao divides by it: an input row of zeros (SDXL's
# empty negative prompt is zeroed, so every cross-attention key and value projection of the unconditional half sees
# them) would otherwise become 0/0 = NaN. torchao's float8 training clamps with the same 1e-12.
FP8_MATMUL_MIN_AMAX = 1e-12
# stored layer or model -> the dtype it computes in; weak so that dropped models leave no entries
_COMPUTE: weakref.WeakKeyDictionary[torch.nn.Module, torch.dtype] = weakref.WeakKeyDictionary()
_STORED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()  # model -> storage name
# layer with a float8 weight -> how that weight is quantized from compute-precision values (absent: a cast)
_NARROW: weakref.WeakKeyDictionary[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


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


def widened(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The values of a stored layer's parameter ``name`` (``tensor``: it or a copy of it) at the layer's compute
    precision, in a new tensor."""
    if name == "weight" and layer in _NARROW:
        return tensor.dequantize()
    return tensor.to(_COMPUTE.get(layer, tensor.dtype), copy=True)


def narrowed(layer: torch.nn.Module, name: str, tensor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (compute precision) in the form a stored layer keeps its parameter ``name`` (``tensor``) in, for
    ``tensor.copy_``: a float8 weight quantized as torchao quantizes it; otherwise the values as they are (``copy_``
    rounds them to the parameter's dtype)."""
    narrow = _NARROW.get(layer) if name == "weight" else None
    return values if narrow is None else narrow(tensor, values)


def check_storage(storage: str, device: torch.device) -> None:
    """A clear error when weights cannot be kept as ``storage`` for a model on ``device``: an unknown name, or
    ``"fp8_matmul"`` without torchao or off a GPU (torchao checks the GPU's generation itself when applied)."""
    storage_dtype(storage)
    if storage != FP8_MATMUL:
        return
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise InvalidRequestError(
            'fp8 matmuls need torchao: pip install "sdxl-control[fp8]" (or pip install torchao)'
        ) from None
    if device.type not in _FP8_MATMUL_DEVICES:
        raise InvalidRequestError(
            f"fp8 matmuls need a GPU with fp8 matrix units (NVIDIA compute capability 8.9 or newer, AMD MI300, Intel "
            f'XPU); the model is on {device}: "fp8_e4m3fn" storage halves the weights\' memory there'
        )


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
    first = next(model.parameters())
    compute = first.dtype
    if not compute.is_floating_point or compute.itemsize <= stored.itemsize:
        raise InvalidRequestError(f"fp8 storage needs a model in a wider float dtype, this one is in {compute}")
    if storage == FP8_MATMUL:
        return _store_for_fp8_matmul(model, compute, first.device)
    handles: list[Any] = []
    layers = stored_layers(model)

    def undo() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for layer in layers:
            layer.to(dtype=compute)
            _COMPUTE.pop(layer, None)
        _forget(model)

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


def _forget(model: torch.nn.Module) -> None:
    _COMPUTE.pop(model, None)
    _STORED.pop(model, None)


def _store_for_fp8_matmul(model: torch.nn.Module, compute: torch.dtype, device: torch.device) -> Callable[[], None]:
    """torchao's float8 linear layers in place of the stored linear layers; the undo puts plain weights back, holding
    the values the float8 weights stood for."""
    check_storage(FP8_MATMUL, device)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8Tensor,
        PerRow,
        PerTensor,
        quantize_,
    )

    # torchao's per-row scales need bf16 weights; fp16 and fp32 models take one scale per tensor.
    granularity = PerRow() if compute == torch.bfloat16 else PerTensor()
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, activation_value_lb=FP8_MATMUL_MIN_AMAX)
    candidates = [layer for layer in stored_layers(model) if isinstance(layer, torch.nn.Linear)]
    layers: list[torch.nn.Linear] = []

    def undo() -> None:
        for layer in layers:
            weight = layer.weight
            layer.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=weight.requires_grad)
            _COMPUTE.pop(layer, None)
            _NARROW.pop(layer, None)
        layers.clear()
        _forget(model)

    def narrow(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        kept: Any = weight  # a Float8Tensor: quantized again with its own settings
        return Float8Tensor.from_hp(
            values, float8_dtype=kept.qdata.dtype, granularity=granularity, mm_config=kept.mm_config,
            kernel_preference=kept.kernel_preference, act_quant_kwargs=kept.act_quant_kwargs,
        )  # fmt: skip

    try:
        _COMPUTE[model], _STORED[model] = compute, FP8_MATMUL
        for layer in candidates:
            quantize_(layer, config)
            if isinstance(layer.weight, Float8Tensor):  # torchao leaves widths that are not multiples of 16 alone
                layers.append(layer)
                _COMPUTE[layer], _NARROW[layer] = compute, narrow
    except AssertionError as exc:  # torchao's own check of the GPU
        undo()
        raise InvalidRequestError(f"fp8 matmuls cannot run here: {exc}") from None
    except BaseException:
        undo()
        raise
    return undo
