"""Live previews: the image as it forms, decoded every few steps by a tiny autoencoder (TAESD-XL) from the step's
estimate of the finished latent, in both stages. A progress callback: it plugs into ``generate(progress=...)``, the
CLI's ``--preview-every`` and the web page alike.

Example:
    >>> previews = Previews(lambda image, event: image.save(f"preview-{event.index}.png"), every=5)
    >>> gen.generate("a red fox in the snow", progress=previews)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from .defaults import DRAFT_DECODER
from .loop import ProgressEvent
from .vae import decode_latents, load_decoder

__all__ = ["Previews", "latents_to_image"]


def latents_to_image(decoder: Any, latents: torch.Tensor) -> Image.Image:
    """The first latent of a batch decoded by ``decoder`` (a tiny autoencoder) as an RGB image."""
    with torch.no_grad():
        pixels = decode_latents(decoder, latents[:1].to(decoder.dtype))
    array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class Previews:
    """A progress callback that calls ``show(image, event)`` every ``every`` steps and at the last step of each
    stage, with the denoised estimate decoded by ``decoder`` (a TAESD folder or hub id, or ComfyUI's single
    ``taesdxl_decoder.safetensors``). Each event also goes on to ``then`` (a progress bar, a stop check).

    Example:
        >>> shown = []
        >>> previews = Previews(lambda image, event: shown.append(image), every=4, decoder="taesdxl_decoder.safetensors")
        >>> gen.generate("a lighthouse", steps=8, progress=previews)  # doctest: +SKIP
    """

    def __init__(
        self,
        show: Callable[[Image.Image, ProgressEvent], None],
        every: int = 5,
        decoder: str = DRAFT_DECODER,
        then: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.show, self.every, self.source, self.then = show, every, decoder, then

    def __call__(self, event: ProgressEvent) -> None:
        if event.step % self.every == 0 or event.step == event.steps:
            latents = event.denoised
            decoder = load_decoder(self.source, latents.shape[1], latents.device, latents.dtype)
            self.show(latents_to_image(decoder, latents), event)
        if self.then is not None:
            self.then(event)
