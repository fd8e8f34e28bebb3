"""Images that start from an image: the init image and mask read and fitted to the request's size, encoded by the
VAE, and the loop's first latents (and its :class:`~sdxl_control.loop.Repaint`) made with the arithmetic of diffusers'
SDXL image-to-image and inpainting pipelines, random numbers drawn in the same order.

Sizes: the request's ``size`` rules. An init image of another size is resized to it; of another aspect, it is first
cropped about its centre to the request's aspect (never stretched), with a warning naming both sizes. A mask of
another size is resized to the request's (nearest neighbour, so it stays binary), with a warning.

Example:
    >>> gen.generate("a watercolour", init_image="photo.png", strength=0.6, size=(1024, 768))  # doctest: +SKIP
    >>> gen.generate("a red scarf", init_image="photo.png", mask="scarf.png", size=(1024, 768))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .errors import IncompatibleModelError, InvalidRequestError
from .loop import Repaint
from .preprocessors.images import load_image
from .vae import draw_as_encoding, encode_pixels, vae_scale_factor

__all__ = [
    "image_size", "read_init_image", "read_mask", "outpaint_canvas", "StartImages", "start_images", "StartLatents",
    "start_latents",
    "INPAINT_CHANNELS", "OUTPAINT_FILL",
]  # fmt: skip

log = logging.getLogger(__name__)

# A UNet that reads the mask and the masked image beside the latents (SDXL inpainting 0.1): 4 + 1 + 4.
INPAINT_CHANNELS = 9
# What the new border of an outpainted canvas starts as: mid-grey, as ComfyUI's "Pad Image for Outpainting" fills it.
OUTPAINT_FILL = (128, 128, 128)


def _name(value: Any) -> str:
    return str(value) if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__") else type(value).__name__


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of an image given as a path, PIL image or array, reading no more than its header."""
    if isinstance(value, Image.Image):
        return value.size
    if isinstance(value, np.ndarray):
        return load_image(value, "init image").size
    from .preprocessors.images import check_image_file

    with Image.open(check_image_file(value, "init image")) as image:
        return image.size


def read_init_image(value: Any, size: tuple[int, int]) -> Image.Image:
    """The init image as RGB at the request's ``size`` (width, height): resized, after a centre crop to its aspect
    when that differs (a warning says so)."""
    image = load_image(value, "init image")
    width, height = size
    if image.size != (width, height):
        w, h = image.size
        if abs(w / h - width / height) > 0.01:
            scale = min(w / width, h / height)
            crop_w, crop_h = round(width * scale), round(height * scale)
            left, top = (w - crop_w) // 2, (h - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
            log.warning("init image %s is %dx%d: cropped about its centre to %dx%d (the aspect of %dx%d), then "
                        "resized", _name(value), w, h, crop_w, crop_h, width, height)  # fmt: skip
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def read_mask(value: Any, size: tuple[int, int], blur: int = 0) -> Image.Image:
    """The mask as a grey image at ``size`` (white: repaint), ``blur`` a Gaussian radius in pixels that feathers its
    edge. A mask that marks nothing to repaint is refused, naming it."""
    mask = load_image(value, "mask").convert("L")
    if mask.size != tuple(size):
        log.warning("mask %s is %dx%d: resized to the request's %dx%d", _name(value), *mask.size, *size)
        mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
    if int(np.asarray(mask).max()) < 128:
        raise InvalidRequestError(f"mask {_name(value)}: nothing to repaint (no pixel is white or light grey)")
    return VaeImageProcessor.blur(mask, blur) if blur else mask


