"""Canny edge maps (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..base.errors import ConditionError

__all__ = ["canny"]


def canny(image: Image.Image, low: int | None = None, high: int | None = None, sigma: float = 0.33) -> Image.Image:
    """White edges on black, as SDXL canny ControlNets were trained on.

    Without thresholds they are set from the image's median brightness (``(1 ± sigma) * median``), which adapts to
    dark and bright photos alike.

    Example:
        >>> canny(Image.new("RGB", (64, 64))).size
        (64, 64)
    """
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    if (low is None) != (high is None):
        raise ConditionError("give both canny thresholds (low and high) or neither")
    if low is None or high is None:
        median = float(np.median(gray))
        low, high = int(max(0.0, (1.0 - sigma) * median)), int(min(255.0, (1.0 + sigma) * median))
    if not 0 <= low <= high:
        raise ConditionError(f"canny thresholds need 0 <= low <= high, got {low}, {high}")
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(edges).convert("RGB")
