"""Contact sheets: a batch side by side, each image labelled (its seed), to pick the one to keep.

Example:
    >>> from PIL import Image
    >>> sheet = contact_sheet([Image.new("RGB", (64, 64))] * 3, ["seed 1", "seed 2", "seed 3"])
    >>> sheet.size
    (192, 80)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["contact_sheet"]

LABEL_HEIGHT = 16


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], columns: int | None = None) -> Image.Image:
    """``images`` in a grid (nearly square unless ``columns`` is given), ``labels[i]`` under image ``i``."""
    if not images or len(images) != len(labels):
        raise ValueError(f"a contact sheet needs one label per image, got {len(images)} images, {len(labels)} labels")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width = max(image.width for image in images)
    height = max(image.height for image in images) + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * width, (i // columns) * height
        sheet.paste(image.convert("RGB"), (x, y))
        draw.text((x + 3, y + image.height + 2), label, fill="black", font=font)
    return sheet