def outpaint_canvas(
    value: Any, size: tuple[int, int], pads: tuple[int, int, int, int]
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: the init image fitted to the inner area of ``size`` and placed there, the
    ``pads`` (left, top, right, bottom) around it filled with :data:`OUTPAINT_FILL`, the mask white on them."""
    left, top, right, bottom = pads
    width, height = size
    inner = (width - left - right, height - top - bottom)
    canvas = Image.new("RGB", size, OUTPAINT_FILL)
    canvas.paste(read_init_image(value, inner), (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + inner[0], top + inner[1]))
    return canvas, mask


@dataclass(frozen=True)
class StartImages:
    """What a request starts from, read and fitted: the ``image`` and repaint ``mask`` (white; ``None`` for
    image-to-image) at the request's size — or, for a mask crop, the whole photo and mask, with the ``crop`` region
    repainted and the ``overlay`` that pastes the result back.

    Example:
        >>> start_images(request).repainted()[0].size == request.size  # doctest: +SKIP
        True
    """

    image: Image.Image
    mask: Image.Image | None
    size: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None
    overlay: Callable[[Image.Image], Image.Image] | None = None

    def repainted(self) -> tuple[Image.Image, Image.Image | None]:
        """(image, mask) of what the loop repaints, at the request's size (the crop, for a mask crop)."""
        if self.crop is None:
            return self.image, self.mask
        assert self.mask is not None
        fit = [part.crop(self.crop).resize(self.size, Image.Resampling.LANCZOS) for part in (self.image, self.mask)]
        return fit[0], fit[1]


def start_images(request: Any) -> StartImages:
    """The init image and mask of ``request`` read and fitted (see :class:`StartImages`)."""
    width, height = request.size
    if request.padding_mask_crop is not None:
        # Only a region around the mask is repainted, at the request's size, then pasted back (diffusers' rule).
        image = load_image(request.init_image, "init image")
        mask = read_mask(request.mask, image.size, request.mask_blur)
        crop = VaeImageProcessor.get_crop_region(mask, width, height, pad=request.padding_mask_crop)
        processor = VaeImageProcessor(vae_scale_factor=8)  # resizes the repainted crop back: the factor is unused
        return StartImages(image, mask, request.size, crop, _overlay(processor, image, mask, crop))
    if request.outpaint is not None:
        canvas, mask = outpaint_canvas(request.init_image, request.size, request.outpaint)
        return StartImages(canvas, mask, request.size)
    image = read_init_image(request.init_image, request.size)
    given = read_mask(request.mask, request.size, request.mask_blur) if request.mask is not None else None
    return StartImages(image, given, request.size)


@dataclass(frozen=True)
class StartLatents:
    """The loop's first latents, and the inpainting it does on the way (``None`` for image-to-image).

    Example:
        >>> start = start_latents(request, base, schedule, generators, copies=2)  # doctest: +SKIP
        >>> start.latents.shape                                                  # doctest: +SKIP
        torch.Size([1, 4, 128, 128])
    """

    latents: torch.Tensor
    repaint: Repaint | None
    # For a crop repainted at full resolution: pastes each finished image back into the original.
    overlay: Callable[[Image.Image], Image.Image] | None = None


@torch.no_grad()
def start_latents(
    request: Any,
    images: StartImages | None,
    vae: Any,
    unet_channels: int,
    schedule: Any,
    generators: list[torch.Generator],
    copies: int,
    device: torch.device,
    dtype: torch.dtype,
) -> StartLatents:
    """The first latents of ``request`` (its ``images``, or latents as its init image) for the stage that runs
    ``schedule`` first, whose UNet takes ``unet_channels`` and whose guidance runs ``copies`` of the batch: noise at
    the schedule's entry step added to the image's latents (image-to-image), or, with a mask, diffusers' inpainting
    start for a regular or an inpainting (9-channel) UNet."""
    width, height = request.size
    factor = vae_scale_factor(vae)
    processor = VaeImageProcessor(vae_scale_factor=factor)
    mask_processor = VaeImageProcessor(
        vae_scale_factor=factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    n = request.num_images
    shape = (n, vae.config.latent_channels, height // factor, width // factor)
    scheduler, first = schedule.scheduler, schedule.timesteps[:1].repeat(n)
    if isinstance(request.init_image, torch.Tensor):  # latents (the latent hires fix): entered as they are
        if unet_channels == INPAINT_CHANNELS or request.mask is not None:
            raise IncompatibleModelError("starting from latents is image-to-image: no mask, no inpainting UNet")
        latents = request.init_image.to(device, dtype).expand(shape)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        return StartLatents(scheduler.add_noise(latents, noise, first), None)
    assert images is not None
    image, mask_image, crop, overlay = images.image, images.mask, images.crop, images.overlay
    fit = {"crops_coords": crop, "resize_mode": "fill"} if crop is not None else {}
    pixels = processor.preprocess(image, height=height, width=width, **fit).to(torch.float32)
    inpaints = unet_channels == INPAINT_CHANNELS
    if mask_image is None:
        if inpaints:
            raise IncompatibleModelError("this UNet is an inpainting UNet (9 input channels): give it a mask")
        # One encode per image, each with its image's generator, as diffusers' image-to-image pipeline draws them.
        latents = torch.cat([encode_pixels(vae, pixels, g, dtype) for g in generators]).to(device)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        return StartLatents(scheduler.add_noise(latents, noise, first), None)
    if unet_channels not in (shape[1], INPAINT_CHANNELS):
        raise IncompatibleModelError(f"a UNet with {unet_channels} input channels cannot inpaint")
    mask = mask_processor.preprocess(mask_image, height=height, width=width, **fit)
    full = request.strength == 1.0
    # The inpainting pipeline encodes its one init image with the first generator only.
    original = encode_pixels(vae, pixels, generators[0], dtype).to(device) if not (inpaints and full) else None
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        assert original is not None
        latents = scheduler.add_noise(original.repeat(n, 1, 1, 1), noise, first)
    small = torch.nn.functional.interpolate(mask, size=shape[2:]).to(device, dtype).repeat(n, 1, 1, 1)
    if not inpaints:
        assert original is not None
        # diffusers' inpainting pipeline encodes the masked image here even for a regular UNet, which never reads it:
        # the same draw keeps the first generator's later numbers (a refiner's noise, an ancestral sampler's) in step.
        draw_as_encoding(vae, (1, *shape[1:]), generators[0])
        repaint = Repaint(mask=small, original=original.repeat(n, 1, 1, 1), noise=noise)
        return StartLatents(latents, repaint, overlay)
    masked = encode_pixels(vae, pixels * (mask < 0.5), generators[0], dtype).to(device).repeat(n, 1, 1, 1)
    extra = torch.cat([small, masked], dim=1)
    batched = torch.cat([extra] * copies) if copies > 1 else extra
    return StartLatents(latents, Repaint(mask=small, extra=batched), overlay)


def _overlay(
    processor: VaeImageProcessor, original: Image.Image, mask: Image.Image, crop: tuple[int, int, int, int]
) -> Callable[[Image.Image], Image.Image]:
    def paste(image: Image.Image) -> Image.Image:
        return processor.apply_overlay(mask, original, image, crop)

    return paste
