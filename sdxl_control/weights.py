"""Weight patches that undo exactly, in any order, in place.

Each patched weight keeps a copy of its original values and the deltas currently applied to it; every change
rewrites ``original + sum(deltas)`` into the same Parameter's storage, and when the last delta is removed the original
values are copied back. So weights are bit-identical afterwards whatever order patches come and go in (a LoRA fused
at its window's first step after another condition's patch, say), no drift accumulates, and the parameters never
change identity or address: compiled graphs, CUDA graphs and views of fused weights (see :mod:`sdxl_control.fast`)
stay valid while patches come and go.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

from .storage import compute_dtype, narrowed, widened

__all__ = ["WeightPatch"]


class _Slot:
    def __init__(self, parameter: torch.nn.Parameter) -> None:
        self.parameter = parameter
        self.saved = parameter.detach().clone()
        self.deltas: dict[int, torch.Tensor] = {}  # patch id -> delta, in insertion order


# owner module -> attribute name -> slot; weak so that dropped models free their backups
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Slot]] = weakref.WeakKeyDictionary()


def _refresh(owner: torch.nn.Module, attr: str, slot: _Slot) -> None:
    target = slot.parameter.data
    if compute_dtype(owner) is not None and slot.deltas:
        # A layer kept in fp8 (see sdxl_control.storage): the sum at the compute precision, rounded to fp8 once.
        value = widened(owner, attr, slot.saved)
        for delta in slot.deltas.values():
            value += delta
        target.copy_(narrowed(owner, attr, target, value))
    else:
        target.copy_(slot.saved)
        for delta in slot.deltas.values():
            target += delta
    if not slot.deltas:
        del _SLOTS[owner][attr]


class WeightPatch:
    """Add ``deltas`` (parameter name -> tensor of the same shape) to a model's parameters until ``restore``.

    Example:
        >>> patch = WeightPatch(unet, {"down_blocks.1.attentions.0.proj_in.weight": delta})  # doctest: +SKIP
        >>> patch.restore()                                                                  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
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
                slot.deltas[id(self)] = delta.to(slot.parameter.device, compute_dtype(owner) or slot.parameter.dtype)
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
