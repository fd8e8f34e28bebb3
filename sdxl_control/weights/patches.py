"""Weight patches that undo exactly, in any order, in place.

Each patched weight keeps a copy of its original values (in CPU memory, pinned for a CUDA device: not beside the
model) and the deltas currently applied to it; every change rewrites ``original + sum(deltas)`` into the same
Parameter's storage, and when the last delta is removed the original values are copied back. So weights are bit-identical afterwards whatever order patches come and go in (a LoRA fused
at its window's first step after another condition's patch, say), no drift accumulates, and the parameters never
change identity or address: compiled graphs, CUDA graphs and views of fused weights (see
:mod:`sdxl_control.protocol.fast`) stay valid while patches come and go.

A delta is a tensor of the weight's shape or a :class:`LowRankDelta`, a LoRA's factors, multiplied out only while a
weight is rewritten: a rank-128 LoRA over every transformer linear layer of SDXL's base UNet would be 8.2 GiB of
products in float32, and is 0.6 GiB of bf16 factors with one product at a time.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .storage import compute_dtype, narrowed, widened

__all__ = ["LowRankDelta", "WeightDelta", "WeightPatch"]


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """The delta ``scale * up @ down`` of a LoRA module, kept as its factors and multiplied out (on their device, in
    ``dtype``: by default theirs) only when it is added. For a convolution (LoCon) ``down`` is ``(rank, in, k, k)``
    and ``up`` ``(out, rank, 1, 1)``, and the product takes the weight's ``(out, in, k, k)`` shape.

    Example:
        >>> delta = LowRankDelta(torch.ones(4, 2), torch.ones(2, 3), scale=0.5)
        >>> tuple(delta.shape), delta.dense()[0, 0].item()
        ((4, 3), 1.0)
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    dtype: torch.dtype | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def dense(self) -> torch.Tensor:
        up, down = self.up.flatten(1).to(self.dtype), self.down.flatten(1).to(self.dtype)
        return (up @ down).reshape(self.shape) * self.scale


WeightDelta = torch.Tensor | LowRankDelta


class _Slot:
    def __init__(self, parameter: torch.nn.Parameter) -> None:
        self.parameter = parameter
        self.saved = _restore_copy(parameter.detach())
        self.deltas: dict[int, WeightDelta] = {}  # patch id -> delta, in insertion order


def _restore_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` to restore it from, in CPU memory: beside the model on an accelerator it would cost as much
    device memory as the weights it patches (4.1 GiB for a rank-128 LoRA over SDXL's base UNet), where it is read
    only when a patch comes or goes. Pinned for a CUDA device, so the copies back run at the bus's full speed.
    A tensor subclass (torchao's fp8 matmul weights) keeps its copy on its device: it need not support pinned copies;
    so does a tensor on PyTorch's ``meta`` device, which has no values to copy.
    """
    if value.device.type in ("cpu", "meta") or type(value) is not torch.Tensor:
        return value.clone()
    saved = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=value.device.type == "cuda")
    return saved.copy_(value)


def _added(delta: WeightDelta, like: torch.Tensor) -> torch.Tensor:
    """``delta`` as a tensor to add to ``like`` (a dense delta was converted when its patch was made)."""
    return delta.dense().to(like.device, like.dtype) if isinstance(delta, LowRankDelta) else delta


# owner module -> attribute name -> slot; weak so that dropped models free their backups
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Slot]] = weakref.WeakKeyDictionary()


def _refresh(owner: torch.nn.Module, attr: str, slot: _Slot) -> None:
    target = slot.parameter.data
    if compute_dtype(owner) is not None and slot.deltas:
        # A layer kept in fp8 (see sdxl_control.weights.storage): the sum at the compute precision, rounded to fp8 once.
        value = widened(owner, attr, slot.saved.to(target.device))
        for delta in slot.deltas.values():
            value += _added(delta, value)
        target.copy_(narrowed(owner, attr, target, value))
    else:
        target.copy_(slot.saved)
        for delta in slot.deltas.values():
            target += _added(delta, target)
    if not slot.deltas:
        del _SLOTS[owner][attr]


class WeightPatch:
    """Add ``deltas`` (parameter name -> tensor of the same shape, or :class:`LowRankDelta`) to a model's parameters
    until ``restore``.

    Example:
        >>> patch = WeightPatch(unet, {"down_blocks.1.attentions.0.proj_in.weight": delta})  # doctest: +SKIP
        >>> patch.restore()                                                                  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, deltas: Mapping[str, WeightDelta]) -> None:
        self._targets: list[tuple[torch.nn.Module, str]] = []
        try:
            for name, delta in deltas.items():
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                slots = _SLOTS.setdefault(owner, {})
                slot = slots.get(attr) or _Slot(getattr(owner, attr))
                if slot.parameter.shape != delta.shape:
                    raise ValueError(
                        f"{name}: patch of shape {tuple(delta.shape)} for a weight of {tuple(slot.parameter.shape)}"
                    )
                slots[attr] = slot
                if isinstance(delta, torch.Tensor):
                    delta = delta.to(slot.parameter.device, compute_dtype(owner) or slot.parameter.dtype)
                slot.deltas[id(self)] = delta
                self._targets.append((owner, attr))
                _refresh(owner, attr, slot)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        while self._targets:
            owner, attr = self._targets.pop()
            slot = _SLOTS.get(owner, {}).get(attr)
            if slot is not None and slot.deltas.pop(id(self), None) is not None:
                _refresh(owner, attr, slot)
