"""Images that start from an image: the init image and mask read and fitted to the request's size, encoded by the
VAE, and the loop's first latents (and its :class:`~sdxl_control.engine.loop.Repaint`) made with the arithmetic of
diffusers' SDXL image-to-image and inpainting pipelines, random numbers drawn in the same order.

Images are read as they are shown: their EXIF orientation applied first (:mod:`sdxl_control.base.images`).

Sizes: the request's ``size`` rules. An init image of another size is resized to it; of another aspect, it is first
cropped about its centre to the request's aspect (never stretched), with a warning naming both sizes. An image whose
aspect is the request's once its sides are rounded down to multiples of 8 (as diffusers' ``VaeImageProcessor`` rounds
an image's own size: 75x41 -> 72x40) is only resized. The mask goes through exactly its image's crop and resize, so
it stays on what was painted. A mask of another size than its image (same aspect) is first resized to the image's
size as diffusers' mask processor resizes a mask (Lanczos, then binarized at half grey), with a warning; a mask of
another aspect is refused.

Transparency (an RGBA, LA or P-with-transparency init image): where nothing is given to say what to repaint — an
outpainting, or an inpainting UNet with no mask — the transparent areas are repainted: they join the mask (ComfyUI's
LoadImage turns alpha into a mask) and start mid-grey as an outpainted border does. Otherwise (image-to-image, or a
mask given) they are flattened on white (A1111's img2img background), with a warning.

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

from ..base.errors import IncompatibleModelError, InvalidRequestError
from ..base.images import flatten, load_image, load_image_rgba, oriented_size
from .loop import Repaint
from .vae import draw_as_encoding, encode_pixels, vae_scale_factor

__all__ = [
    "image_size", "fit_crop", "check_mask_fits", "read_init_image", "read_mask", "outpaint_canvas", "StartImages", "start_images",
    "StartLatents", "start_latents",
    "INPAINT_CHANNELS", "OUTPAINT_FILL", "FLATTEN_BACKGROUND",
]  # fmt: skip

log = logging.getLogger(__name__)

# A UNet that reads the mask and the masked image beside the latents (SDXL inpainting 0.1): 4 + 1 + 4.
INPAINT_CHANNELS = 9
# What the new border of an outpainted canvas starts as: mid-grey, as ComfyUI's "Pad Image for Outpainting" fills it.
OUTPAINT_FILL = (128, 128, 128)
# What a kept init image's transparent areas are flattened on: white, A1111's img2img background
# (opts.img2img_background_color, "#ffffff", applied by modules/images.py flatten).
FLATTEN_BACKGROUND = (255, 255, 255)
# Aspects closer than this are the same: the image is resized, not cropped.
ASPECT_TOLERANCE = 0.01


def _name(value: Any) -> str:
    return str(value) if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__") else type(value).__name__


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of an image given as a path, PIL image or array as it is shown (EXIF orientation applied),
    reading no more than a file's header."""
    return oriented_size(value, "init image")


