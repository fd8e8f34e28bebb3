"""Perturbed-attention guidance (PAG, Ahn et al. 2024): the prompt's prediction with chosen self-attention layers
replaced by identity (each query reads only its own value), and the step pushed away from it, as diffusers'
``StableDiffusionXLPAGPipeline`` computes it: ``uncond + g * (cond - uncond) + s_t * (cond - perturbed)``.

Example:
    >>> from sdxl_control.adapters.pag import PAG
    >>> PAG(scale=3.0).layers
    ('mid',)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base.errors import ConditionError
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage

__all__ = ["PAG"]


@dataclass(frozen=True, kw_only=True)
class PAG(Condition):
    """Perturbed-attention guidance: ``scale`` is diffusers' ``pag_scale`` (default 3.0), ``adaptive_scale`` its
    ``pag_adaptive_scale`` (the scale falls by it per timestep below 1000, to 0), ``layers`` its
    ``pag_applied_layers`` (regular expressions searched in the self-attention layers' names: ``"mid"``,
    ``"down_blocks.2"``, ``"up_blocks.0.attentions.0"``).

    Example:
        >>> PAG(scale=2.0, layers=("mid", "up_blocks.0")).kind
        'pag'
    """

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: tuple[str, ...] = ("mid",)

    kind: ClassVar[str] = "pag"
    supported_stages: ClassVar[Stage] = Stage.BOTH

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
        elif isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        super().__post_init__()
        if self.adaptive_scale < 0:
            raise ConditionError(f"PAG adaptive_scale is 0 or more, got {self.adaptive_scale}")
        if not self.layers:
            raise ConditionError("PAG needs at least one layer (default 'mid')")

    def prepare(self, ctx: PrepareContext) -> Prepared:
        raise NotImplementedError("PAG is being built (issue 38)")
