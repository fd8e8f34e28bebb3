"""The hires fix (A1111's "Hires. fix", ComfyUI's two-pass upscale): a first pass at the request's size, each image
enlarged ``hires_scale`` times (by an upscaler model, Lanczos, or in latent space), then redrawn by a second pass of
image-to-image at ``hires_strength``. Both passes are the one pass every generation makes; this module only chains
them.

Example:
    >>> gen.generate("a lighthouse", size=(832, 1216), hires_scale=1.5, upscaler="4x-UltraSharp.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine.upscale import LANCZOS, LATENT_MODES, check_upscaler, upscale_images, upscale_latents
from ..records.recipe import RecipeImage, Result

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = ["hires_fix"]

# One pass of a request, and the images of a request with its recipe: what the generator gives the passes.
RunPass = Callable[["GenerationRequest"], Result]
Record = Callable[["GenerationRequest", Sequence[Any]], list[RecipeImage]]


def hires_fix(
    request: GenerationRequest, run: RunPass, record: Record, *, latent_factor: int, device: torch.device
) -> Result:
    """``request``'s images made in two passes of ``run`` (which keeps an init image at strength 0 as it is), recorded
    by ``record`` as the whole request's (a re-run of their recipe makes both passes again). ``latent_factor`` is the
    VAE's scale (for latent upscaling); upscaler models run on ``device``."""
    check_upscaler(request.upscaler)  # before the first pass, which would be lost to a missing file
    if request.init_image is not None and request.strength == 0:
        # An image of the user's, enlarged as it is: a pass at strength 0 keeps it (a request without the hires fix
        # could not say so: strength 0 alone is refused).
        drafts = run(request)
    else:
        drafts = run(
            dataclasses.replace(request, hires_scale=None, hires_strength=0.5, hires_steps=None, upscaler=LANCZOS)
        )  # fmt: skip
    enlarged: list[Any]
    if request.upscaler in LATENT_MODES:  # the second pass starts from the latents themselves
        latents = upscale_latents(drafts.latents, request.hires_size, request.upscaler, latent_factor)
        enlarged = list(latents.split(1))
    else:
        enlarged = upscale_images(drafts.images, request.hires_size, request.upscaler, device)
    passes = [run(request.hires_pass(image, seed)) for image, seed in zip(enlarged, request.seeds, strict=True)]
    images = record(request, [p.images[0] for p in passes])
    return Result(images=images, latents=torch.cat([p.latents for p in passes]))
