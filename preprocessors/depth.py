"""Depth maps from a transformers depth-estimation model (DPT/MiDaS, Depth Anything...)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..base.caches import process_cached
from ..weights.hub import resolve_source

__all__ = ["DEFAULT_DEPTH_MODEL", "DEPTH_FILES", "estimate_depth"]

# The estimator diffusers' SDXL depth ControlNet examples use.
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
DEPTH_FILES = ("*.json", "*.safetensors")


@process_cached(4)
def _estimator(source: str, device: str) -> Any:
    from transformers import pipeline

    folder = resolve_source(source, allow=[*DEPTH_FILES, "*.txt"])
    return pipeline("depth-estimation", model=str(folder), device=torch.device(device))


def estimate_depth(
    image: Image.Image, model: str | os.PathLike[str] = DEFAULT_DEPTH_MODEL, device: str = "cpu"
) -> Image.Image:
    """A depth map (near = bright) at the image's size, stretched to the full 0-255 range, as RGB.

    The estimator is loaded once per process; with no weights on disk and no hub, the error says what to fetch.

    Example:
        >>> estimate_depth(photo, model="Intel/dpt-hybrid-midas")  # doctest: +SKIP
    """
    out = _estimator(str(model), device)(image.convert("RGB"))
    depth = out["predicted_depth"]
    depth = depth if depth.ndim == 4 else depth.reshape(1, 1, *depth.shape[-2:])
    depth = torch.nn.functional.interpolate(depth.float(), size=image.size[::-1], mode="bicubic", align_corners=False)
    values = depth[0, 0].cpu().numpy()
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
