"""Regional prompts: a prompt that describes one region of the image (a mask or a box), beside the request's prompt
for the whole image, in one of two established ways: ComfyUI's masked conditioning (``mode="masked"``: the region's
prediction weighed by its mask, as ``comfy/samplers.py`` averages conditionings) or attention couple
(``mode="attention"``: the cross-attention outputs blended by the regions' masks inside the UNet, as Forge Couple).

Example:
    >>> from sdxl_control.adapters.regions import Region
    >>> Region("a red-haired woman", box=(0.0, 0.0, 0.5, 1.0)).mode
    'masked'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..base.errors import ConditionError
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage

__all__ = ["Region"]


@dataclass(frozen=True, kw_only=True)
class Region(Condition):
    """A prompt for one region: ``mask`` (an image, white = the region) or ``box`` (x0, y0, x1, y1 as fractions of
    the width and height); ``negative_prompt`` its own, if any; ``scale`` its strength (ComfyUI's ``strength``);
    ``window`` where it acts; ``mode`` how it acts (every region of one request acts the same way).

    Example:
        >>> Region("a man in a blue coat", mask="right.png", scale=1.0, window=(0.0, 0.8)).kind
        'region'
    """

    prompt: str
    mask: Any = None
    box: tuple[float, float, float, float] | None = None
    negative_prompt: str | None = None
    mode: Literal["masked", "attention"] = "masked"

    kind: ClassVar[str] = "region"
    supported_stages: ClassVar[Stage] = Stage.BOTH
    path_fields: ClassVar[tuple[str, ...]] = ("mask",)
    aligned_fields: ClassVar[tuple[str, ...]] = ("mask",)

    def __post_init__(self) -> None:
        if isinstance(self.box, list):
            object.__setattr__(self, "box", tuple(self.box))
        super().__post_init__()
        if (self.mask is None) == (self.box is None):
            raise ConditionError("a Region needs a mask or a box (x0, y0, x1, y1 fractions), one of them")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ConditionError(
                    f"a Region box is (x0, y0, x1, y1) fractions with x0 < x1, y0 < y1, got {self.box}"
                )

    def prepare(self, ctx: PrepareContext) -> Prepared:
        if self.mode == "attention":
            from .couple import prepare_couple

            return prepare_couple(self, ctx)
        raise NotImplementedError("regional prompts are being built (issue 38)")