def _same_aspect(source: tuple[int, int], size: tuple[int, int]) -> bool:
    (w, h), (width, height) = source, size
    if abs(w / h - width / height) <= ASPECT_TOLERANCE:
        return True
    # diffusers rounds an image's own size down to multiples of 8 and resizes to that: 75x41 is 72x40's aspect.
    return (w // 8 * 8) * height == (h // 8 * 8) * width


def fit_crop(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The centre crop (left, top, right, bottom) that gives an image of ``source`` size (width, height) the aspect of
    ``size``, or ``None`` when it has that aspect already (see the module's note on sizes) and is only resized.

    Example:
        >>> fit_crop((128, 64), (64, 64))
        (32, 0, 96, 64)
        >>> fit_crop((75, 41), (72, 40)) is None
        True
    """
    if _same_aspect(source, size):
        return None
    (w, h), (width, height) = source, size
    scale = min(w / width, h / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def _binarized(mask: Image.Image) -> Image.Image:
    # diffusers' mask processor: values >= 0.5 become 1, the rest 0 (v / 255 >= 0.5 is v >= 128 in 8 bits).
    return mask.point(lambda v: 255 if v >= 128 else 0)


def _fit(
    image: Image.Image, crop: tuple[int, int, int, int] | None, size: tuple[int, int], mask: bool = False
) -> Image.Image:
    """``image`` cut to ``crop`` and resized to ``size``; a mask is binarized after a resize, as diffusers' is."""
    if crop is not None:
        image = image.crop(crop)
    width, height = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        if mask:
            image = _binarized(image)
    return image


def _read_fitted(
    value: Any, size: tuple[int, int]
) -> tuple[Image.Image, tuple[int, int], tuple[int, int, int, int] | None]:
    """(the init image fitted to ``size``, RGB or RGBA as it has transparency; its own size; the crop it took)."""
    image = load_image_rgba(value, "init image")
    crop = fit_crop(image.size, size)
    if crop is not None:
        log.warning("init image %s is %dx%d: cropped about its centre to %dx%d (the aspect of %dx%d), then "
                    "resized", _name(value), *image.size, crop[2] - crop[0], crop[3] - crop[1], *size)  # fmt: skip
    return _fit(image, crop, size), image.size, crop


def _flattened(image: Image.Image, value: Any, why: str) -> Image.Image:
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        log.warning("init image %s is %.1f%% transparent: flattened on white (%s), as A1111's img2img does; to repaint "
                    "those areas, give them as a --mask, or outpaint", _name(value), 100 * float((alpha < 255).mean()),
                    why)  # fmt: skip
    return flatten(image, FLATTEN_BACKGROUND)


def _repainted_where_transparent(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(``image`` flattened on :data:`OUTPAINT_FILL`, its transparency as a mask — white where transparent, as
    ComfyUI's LoadImage makes ``1 - alpha`` — or ``None`` when it has none)."""
    if image.mode != "RGBA":
        return image, None
    return flatten(image, OUTPAINT_FILL), Image.eval(image.getchannel("A"), lambda a: 255 - a)


def read_init_image(value: Any, size: tuple[int, int]) -> Image.Image:
    """The init image as RGB at the request's ``size`` (width, height): resized, after a centre crop to its aspect
    when that differs (a warning says so); transparent areas flattened on white (a warning says so)."""
    image, _, _ = _read_fitted(value, size)
    return _flattened(image, value, "image-to-image keeps what it is given")


def check_mask_fits(value: Any, mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Refuses a mask ``value`` whose aspect is not its init image's: no crop or stretch could tell where it was
    painted."""
    if not _same_aspect(mask_size, image_size):
        raise InvalidRequestError(
            f"mask {_name(value)} is {mask_size[0]}x{mask_size[1]} but its init image is "
            f"{image_size[0]}x{image_size[1]}: a mask must have its image's aspect (paint it on the image, or "
            f"resize it to {image_size[0]}x{image_size[1]})"
        )


def _mask_on_image(value: Any, image_size: tuple[int, int]) -> Image.Image:
    """The mask as a grey image at its init image's size (see the module's note on sizes)."""
    mask = load_image(value, "mask").convert("L")
    if mask.size != tuple(image_size):
        check_mask_fits(value, mask.size, image_size)
        log.warning("mask %s is %dx%d: resized to its init image's %dx%d", _name(value), *mask.size, *image_size)
        mask = _fit(mask, None, image_size, mask=True)
    return mask


def _repaints(mask: Image.Image) -> bool:
    return int(np.asarray(mask).max()) >= 128  # what the mask processor's binarizing keeps


def _blurred(mask: Image.Image, blur: int) -> Image.Image:
    return VaeImageProcessor.blur(mask, blur) if blur else mask


def read_mask(value: Any, size: tuple[int, int], blur: int = 0, crop: tuple[int, int, int, int] | None = None,
              image_size: tuple[int, int] | None = None) -> Image.Image:  # fmt: skip
    """The mask as a grey image at ``size`` (white: repaint), ``blur`` a Gaussian radius in pixels that feathers its
    edge: brought to its init image's ``image_size`` (default: ``size``), cut to the image's ``crop`` and resized as
    the image is. A mask that marks nothing to repaint is refused, naming it."""
    mask = _mask_on_image(value, image_size or size)
    if not _repaints(mask):
        raise InvalidRequestError(f"mask {_name(value)}: nothing to repaint (no pixel is white or light grey)")
    fitted = _fit(mask, crop, size, mask=True)
    if not _repaints(fitted):
        raise InvalidRequestError(
            f"mask {_name(value)}: nothing to repaint in the part of the init image its centre crop to the request's "
            f"aspect keeps ({crop}): give a size of the image's aspect, or leave size out"
        )
    return _blurred(fitted, blur)


def outpaint_canvas(
    value: Any, size: tuple[int, int], pads: tuple[int, int, int, int]
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: the init image fitted to the inner area of ``size`` and placed there, the
    ``pads`` (left, top, right, bottom) around it filled with :data:`OUTPAINT_FILL`, the mask white on them — and on
    the image's transparent areas, which start mid-grey too."""
    left, top, right, bottom = pads
    width, height = size
    inner = (width - left - right, height - top - bottom)
    image, hole = _repainted_where_transparent(_read_fitted(value, inner)[0])
    canvas = Image.new("RGB", size, OUTPAINT_FILL)
    canvas.paste(image, (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(hole if hole is not None else 0, (left, top, left + inner[0], top + inner[1]))
    if hole is not None:
        log.warning("init image %s has transparent areas: repainted with the outpainted border", _name(value))
    return canvas, mask


@dataclass(frozen=True)
class StartImages:
    """What a request starts from, read and fitted: the ``image`` and repaint ``mask`` (white; ``None`` for
    image-to-image) at the request's size — or, for a mask crop, the whole photo and mask, with the ``crop`` region
    repainted; and the ``overlay`` that pastes the result back into the original (a mask crop, or ``paste_back``).

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


def start_images(request: Any, inpainting_unet: bool = False) -> StartImages:
    """The init image and mask of ``request`` read and fitted (see :class:`StartImages`); ``inpainting_unet``: the
    first stage's UNet is an inpainting UNet, which repaints an image's transparent areas when no mask is given."""
    width, height = request.size
    if request.padding_mask_crop is not None:
        # Only a region around the mask is repainted, at the request's size, then pasted back (diffusers' rule).
        image = _flattened(load_image_rgba(request.init_image, "init image"), request.init_image, "a mask is given")
        mask = read_mask(request.mask, image.size, request.mask_blur)
        crop = VaeImageProcessor.get_crop_region(mask, width, height, pad=request.padding_mask_crop)
        processor = VaeImageProcessor(vae_scale_factor=8)  # resizes the repainted crop back: the factor is unused
        return StartImages(image, mask, request.size, crop, _overlay(processor, image, mask, crop))
    if request.outpaint is not None:
        canvas, mask = outpaint_canvas(request.init_image, request.size, request.outpaint)
        return StartImages(canvas, mask, request.size)
    fitted, own_size, crop = _read_fitted(request.init_image, request.size)
    if request.mask is not None:
        mask = read_mask(request.mask, request.size, request.mask_blur, crop, own_size)
        image = _flattened(fitted, request.init_image, "a mask is given")
        # A1111 pastes the original back outside the feathered mask; diffusers' overlay is that same composite.
        overlay = _overlay(VaeImageProcessor(vae_scale_factor=8), image, mask, None) if request.paste_back else None
        return StartImages(image, mask, request.size, overlay=overlay)
    if inpainting_unet:
        image, hole = _repainted_where_transparent(fitted)
        if hole is not None and _repaints(hole):
            log.warning("init image %s has transparent areas and no mask is given: the inpainting UNet repaints "
                        "them", _name(request.init_image))  # fmt: skip
            return StartImages(image, _blurred(hole, request.mask_blur), request.size)
    return StartImages(_flattened(fitted, request.init_image, "image-to-image keeps what it is given"), None,
                       request.size)  # fmt: skip


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
    # Pastes each finished image back into the original: a crop repainted at full resolution, or paste_back.
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
    processor: VaeImageProcessor, original: Image.Image, mask: Image.Image, crop: tuple[int, int, int, int] | None
) -> Callable[[Image.Image], Image.Image]:
    def paste(image: Image.Image) -> Image.Image:
        return processor.apply_overlay(mask, original, image, crop)

    return paste
