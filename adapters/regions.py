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

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..base.errors import ConditionError
from ..base.images import load_image
from ..protocol.conditions import Condition, Crop, PrepareContext, Prepared, Stage
from ..protocol.guidance import Blend, ExtraRows, GuidanceStep, GuidanceTerm, TermOrder

log = logging.getLogger(__name__)

# SDXL's VAE: one latent cell per 8x8 pixels.
LATENT_FACTOR = 8

__all__ = ["Region", "regions_from_slot", "parse_region"]


@dataclass(frozen=True)
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
        weight = self.weight(ctx.size).to(ctx.device, ctx.dtype)
        prompts: dict[Stage, tuple[ExtraRows, ...]] = {}
        for stage in ctx.stages:
            if stage not in self.stage:
                continue
            rows = [ExtraRows(*ctx.encode_prompt(self.prompt, stage))]
            if self.negative_prompt is not None:
                rows.append(ExtraRows(*ctx.encode_prompt(self.negative_prompt, stage), negative=True))
            prompts[stage] = tuple(rows)
        return _MaskedReady(weight, prompts)

    def weight(self, size: tuple[int, int]) -> torch.Tensor:
        """The region's weight per latent cell for an output of ``size`` (width, height), as (1, 1, h, w): the mask's
        grey levels (white 1) resized bilinearly from its own pixels to the latent grid, as ComfyUI resizes a
        conditioning mask, or the box's cells; times ``scale``."""
        width, height = size
        cells = (height // LATENT_FACTOR, width // LATENT_FACTOR)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            mask = torch.zeros(1, 1, *cells)
            mask[..., round(y0 * cells[0]) : round(y1 * cells[0]), round(x0 * cells[1]) : round(x1 * cells[1])] = 1
            if not mask.any():
                raise ConditionError(f"the Region box {self.box} covers no latent cell of a {width}x{height} image")
            return mask * self.scale
        image = load_image(self.mask, "Region mask").convert("L")
        if image.size != (width, height):
            log.info("Region mask of %dx%d resized to the %dx%d image", *image.size, width, height)
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
        if not grey.any():
            raise ConditionError("the Region mask is empty (all black): white marks the region its prompt describes")
        mask = grey if grey.shape[-2:] == cells else F.interpolate(grey, size=cells, mode="bilinear")
        return mask * self.scale

    def in_crop(self, crop: Crop) -> Condition | None:
        """The region for a repaint of ``crop`` alone: its mask cut to the crop, or its box as the part of the crop
        it covers; ``None`` where it does not reach the crop."""
        if self.box is None:
            return super().in_crop(crop)
        width, height = crop.image_size
        x0, y0, x1, y1 = self.box
        left, top, right, bottom = crop.box
        box = ((x0 * width - left) / (right - left), (y0 * height - top) / (bottom - top),
               (x1 * width - left) / (right - left), (y1 * height - top) / (bottom - top))  # fmt: skip
        clipped = tuple(min(1.0, max(0.0, v)) for v in box)
        if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
            return None
        return replace(self, box=clipped)


@dataclass(frozen=True, eq=False)
class _MaskedReady(Prepared):
    weight: torch.Tensor
    prompts: dict[Stage, tuple[ExtraRows, ...]]

    def guidance_term(self, stage: Stage) -> GuidanceTerm | None:
        return _MaskedTerm(self.weight, self.prompts[stage]) if stage in self.prompts else None


class _MaskedTerm(GuidanceTerm):
    """ComfyUI's masked conditioning: the region's prompt predicted on rows of its own, weighed in per pixel."""

    order: ClassVar[TermOrder] = TermOrder.BLEND

    def __init__(self, weight: torch.Tensor, rows: tuple[ExtraRows, ...]) -> None:
        self.weight, self.own = weight, rows

    def rows(self) -> tuple[ExtraRows, ...]:
        return self.own

    def blend(self, step: GuidanceStep) -> Blend:
        cond, *negative = step.extra
        return Blend(self.weight, cond, negative[0] if negative else None)


_BOX = re.compile(r"^\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*:(.*)$", re.S)


def parse_region(text: str) -> dict[str, Any]:
    """``MASK:PROMPT`` or ``X0,Y0,X1,Y1:PROMPT`` (the command line's ``--region``) as Region fields. The mask is the
    longest prefix before a ``:`` that names an existing file (a prompt may hold colons, a Windows path too).

    Example:
        >>> parse_region("0,0,0.5,1:a woman with red hair")
        {'box': (0.0, 0.0, 0.5, 1.0), 'prompt': 'a woman with red hair'}
    """
    from pathlib import Path

    found = _BOX.match(text)
    if found:
        return {"box": tuple(float(v) for v in found.groups()[:4]), "prompt": found.group(5).strip()}
    cuts = [i for i, char in enumerate(text) if char == ":"]
    for cut in reversed(cuts):
        if Path(text[:cut]).expanduser().is_file():
            return {"mask": text[:cut], "prompt": text[cut + 1 :].strip()}
    raise ConditionError(
        f"a region is MASK:PROMPT (an existing mask image) or X0,Y0,X1,Y1:PROMPT (fractions), got {text!r:.80}"
    )


def regions_from_slot(cls: type[Region], values: dict[str, Any], joined: Any) -> list[Region]:
    """The ``region`` input slot's conditions (:mod:`sdxl_control.jobs.slots`): one Region per entry, each
    ``MASK:PROMPT`` or ``X0,Y0,X1,Y1:PROMPT``, or a mapping of Region fields (a job file's ``{"mask": "left.png",
    "prompt": ...}``, whose mask the job file's folder finds), with the slot's options."""
    texts = values.pop("prompt")
    return [cls(**{**values, **(dict(t) if isinstance(t, Mapping) else parse_region(str(t)))}) for t in texts]
