"""Live previews: the image as it forms, decoded every few steps by a tiny autoencoder (TAESD-XL) from the step's
estimate of the finished latent, in both stages. A progress callback: it plugs into ``generate(progress=...)``, the
CLI's ``--preview-every`` and the web page alike. Without TAESD-XL's weights, previews are a linear map of the latents
to colours (ComfyUI's "latent2rgb" factors for SDXL): coarse, but at no cost and with nothing to download.

Example:
    >>> previews = Previews(lambda image, event: image.save(f"preview-{event.index}.png"), every=5)
    >>> gen.generate("a red fox in the snow", progress=previews)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..base.defaults import DRAFT_DECODER
from ..base.errors import MissingWeightsError
from .loop import ProgressEvent
from .vae import decode_latents, find_decoder, load_decoder

__all__ = ["Previews", "latents_to_image", "latents_to_colours"]

log = logging.getLogger(__name__)

# SDXL latents (scaled, as the UNet sees them) to RGB in [-1, 1]: a least-squares fit ComfyUI publishes for its
# "latent2rgb" previews (rows: latent channels; columns: R, G, B).
SDXL_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_RGB_BIAS = (0.1084, -0.0175, -0.0011)
_WARNED: set[str] = set()


def latents_to_image(decoder: Any, latents: torch.Tensor) -> Image.Image:
    """The first latent of a batch decoded by ``decoder`` (a tiny autoencoder) as an RGB image."""
    with torch.no_grad():
        pixels = decode_latents(decoder, latents[:1].to(decoder.dtype))
    array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def latents_to_colours(latents: torch.Tensor) -> Image.Image:
    """The first latent of a batch mapped linearly to colours, at the image's size: a preview with no decoder.

    Example:
        >>> latents_to_colours(torch.zeros(1, 4, 8, 8)).size
        (64, 64)
    """
    if latents.shape[1] != len(SDXL_RGB_FACTORS):
        raise ValueError(f"the colour map is for 4-channel SDXL latents, got {latents.shape[1]} channels")
    factors = torch.tensor(SDXL_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(SDXL_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors) + bias
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    height, width = latents.shape[-2:]
    return Image.fromarray(array).resize((width * 8, height * 8), Image.Resampling.BILINEAR)


class Previews:
    """A progress callback that calls ``show(image, event)`` every ``every`` steps and at the last step of each
    stage, with the denoised estimate decoded by ``decoder`` (a TAESD folder or hub id, or ComfyUI's single
    ``taesdxl_decoder.safetensors``). Each event also goes on to ``then`` (a progress bar, a stop check).

    ``decoder=None``, or a decoder whose weights are not on this machine (said once, with how to fetch them), gives
    :func:`latents_to_colours` previews instead.

    Example:
        >>> shown = []
        >>> previews = Previews(lambda image, event: shown.append(image), every=4, decoder="taesdxl_decoder.safetensors")  # doctest: +SKIP
        >>> gen.generate("a lighthouse", steps=8, progress=previews)  # doctest: +SKIP
    """

    def __init__(
        self,
        show: Callable[[Image.Image, ProgressEvent], None],
        every: int = 5,
        decoder: str | None = DRAFT_DECODER,
        then: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.show, self.every, self.then = show, every, then
        self.source = decoder if decoder is None else self.available(decoder)

    @staticmethod
    def available(decoder: str) -> str | None:
        """``decoder`` if its weights are here, else None (colour previews), with a warning saying how to get it."""
        try:
            find_decoder(decoder)
        except MissingWeightsError as exc:
            if decoder not in _WARNED:  # once per process: the page makes a Previews per call
                _WARNED.add(decoder)
                log.warning("previews approximate the image from the latents' colours: %s", exc)
            return None
        return decoder

    def __call__(self, event: ProgressEvent) -> None:
        if event.step % self.every == 0 or event.step == event.steps:
            latents = event.denoised
            if self.source is None:
                self.show(latents_to_colours(latents), event)
            else:
                decoder = load_decoder(self.source, latents.shape[1], latents.device, latents.dtype)
                self.show(latents_to_image(decoder, latents), event)
        if self.then is not None:
            self.then(event)
