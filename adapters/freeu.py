"""FreeU (Si et al. 2023): the UNet's up blocks with their backbone features amplified (``b1``, ``b2``) and the
skip connections' low frequencies damped (``s1``, ``s2``), as diffusers' ``enable_freeu`` does it.

Example:
    >>> from sdxl_control.adapters.freeu import FreeU
    >>> FreeU().b1, FreeU().s2
    (1.3, 0.2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base.errors import ConditionError
from ..protocol.conditions import Attachment, Condition, PrepareContext, Prepared, Stage, StepInfo
from ..records.infotext import Infotext

__all__ = ["FreeU"]


@dataclass(frozen=True, kw_only=True)
class FreeU(Condition):
    """FreeU with the published SDXL factors (FreeU's README: b1 1.3, b2 1.4, s1 0.9, s2 0.2). ``scale`` moves every
    factor from 1 (0: absent) to its value (1, the default). It acts through diffusers' own code path: the factors
    are set on the UNet's up blocks (``enable_freeu``) at the steps it acts, and taken away after.

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

    def factors(self) -> dict[str, float]:
        """The factors at this condition's scale, as ``enable_freeu`` takes them."""
        if self.scale == 1:  # the values themselves (1 + (s - 1) is not s in floating point)
            return {name: getattr(self, name) for name in ("s1", "s2", "b1", "b2")}
        return {name: 1 + self.scale * (getattr(self, name) - 1) for name in ("s1", "s2", "b1", "b2")}

    def prepare(self, ctx: PrepareContext) -> Prepared:
        factors = self.factors()
        if any(value <= 0 for value in factors.values()):  # diffusers reads a factor of 0 as FreeU switched off
            raise ConditionError(f"FreeU at scale {self.scale:g} makes a factor 0 or less ({factors}): lower the scale")
        return _FreeUReady(factors)

    def infotext(self) -> Infotext:
        # The items Forge's built-in FreeU writes (extensions-builtin/sd_forge_freeu, l.166-174 @dfdcbab). Forge's
        # FreeU is ComfyUI's FreeU_V2 (backbone factors weighed by the features' mean), ours diffusers' (constant):
        # the same factors give another image there (the docs say so).
        factors = self.factors()
        return Infotext(fields={"freeu_enabled": "True", "freeu_b1": f"{factors['b1']:g}",
                                "freeu_b2": f"{factors['b2']:g}", "freeu_s1": f"{factors['s1']:g}",
                                "freeu_s2": f"{factors['s2']:g}", "freeu_start": f"{self.window.start:g}",
                                "freeu_end": f"{self.window.end:g}"})  # fmt: skip


_KEYS = ("s1", "s2", "b1", "b2")


@dataclass(frozen=True, eq=False)
class _FreeUReady(Prepared):
    factors: dict[str, float]

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        return _FreeUAttachment(unet, self.factors)


class _FreeUAttachment(Attachment):
    """Sets the factors on the up blocks at the steps FreeU acts, and puts back what the blocks held (nothing, on a
    loaded UNet) when it does not and on detach."""

    def __init__(self, unet: Any, factors: dict[str, float]) -> None:
        self.unet, self.factors, self.on, self.checked = unet, factors, False, False
        self.before = [{k: block.__dict__[k] for k in _KEYS if k in block.__dict__} for block in unet.up_blocks]
        for i, block in enumerate(unet.up_blocks):
            if any(getattr(block, name, None) is not None for name in _KEYS):
                raise ConditionError(
                    f"FreeU: the UNet's up block {i} has FreeU set already (unet.enable_freeu); call "
                    "unet.disable_freeu() and give FreeU as a condition"
                )

    def contribute(self, step: StepInfo, active: bool) -> None:
        if not self.checked:  # at the first step, before the UNet runs: the step cache is in place by then
            _refuse_partly_reused(self.unet)
            self.checked = True
        if active and not self.on:
            self.unet.enable_freeu(**self.factors)
        elif not active and self.on:
            self._restore()
        self.on = active

    def _restore(self) -> None:
        for block, held in zip(self.unet.up_blocks, self.before, strict=True):
            for key in _KEYS:
                if key in held:
                    setattr(block, key, held[key])
                elif key in block.__dict__:
                    delattr(block, key)

    def detach(self) -> None:
        self._restore()
        self.on = False


def _refuse_partly_reused(unet: Any) -> None:
    """Refuse a step cache (:mod:`sdxl_control.engine.step_cache`) that reuses part of an up block FreeU changes
    (diffusers' ``resolution_idx`` 0 and 1): diffusers' ``apply_freeu`` scales the block's input in place, and on a
    cached step that input is a reused module's remembered output, so it would be scaled again at every step. Blocks
    reused whole (step_cache_branch 0-2 on SDXL's base) run no FreeU on cached steps and are right: as at the last
    whole step, like every condition inside reused modules."""
    for i, block in enumerate(list(unet.up_blocks)[:2]):
        if "forward" in block.__dict__:
            continue  # reused whole
        if any("forward" in m.__dict__ for m in block.modules() if m is not block):
            raise ConditionError(
                f"FreeU with this step_cache_branch: a cached step would reuse part of the UNet's up block {i}, "
                "whose input FreeU scales in place, so it would be scaled again at every cached step; give "
                "step_cache_branch 0, 1 or 2 (--step-cache-branch), or step_cache 1"
            )
