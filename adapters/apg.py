"""Adaptive projected guidance (APG, Sadat et al. 2024): the guidance ``cond - uncond`` split into its parts parallel
and orthogonal to the prompt's prediction, the parallel part (which oversaturates) weighed by ``eta``, after a norm
threshold and an optional momentum, as diffusers' ``AdaptiveProjectedGuidance`` computes it.

Example:
    >>> from sdxl_control.adapters.apg import APG
    >>> APG(eta=0.0).norm_threshold
    15.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base.errors import ConditionError
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage
from ..protocol.guidance import GuidanceStep, GuidanceTerm, TermOrder
from ..records.infotext import Infotext

__all__ = ["APG"]


@dataclass(frozen=True, kw_only=True)
class APG(Condition):
    """Adaptive projected guidance in place of plain CFG at the steps it acts: ``eta`` (diffusers' default 1.0),
    ``norm_threshold`` (its ``adaptive_projected_guidance_rescale``, 15.0; 0: none), ``momentum`` (0: none, as
    diffusers' ``None``; negative values, as the paper's -0.5, average the guidance over the steps it acts).
    ``scale`` blends from plain CFG (0: absent) to APG (1, the default). It needs classifier-free guidance (a guidance
    scale above 1): without it there is no guidance to project, and it changes nothing. At the steps outside its
    window the step is plain CFG (diffusers' guider gives the prompt's prediction alone there). Its momentum starts
    afresh in each stage (the refiner's predictions are another model's).

    Example:
        >>> APG(eta=0.0, momentum=-0.5).kind
        'apg'
    """

    eta: float = 1.0
    norm_threshold: float = 15.0
    momentum: float = 0.0

    kind: ClassVar[str] = "apg"
    supported_stages: ClassVar[Stage] = Stage.BOTH

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta < 0:
            raise ConditionError(f"APG eta is 0 or more (0 keeps only the orthogonal part), got {self.eta}")
        if self.norm_threshold < 0:
            raise ConditionError(f"APG norm_threshold is 0 (none) or more, got {self.norm_threshold}")

    def prepare(self, ctx: PrepareContext) -> Prepared:
        return _APGReady(self)

    def infotext(self) -> Infotext:
        # No A1111 extension writes APG; one item of our own, read back by the PNG importer (jobs/png_guidance.py).
        text = f"eta {self.eta:g}, threshold {self.norm_threshold:g}, momentum {self.momentum:g}"
        if self.scale != 1:
            text += f", scale {self.scale:g}"
        if (self.window.start, self.window.end) != (0.0, 1.0):
            text += f", window {self.window.start:g}-{self.window.end:g}"
        return Infotext(fields={"APG": text})


@dataclass(frozen=True, eq=False)
class _APGReady(Prepared):
    condition: APG

    def guidance_term(self, stage: Stage) -> GuidanceTerm:
        return _APGTerm(self.condition)


class _APGTerm(GuidanceTerm):
    """diffusers' ``normalized_guidance`` (guiders/adaptive_projected_guidance.py) at each step the condition acts."""

    order: ClassVar[TermOrder] = TermOrder.REPLACE

    def __init__(self, condition: APG) -> None:
        self.condition = condition
        self.running: torch.Tensor | None = None  # the momentum buffer's running average

    def combine(self, step: GuidanceStep) -> torch.Tensor:
        if step.uncond is None:
            return step.guided
        apg = self.condition
        cond = step.cond
        diff = cond - step.uncond
        dims = [-i for i in range(1, diff.ndim)]  # every dimension but the batch
        if apg.momentum != 0:
            self.running = diff if self.running is None else diff + apg.momentum * self.running
            diff = self.running
        if apg.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), apg.norm_threshold / norm)
        # The projection in float64, as diffusers computes it.
        v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double(), dim=dims)  # type: ignore[arg-type]  # a list works, as diffusers passes it
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        orthogonal = (v0 - parallel).to(diff.dtype)
        update = orthogonal + apg.eta * parallel.to(diff.dtype)
        projected = step.uncond + step.scale * update
        if apg.scale == 1:
            return projected
        return step.guided + apg.scale * (projected - step.guided)
