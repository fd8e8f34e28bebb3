"""The fast path: speed settings for a generator's models, applied explicitly and undone exactly.

Nothing here changes what a model computes beyond floating-point rounding:

* ``channels_last`` stores convolution weights NHWC, the layout tensor cores read without transposes;
* ``fuse_qkv`` runs each self-attention's query/key/value projections (and each cross-attention's key/value) as one
  matrix product. The fused matrix is the storage and the three weights become views into it, so memory does not
  grow and weight patches (LoRA, FaceID), which write in place, reach the fused matrix without any bookkeeping;
* ``compile`` hands either the UNet's repeated transformer blocks (``"blocks"``, PyTorch's regional compilation:
  one compile serves every block of a shape, so it takes a fraction of a whole-model compile) or the whole UNet
  (``"unet"``) to ``torch.compile``; ``compile_mode="reduce-overhead"`` adds CUDA graphs, which the loop allows: it
  never reads the device back, and weight patches write in place, so captured addresses stay valid.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..base.defaults import FAST_LEVELS
from ..base.errors import IncompatibleModelError, InvalidRequestError
from .attention import attention_layers

__all__ = ["FAST_LEVELS", "FastPath", "FastPathHandle", "apply_fast_path", "match_fast_path"]


@dataclass(frozen=True)
class FastPath:
    """Which speed settings to apply; the defaults are the ones that need no compile time.

    ``compile_backend`` and ``compile_mode`` are passed to ``torch.compile`` (``"max-autotune-no-cudagraphs"``
    searches kernels for minutes; ``"reduce-overhead"`` records CUDA graphs). ``fullgraph`` makes a break in a
    compiled region an error instead of a silent slow-down. One block class serves every width of the base,
    refiner and ControlNets, with and without adapter branches, and each combination is a graph of its own:
    ``recompile_limit`` raises torch's process-wide limit (8) on graphs per code object to at least this.

    Example:
        >>> gen.set_fast_path(FastPath(compile="blocks"))  # doctest: +SKIP
        >>> gen.set_fast_path(None)                        # back to the plain models  # doctest: +SKIP
    """

    channels_last: bool = True
    fuse_qkv: bool = True
    compile: Literal["off", "blocks", "unet"] = "off"
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    fullgraph: bool = True
    recompile_limit: int = 64

    def __post_init__(self) -> None:
        if self.compile not in ("off", "blocks", "unet"):
            raise InvalidRequestError(f"compile must be 'off', 'blocks' or 'unet', got {self.compile!r}")

    @classmethod
    def level(cls, name: str, **options: Any) -> FastPath | None:
        """The fast path of a named level of :data:`FAST_LEVELS` (``None`` for ``"off"``)."""
        if name not in FAST_LEVELS:
            raise InvalidRequestError(f"unknown fast-path level {name!r}: use one of {', '.join(FAST_LEVELS)}")
        if name == "off":
            return None
        return cls(compile="off" if name == "layout" else name, **options)  # type: ignore[arg-type]


class _FusedLinear:
    """Stands in for ``attn.to_qkv`` / ``attn.to_kv`` (what diffusers' fused processor calls): one product with the
    fused matrix. Not a module, so the model's parameter list and state dict do not change."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _fuse(linears: Sequence[torch.nn.Linear]) -> _FusedLinear:
    weight = torch.cat([lin.weight.data for lin in linears])
    has_bias = all(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.data for lin in linears]) if has_bias else None  # type: ignore[union-attr]
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]  # same Parameter object, now a view
        if bias is not None:
            lin.bias.data = bias[start : start + rows]  # type: ignore[union-attr]
        start += rows
    return _FusedLinear(weight, bias)


def _unfuse(linears: Sequence[torch.nn.Linear]) -> None:
    for lin in linears:
        lin.weight.data = lin.weight.data.clone()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data.clone()


