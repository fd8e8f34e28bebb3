"""Guidance: how the model's predictions for one step are batched and combined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

__all__ = ["Guidance", "ClassifierFreeGuidance", "NoGuidance", "guidance_for"]


class Guidance(Protocol):
    """``copies`` is how many times the latents are stacked per forward; ``combine`` turns that back into one.

    Example:
        >>> guidance_for(5.0, unet).copies  # doctest: +SKIP
        2
    """

    @property
    def copies(self) -> int: ...

    def combine(self, prediction: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoGuidance:
    """One forward pass per step, prediction used as is (guidance scale <= 1, distilled models).

    Example:
        >>> NoGuidance().combine(torch.ones(1)).item()
        1.0
    """

    copies: ClassVar[int] = 1

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """``uncond + scale * (cond - uncond)`` on a ``[uncond, cond]`` batch, with optional rescale (arXiv 2305.08891).

    With composable prompts (A1111's ``AND``), the batch is ``[uncond, cond_1, ..., cond_k]`` and ``weights`` gives
    each part's weight: ``uncond + sum_i (cond_i - uncond) * (weight_i * scale)``, summed in order as A1111's
    ``combine_denoised``; the rescale then measures the guided result against ``uncond + sum_i weight_i * (cond_i -
    uncond)`` (the parts' prediction without the scale).

    Example:
        >>> ClassifierFreeGuidance(5.0).combine(torch.tensor([0.0, 1.0])).item()
        5.0
        >>> ClassifierFreeGuidance(2.0, weights=(1.0, 0.5)).combine(torch.tensor([0.0, 1.0, 2.0])).item()
        4.0
    """

    scale: float
    rescale: float = 0.0
    weights: tuple[float, ...] = (1.0,)

    @property
    def copies(self) -> int:
        return 1 + len(self.weights)

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        if self.weights == (1.0,):
            uncond, cond = prediction.chunk(2)
            guided = uncond + self.scale * (cond - uncond)
        else:
            uncond, *conds = prediction.chunk(self.copies)
            guided, cond = uncond.clone(), uncond.clone()
            for part, weight in zip(conds, self.weights, strict=True):
                guided += (part - uncond) * (weight * self.scale)
                cond += (part - uncond) * weight
        if self.rescale > 0.0:
            dims = list(range(1, cond.ndim))
            std_cond = cond.std(dim=dims, keepdim=True)
            std_guided = guided.std(dim=dims, keepdim=True)
            rescaled = guided * (std_cond / std_guided)
            guided = self.rescale * rescaled + (1.0 - self.rescale) * guided
        return guided


def guidance_for(scale: float, unet: Any, rescale: float = 0.0, weights: tuple[float, ...] = (1.0,)) -> Guidance:
    """CFG when it changes anything: scale above 1 and a UNet without a built-in guidance embedding; composable
    prompt parts (``weights``, see :class:`ClassifierFreeGuidance`) always, as A1111 combines them at any scale."""
    if weights != (1.0,):
        return ClassifierFreeGuidance(scale, rescale, tuple(weights))
    if scale > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None:
        return ClassifierFreeGuidance(scale, rescale)
    return NoGuidance()
