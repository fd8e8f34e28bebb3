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

from ..base.errors import ConditionError
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage

__all__ = ["APG"]


@dataclass(frozen=True, kw_only=True)
class APG(Condition):
    """Adaptive projected guidance in place of plain CFG at the steps it acts: ``eta`` (diffusers' default 1.0),
    ``norm_threshold`` (its ``adaptive_projected_guidance_rescale``, 15.0; 0: none), ``momentum`` (0: none).
    ``scale`` blends from plain CFG (0: absent) to APG (1, the default).

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
        raise NotImplementedError("APG is being built (issue 38)")
