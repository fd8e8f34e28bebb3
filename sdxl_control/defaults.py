"""Default model ids and named levels: plain data that the command line reads before anything heavy is imported."""

from __future__ import annotations

__all__ = ["DEFAULT_BASE", "DEFAULT_REFINER", "DRAFT_DECODER", "FAST_LEVELS"]

DEFAULT_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
# TAESD for SDXL: a distilled decoder of SDXL's latents, a few MB, for previews and drafts.
DRAFT_DECODER = "madebyollin/taesdxl"
# Named speed levels for command lines: what each adds, cheapest first (see sdxl_control.fast).
FAST_LEVELS = {
    "off": "the plain models",
    "layout": "channels_last + fused QKV projections, nothing to compile",
    "blocks": "layout + torch.compile of the UNet's repeated transformer blocks",
    "unet": "layout + torch.compile of the whole UNet",
}
