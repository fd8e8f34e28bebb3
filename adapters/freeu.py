"""FreeU (Si et al. 2023): the UNet's up blocks with their backbone features amplified (``b1``, ``b2``) and the
skip connections' low frequencies damped (``s1``, ``s2``), as diffusers' ``enable_freeu`` does it.

Example:
    >>> from sdxl_control.adapters.freeu import FreeU
    >>> FreeU().b1, FreeU().s2
    (1.3, 0.2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base.errors import ConditionError
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage

__all__ = ["FreeU"]


@dataclass(frozen=True, kw_only=True)
class FreeU(Condition):
    """FreeU with the published SDXL factors (FreeU's README: b1 1.3, b2 1.4, s1 0.9, s2 0.2). ``scale`` moves every
    factor from 1 (0: absent) to its value (1, the default).

    Example:
        >>> FreeU(b1=1.1, b2=1.2, s1=0.6, s2=0.4).kind
        'freeu'
    """

    b1: float = 1.3
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2

    kind: ClassVar[str] = "freeu"
    supported_stages: ClassVar[Stage] = Stage.BOTH

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("b1", "b2", "s1", "s2"):
            if getattr(self, name) <= 0:
                raise ConditionError(f"FreeU {name} is above 0, got {getattr(self, name)}")

    def prepare(self, ctx: PrepareContext) -> Prepared:
        raise NotImplementedError("FreeU is being built (issue 38)")
