"""People in their regions: a regional prompt and a regional identity that describe one person act on one region.

A :class:`~sdxl_control.adapters.regions.Region` says what is in a part of the image; an identity condition (PuLID,
InstantID, FaceID, IP-Adapter) given a ``mask`` draws its person there. :func:`person` makes the two from one region
(a mask, or a box the identity's mask is drawn from), so that a person's words and face cannot land in two different
places; both stay plain condition values (the identity is the one given, with its ``mask`` set). The face detailer
then repaints each face with the identity it resembles and the prompt of the region that holds it.

Example:
    >>> from sdxl_control.adapters.people import person
    >>> from sdxl_control.adapters.pulid import PuLID
    >>> region, face = person("a red-haired woman", PuLID(faces=["ann.jpg"]), box=(0.0, 0.0, 0.5, 1.0))
    >>> region.box, face.mask.rsplit("/", 1)[-1]
    ((0.0, 0.0, 0.5, 1.0), '1024x1024-0-0-0.5-1.png')
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

from PIL import Image, ImageDraw

from ..base.errors import ConditionError
from ..base.files import cache_dir
from ..protocol.conditions import Condition
from .regions import Region

__all__ = ["box_mask", "box_mask_file", "person"]

C = TypeVar("C", bound=Condition)

# The side of a mask drawn from a box when no size is given: SDXL's own. A box is fractions, so the mask is resized
# to any output size (as every region mask is) without moving its edges by more than a pixel.
MASK_SIDE = 1024


def box_mask(box: tuple[float, float, float, float], size: tuple[int, int] = (MASK_SIDE, MASK_SIDE)) -> Image.Image:
    """A region mask of ``size`` (width, height): white inside ``box`` (x0, y0, x1, y1 as fractions), black outside.

    Example:
        >>> box_mask((0.5, 0.0, 1.0, 1.0), (8, 2)).getbbox()
        (4, 0, 8, 2)
    """
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConditionError(f"a region box is (x0, y0, x1, y1) fractions with x0 < x1, y0 < y1, got {tuple(box)}")
    width, height = size
    mask = Image.new("L", (width, height), 0)
    # PIL's rectangle includes its far corner: the last pixel inside is one before the box's end.
    corners = (round(x0 * width), round(y0 * height), round(x1 * width) - 1, round(y1 * height) - 1)
    if corners[2] < corners[0] or corners[3] < corners[1]:
        raise ConditionError(f"the region box {tuple(box)} covers no pixel of a {width}x{height} mask")
    ImageDraw.Draw(mask).rectangle(corners, fill=255)
    return mask


def box_mask_file(box: tuple[float, float, float, float], size: tuple[int, int] = (MASK_SIDE, MASK_SIDE)) -> str:
    """:func:`box_mask` as a PNG file in sdxl-control's cache (``region-masks/``), named by its size and box: a
    condition given a file is recorded by name and content, so its recipe re-makes its pixels (an in-memory mask is
    not stored)."""
    mask = box_mask(box, size)
    folder = cache_dir() / "region-masks"
    path = folder / f"{size[0]}x{size[1]}-{'-'.join(f'{v:g}' for v in box)}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{id(mask)}.part")  # another process may write the same file: whole or absent
        mask.save(partial, format="PNG")
        partial.replace(path)
    return str(path)


def person(
    prompt: str,
    identity: C,
    *,
    mask: Any = None,
    box: tuple[float, float, float, float] | None = None,
    size: tuple[int, int] = (MASK_SIDE, MASK_SIDE),
    **region: Any,
) -> tuple[Region, C]:
    """A person in one region: the :class:`Region` of ``prompt`` and ``identity`` with its ``mask`` set to the same
    region — ``mask`` (an image, white = the region) or ``box`` (fractions; the identity's mask is drawn from it at
    ``size``, as a file: :func:`box_mask_file`). ``region`` holds the Region's other fields (``negative_prompt``, ``mode``, ``scale``, ``window``).
    An identity with a mask of its own is refused: one region, given once."""
    if (mask is None) == (box is None):
        raise ConditionError("person() places a person in one region: give mask= (an image) or box= (fractions)")
    if "mask" not in {f.name for f in fields(identity)}:
        raise ConditionError(
            f"a {identity.kind} condition takes no region mask, so it cannot be placed in a region: give PuLID, "
            "InstantID, FaceID or IP-Adapter"
        )
    if getattr(identity, "mask", None) is not None:
        raise ConditionError(
            f"the {identity.kind} condition has a mask of its own: person() gives it the region's (leave its mask out)"
        )
    placed = Region(prompt, mask=mask, box=box, **region)
    return placed, replace(identity, mask=box_mask_file(box, size) if box is not None else mask)  # type: ignore[arg-type]
