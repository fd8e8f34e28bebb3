"""Upscaling images between the two passes of a hires fix: Lanczos, or an upscaler model file as ComfyUI and A1111
users keep them (ESRGAN, Real-ESRGAN, SwinIR, ... ``.pth`` / ``.safetensors``): its weights read as plain tensors (no
pickled code runs), its architecture detected from them by spandrel.

Example:
    >>> [big] = upscale_images([image], (2048, 2048), "~/ComfyUI/models/upscale_models/4x-UltraSharp.pth")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..base.caches import KeyedCache
from ..base.errors import IncompatibleModelError, ModelNotFoundError
from ..weights.checkpoints import read_checkpoint

__all__ = ["LANCZOS", "LATENT_MODES", "upscale_images", "upscale_latents", "load_upscaler", "check_upscaler"]

LANCZOS = "lanczos"
# A1111's latent upscalers: the first pass's latents interpolated, no VAE round trip ("Latent" is bilinear).
LATENT_MODES = {"latent": "bilinear", "latent-bicubic": "bicubic", "latent-nearest-exact": "nearest-exact"}
_UPSCALERS: KeyedCache[Any] = KeyedCache("upscalers", size=1)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str, factor: int = 8) -> torch.Tensor:
    """Latents enlarged to those of an image of ``size`` (width, height) by one of :data:`LATENT_MODES`, as A1111's
    latent hires fix interpolates them."""
    shape = (size[1] // factor, size[0] // factor)
    return torch.nn.functional.interpolate(latents, size=shape, mode=LATENT_MODES[mode])


def check_upscaler(upscaler: str) -> None:
    """Refuse an ``upscaler`` that is neither a built-in mode nor a file, naming the option and the value: before a
    hires fix's first pass, not after it."""
    if upscaler != LANCZOS and upscaler not in LATENT_MODES and not Path(upscaler).expanduser().is_file():
        raise ModelNotFoundError(
            f"the hires fix's upscaler (--upscaler; a job's or recipe's \"upscaler\") {upscaler!r}: no such file, nor "
            f"found by name under --models-dir's upscale_models; give an ESRGAN/Real-ESRGAN/SwinIR .pth or "
            f".safetensors (as kept in ComfyUI's models/upscale_models or A1111's models/ESRGAN), or one of "
            f"{', '.join([LANCZOS, *LATENT_MODES])}"
        )


def load_upscaler(path: str) -> Any:
    """The upscaler model in ``path`` (spandrel's descriptor: its architecture and scale), kept in a process cache."""
    check_upscaler(path)
    file = Path(path).expanduser()

    def build() -> Any:
        try:
            import spandrel
        except ImportError:
            raise ModelNotFoundError("upscaler models need spandrel (pip install spandrel)") from None
        # Our own reading, under the package's one pickle policy (plain tensors only); spandrel reads the architecture.
        state = spandrel.canonicalize_state_dict(read_checkpoint(file))
        try:
            model = spandrel.ModelLoader().load_from_state_dict(state)
        except (spandrel.UnsupportedModelError, ValueError, RuntimeError, KeyError) as exc:
            raise IncompatibleModelError(f"upscaler {path}: not an upscaler model spandrel knows ({exc})") from None
        if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose != "SR":
            raise IncompatibleModelError(f"upscaler {path}: a {model.architecture.name} model, not an upscaler")
        return model.eval()

    return _UPSCALERS.get(str(file.resolve()), build)


@torch.no_grad()
def upscale_images(
    images: Sequence[Image.Image], size: tuple[int, int], upscaler: str, device: Any = "cpu"
) -> list[Image.Image]:
    """Each image enlarged to ``size`` (width, height): by Lanczos, or by the upscaler model in the file ``upscaler``
    (then Lanczos from its own scale to ``size``)."""
    if upscaler == LANCZOS:
        return [image.convert("RGB").resize(size, Image.Resampling.LANCZOS) for image in images]
    model = load_upscaler(upscaler).to(device)
    out = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        enlarged = model(pixels.permute(2, 0, 1)[None].to(device)).clamp(0, 1)[0]
        array = (enlarged.permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype(np.uint8)
        big = Image.fromarray(array)
        out.append(big if big.size == tuple(size) else big.resize(size, Image.Resampling.LANCZOS))
    return out
