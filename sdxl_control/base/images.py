"""Turning whatever a user hands in (path, PIL image in any mode, numpy array) into an RGB PIL image.

Every image a user gives (init image, mask, control image, face photo, reference image) is read here, so each is seen
as the user sees it: the EXIF orientation applied (:func:`ImageOps.exif_transpose`) before anything measures it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ConditionError, InputError

__all__ = ["ImageInput", "load_image", "load_image_rgba", "flatten", "oriented_size", "check_image_file", "MIN_SIDE"]

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# Below this a control or reference image carries no usable structure.
MIN_SIDE = 8
# EXIF orientations that turn the image a quarter: its displayed width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION = 0x0112


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ConditionError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.size == 0:
        raise ConditionError(f"an image array is empty (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ConditionError("an image array holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            # Clipping a 0-255 float array would turn it white without a word.
            raise ConditionError(
                f"a float image array must hold values in 0..1, this one spans {low:g}..{high:g}: divide a 0-255 "
                "array by 255, or pass it as uint8"
            )
        array = array * 255.0 + 0.5
    elif array.dtype == np.uint16:
        array = array / 257.0
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            # Casting would wrap 256 to 0.
            raise ConditionError(
                f"an integer image array must hold values in 0..255, this one spans {low}..{high} "
                "(16-bit images: pass a uint16 array)"
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise ConditionError(f"an image array must hold numbers, got dtype {array.dtype}")
    return Image.fromarray(array.astype(np.uint8))


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """``image`` as RGB, or as RGBA when any of its pixels is not fully opaque (16-bit and float: stretched)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if int(np.asarray(rgba.getchannel("A")).min()) < 255:
            return rgba
    return image.convert("RGB")


def flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``image`` as RGB, its transparent areas composited onto the ``background`` colour.

    Example:
        >>> flatten(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode != "RGBA":
        return image.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image).convert("RGB")


def load_image(value: Any, what: str = "image") -> Image.Image:
    """An RGB image from a path, a PIL image (any mode; EXIF orientation applied) or an array.

    16-bit and float images are stretched to 8 bits; transparency is composited onto black (the background of control
    maps; an init image's transparency has its own policy, in :mod:`sdxl_control.engine.start`).

    Example:
        >>> load_image(np.zeros((16, 16), dtype=np.uint8)).mode
        'RGB'
    """
    return flatten(load_image_rgba(value, what), (0, 0, 0))


def load_image_rgba(value: Any, what: str = "image") -> Image.Image:
    """As :func:`load_image`, but an image with transparency comes back as RGBA, its alpha kept (any other: RGB).

    Example:
        >>> load_image_rgba(np.zeros((16, 16, 4), dtype=np.uint8)).mode
        'RGBA'
    """
    if isinstance(value, (str, os.PathLike)):
        path = check_image_file(value, what)
        try:
            with Image.open(path) as opened:
                # exif_transpose returns a loaded copy, so the file can close.
                image = ImageOps.exif_transpose(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{what}: {path} is not a readable image ({exc})") from None
    elif isinstance(value, Image.Image):
        image = ImageOps.exif_transpose(value) or value
    elif isinstance(value, np.ndarray):
        image = _from_array(value)
    else:
        raise ConditionError(f"{what}: expected a path, PIL image or numpy array, got {type(value).__name__}")
    if min(image.size) < MIN_SIDE:
        raise ConditionError(
            f"{what} is {image.size[0]}x{image.size[1]} pixels: too small (at least {MIN_SIDE} a side)"
        )
    return _to_rgb_or_rgba(image)


def oriented_size(value: Any, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image as it is shown, its EXIF orientation applied (as :func:`load_image` reads it),
    from a path's header alone or a PIL image or array.

    Example:
        >>> oriented_size(np.zeros((16, 32), dtype=np.uint8))
        (32, 16)
    """
    if isinstance(value, np.ndarray):
        return load_image_rgba(value, what).size
    if isinstance(value, Image.Image):
        return _shown_size(value)
    with Image.open(check_image_file(value, what)) as opened:
        return _shown_size(opened)


def _shown_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    # getexif() also reads an XMP orientation, as exif_transpose does.
    return (height, width) if image.getexif().get(_ORIENTATION) in _QUARTER_TURNS else (width, height)


def check_image_file(value: str | os.PathLike[str], what: str = "image") -> Path:
    """The path of an image file that exists and whose header reads as an image of a sane size, else an
    :class:`~sdxl_control.base.errors.InputError` naming ``what``. Cheap: the pixels are not decoded.

    Example:
        >>> check_image_file("missing.png", "--face")
        Traceback (most recent call last):
        ...
        sdxl_control.base.errors.InputError: --face: no such file missing.png
    """
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{what}: no such file {path}")
    if not path.is_file():
        raise InputError(f"{what}: {path} is a folder, not an image")
    try:
        with Image.open(path) as opened:
            size = opened.size
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what}: {path} declares an image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{what}: {path} is not a readable image ({exc})") from None
    if min(size) < MIN_SIDE:
        raise InputError(f"{what}: {path} is {size[0]}x{size[1]} pixels: too small (at least {MIN_SIDE} a side)")
    return path
