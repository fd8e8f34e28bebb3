"""Default model ids and named levels: plain data that the command line reads before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .samplers import SAMPLER_ALIASES, SCHEDULER_TABLE

__all__ = [
    "SCHEDULER_ALIASES", "DEFAULT_BASE", "DEFAULT_REFINER", "DEFAULT_UNION", "DEFAULT_IDENTITY", "DRAFT_DECODER", "FAST_LEVELS",
    "StructureControl", "STRUCTURE_CONTROLS",
]  # fmt: skip

DEFAULT_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
DEFAULT_UNION = "xinsir/controlnet-union-sdxl-1.0"
# The identity family --face photos make when none is named: the one every front-end offers first.
DEFAULT_IDENTITY = "faceid"
# TAESD for SDXL: a distilled decoder of SDXL's latents, a few MB, for previews and drafts.
DRAFT_DECODER = "madebyollin/taesdxl"


@dataclass(frozen=True)
class StructureControl:
    """How a kind of structure guidance runs by default: the preprocessor that makes its map from a photo, the
    ControlNet that reads it, and its control type in a ControlNet-Union.

    Example:
        >>> STRUCTURE_CONTROLS["edges"].preprocessor
        'canny'
    """

    preprocessor: str
    model: str
    union_type: str


STRUCTURE_CONTROLS = {
    "edges": StructureControl("canny", "diffusers/controlnet-canny-sdxl-1.0", "canny"),
    "depth": StructureControl("depth", "diffusers/controlnet-depth-sdxl-1.0", "depth"),
    "pose": StructureControl("pose", "xinsir/controlnet-openpose-sdxl-1.0", "pose"),
}
# Named speed levels for command lines: what each adds, cheapest first (see sdxl_control.protocol.fast).
FAST_LEVELS = {
    "off": "the plain models",
    "layout": "channels_last + fused QKV projections, nothing to compile",
    "blocks": "layout + torch.compile of the UNet's repeated transformer blocks",
    "unet": "layout + torch.compile of the whole UNet",
}
# Named recipes users know from A1111/ComfyUI, as (diffusers class, config overrides): a sampler, then optionally a
# schedule (see sdxl_control.base.samplers). Data, not code paths.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = dict(SCHEDULER_TABLE)
# The names A1111 (its infotext's "Sampler", with its schedule type's label as its old combined labels had it) and
# ComfyUI (its KSampler's sampler_name) give the same recipes; matched without regard to case.
SCHEDULER_ALIASES: dict[str, str] = dict(SAMPLER_ALIASES)
# The largest side of an image SDXL is asked for (the checks before anything loads and the request's agree).
MAX_SIDE = 8192
