"""Weight patches that undo exactly, in any order.

Each patched weight keeps its original Parameter and the deltas currently applied to it; every change recomputes
``original + sum(deltas)`` from the original, and when the last delta is removed the original Parameter object goes
back. So weights are bit-identical afterwards whatever order patches come and go in (a LoRA fused at its window's
first step after another condition's patch, say), and no drift accumulates.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

__all__ = ["WeightPatch"]


class _Slot:
    def __init__(self, original: torch.nn.Parameter) -> None:
        self.original = original
        self.deltas: dict[int, torch.Tensor] = {}  # patch id -> delta, in insertion order


# owner module -> attribute name -> slot; weak so that dropped models free their backups
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Slot]] = weakref.WeakKeyDictionary()


def _refresh(owner: torch.nn.Module, attr: str, slot: _Slot) -> None:
    if not slot.deltas:
        setattr(owner, attr, slot.original)
        del _SLOTS[owner][attr]
        return
    value = slot.original.detach().clone()
    for delta in slot.deltas.values():
        value += delta
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))


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
                if slot.original.shape != delta.shape:
                    raise ValueError(
                        f"{name}: patch of shape {tuple(delta.shape)} for a weight of {tuple(slot.original.shape)}"
                    )
                slots[attr] = slot
                slot.deltas[id(self)] = delta.to(slot.original.device, slot.original.dtype)
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