def _fuse_attention(unet: Any) -> Callable[[], None]:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    fused: list[tuple[Any, Any, str, list[torch.nn.Linear]]] = []
    for module in attention_layers(unet).values():
        # Only layers running the plain SDPA processor: anything else (a loaded adapter's) is left as it is.
        if not isinstance(module, Attention) or type(module.processor) is not AttnProcessor2_0:
            continue
        if module.is_cross_attention:
            attr, parts = "to_kv", [module.to_k, module.to_v]
        else:
            attr, parts = "to_qkv", [module.to_q, module.to_k, module.to_v]
        if len({(p.in_features, p.bias is None) for p in parts}) != 1:
            continue
        setattr(module, attr, _fuse(parts))
        fused.append((module, module.processor, attr, parts))
        module.set_processor(FusedAttnProcessor2_0())

    def undo() -> None:
        for module, processor, attr, parts in fused:
            module.set_processor(processor)
            delattr(module, attr)
            _unfuse(parts)

    return undo


def _compile(module: torch.nn.Module, fast: FastPath) -> Callable[[], None]:
    if fast.compile == "blocks":
        # ControlNets declare no repeated blocks; theirs are the UNet's transformer blocks.
        kinds = set(getattr(module, "_repeated_blocks", ()) or ("BasicTransformerBlock",))
        targets = [m for m in module.modules() if type(m).__name__ in kinds]
        if not targets:
            raise IncompatibleModelError(
                f"{type(module).__name__} names no repeated blocks to compile; use compile='unet'"
            )
    else:
        targets = [module]
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, fast.recompile_limit)
    for target in targets:
        target.compile(fullgraph=fast.fullgraph, mode=fast.compile_mode, backend=fast.compile_backend)

    def undo() -> None:
        for target in targets:
            target._compiled_call_impl = None

    return undo


def _memory_format(module: torch.nn.Module, layout: torch.memory_format) -> Callable[[], None]:
    module.to(memory_format=layout)  # Parameters keep their identity: .to() swaps their data in place

    def undo() -> None:
        module.to(memory_format=torch.contiguous_format)

    return undo


@dataclass
class FastPathHandle:
    """What :func:`apply_fast_path` changed, to be undone once, in reverse order.

    Example:
        >>> handle = apply_fast_path([unet], [vae], FastPath()); handle.undo()  # doctest: +SKIP
    """

    fast: FastPath
    _undo: list[Callable[[], None]]

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def apply_fast_path(unets: Sequence[Any], others: Sequence[torch.nn.Module], fast: FastPath) -> FastPathHandle:
    """Apply ``fast`` to the UNets (all settings) and to ``others`` (the memory layout only, e.g. VAEs).

    If any step fails, the steps already taken are undone before the error propagates.
    """
    handle = FastPathHandle(fast, [])
    try:
        for unet in unets:
            if fast.channels_last:
                handle._undo.append(_memory_format(unet, torch.channels_last))
            if fast.fuse_qkv:
                handle._undo.append(_fuse_attention(unet))
            if fast.compile != "off":
                handle._undo.append(_compile(unet, fast))
        for module in others:
            if fast.channels_last:
                handle._undo.append(_memory_format(module, torch.channels_last))
    except BaseException:
        handle.undo()
        raise
    return handle


# Condition-owned models (ControlNets) are cached across calls: each remembers the fast path it carries.
_CONDITION_MODELS: weakref.WeakKeyDictionary[torch.nn.Module, FastPathHandle] = weakref.WeakKeyDictionary()


def match_fast_path(model: torch.nn.Module, fast: FastPath | None) -> None:
    """Give a condition's own model the fast path of the call it serves (undoing another one it carries).

    Example:
        >>> match_fast_path(controlnet, ctx.fast)  # in a condition's prepare  # doctest: +SKIP
    """
    handle = _CONDITION_MODELS.get(model)
    if (handle.fast if handle is not None else None) == fast:
        return
    if handle is not None:
        handle.undo()
        del _CONDITION_MODELS[model]
    if fast is not None:
        _CONDITION_MODELS[model] = apply_fast_path([model], [], fast)
