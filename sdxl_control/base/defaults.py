"""Default model ids and named levels: plain data that the command line reads before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
# Named recipes users know from A1111/ComfyUI, as (diffusers class, config overrides). Data, not code paths.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}
# The names A1111 (its infotext's "Sampler", with "Karras" when its schedule type is) and ComfyUI (its KSampler's
# sampler_name, "_karras" for its scheduler) give the same recipes; matched without regard to case.
SCHEDULER_ALIASES: dict[str, str] = {
    "euler a": "euler_a", "euler_ancestral": "euler_a", "uni_pc": "unipc", "uni_pc_bh2": "unipc",
    "dpm++ 2m": "dpmpp_2m", "dpm++ 2m karras": "dpmpp_2m_karras", "dpm++ sde": "dpmpp_sde",
}  # fmt: skip
# The largest side of an image SDXL is asked for (the checks before anything loads and the request's agree).
MAX_SIDE = 8192
