"""InstantID's published repository layout (``InstantX/InstantID``) with random weights and the published key names:
an IdentityNet folder and a pickled ``ip-adapter.bin``; tiny for the tests, full-size for the GPU benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .annotators import write_controlnet
from .ip_adapter import _attention, _cross_widths, _resampler

__all__ = ["write_instantid_repo", "write_tiny_instantid_repo"]


def write_instantid_repo(
    folder: str | os.PathLike[str], unet: Any, *, resampler: tuple[int, int] = (1280, 20), seed: int = 0
) -> Path:
    """``ControlNetModel/`` (IdentityNet: a standard SDXL ControlNet shaped after ``unet``) and ``ip-adapter.bin``:
    ``torch.save`` of ``{"image_proj": Resampler state dict, "ip_adapter": to_k_ip/to_v_ip per cross-attention layer}``
    as published. The Resampler reads one 512-d embedding and gives 16 tokens; ``resampler`` is its (width, heads),
    (1280, 20) when published."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    cross = unet.config.cross_attention_dim
    dim, heads = resampler
    g = torch.Generator().manual_seed(seed + 20)
    image_proj = {k.removeprefix("image_proj."): v for k, v in _resampler(cross, 512, g, dim, heads=heads).items()}
    ip_adapter = {k.removeprefix("ip_adapter."): v for k, v in _attention(cross, _cross_widths(unet), g).items()}
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, root / "ip-adapter.bin")
    write_controlnet(root / "ControlNetModel", unet, seed=seed + 21)
    return root


def write_tiny_instantid_repo(folder: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = 0) -> Path:
    """InstantID's two files, tiny, fitting the tiny base at ``base``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    return write_instantid_repo(folder, unet, resampler=(32, 1), seed=seed)
