"""Weight patches that undo exactly: patched copies replace parameters, and ``restore`` puts the original
Parameter objects back, so weights are bit-identical afterwards without keeping a second copy of the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["WeightPatch"]


class WeightPatch:
    """Add ``deltas`` (parameter name -> tensor of the same shape) to a model's parameters until ``restore``.

    Patches stack: a second patch on the same weight starts from the first one's result, and restoring in reverse
    order returns each step exactly.

    Example:
        >>> patch = WeightPatch(unet, {"down_blocks.1.attentions.0.proj_in.weight": delta})  # doctest: +SKIP
        >>> patch.restore()                                                                  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
        self._saved: list[tuple[torch.nn.Module, str, Any]] = []
        try:
            for name, delta in deltas.items():
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                original = getattr(owner, attr)
                if original.shape != delta.shape:
                    raise ValueError(
                        f"{name}: patch of shape {tuple(delta.shape)} for a weight of {tuple(original.shape)}"
                    )
                patched = original.detach() + delta.to(original.device, original.dtype)
                self._saved.append((owner, attr, original))
                setattr(owner, attr, torch.nn.Parameter(patched, requires_grad=False))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        while self._saved:
            owner, attr, original = self._saved.pop()
            setattr(owner, attr, original)
