"""Latents to pixels, with SDXL's fp16 VAE overflow handled; or, for drafts, with a tiny autoencoder."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..base.caches import KeyedCache
from ..base.defaults import DRAFT_DECODER
from ..base.errors import IncompatibleModelError, InvalidRequestError
from ..weights.checkpoints import check_safetensors
from ..weights.hub import resolve_source
from .devices import placement

__all__ = [
    "DRAFT_DECODER",
    "vae_scale_factor",
    "decode_latents",
    "NonFiniteLatentsError",
    "encode_pixels",
    "load_decoder",
    "taesd_from_files",
    "find_decoder",
    "DECODER_FILES",
]


log = logging.getLogger(__name__)


class NonFiniteLatentsError(InvalidRequestError):
    """Latents with NaN or infinite values, refused before the VAE turns them into a black image; the generator says
    what in the request may have caused them."""


def vae_scale_factor(vae: Any) -> int:
    return int(2 ** (len(vae.config.block_out_channels) - 1))


@contextmanager
def _in_float32(vae: Any) -> Iterator[None]:
    # fp16 -> fp32 -> fp16 is exact, so the VAE is bit-identical afterwards.
    dtype = placement(vae)[1]
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)


def _decode(vae: Any, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    config = vae.config
    latents = latents.to(placement(vae)[1])
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    # Tiles are decoded one at a time and blended (diffusers' tiled decode): peak memory no longer grows with the
    # image, at the price of small differences along the seams.
    return (vae.tiled_decode if tiled else vae.decode)(latents, return_dict=False)[0]


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
    """Decode to images in [-1, 1], float32; ``tiled`` decodes tile by tile (for large images on small GPUs).

    The SDXL VAE overflows in fp16: it is decoded in fp32 when its config says so (``force_upcast``), and a
    half-precision decode that produced NaNs is redone in fp32. Latents that already hold NaN or infinite values
    (from the denoising, not the VAE) raise :class:`NonFiniteLatentsError` instead of decoding to a black image.
    """
    # One reduction and one read-back per decode, after the loop (whose steps read nothing back): the decoded image
    # comes to the host next anyway.
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteLatentsError(
            "the denoised latents hold NaN or infinite values, which decode to a black image: nothing was decoded"
        )
    dtype = placement(vae)[1]
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        with _in_float32(vae):
            return _decode(vae, latents, tiled).float()
    images = _decode(vae, latents, tiled)
    if dtype in (torch.float16, torch.bfloat16) and torch.isnan(images).any():
        log.warning("VAE decode in %s produced NaNs; decoding again in float32", dtype)
        with _in_float32(vae):
            images = _decode(vae, latents, tiled)
    return images.float()


@torch.no_grad()
def encode_pixels(
    vae: Any, pixels: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype
) -> torch.Tensor:
    """Images in [-1, 1] to scaled latents in ``dtype``, drawn from the VAE's posterior with ``generator`` (as
    diffusers' pipelines draw them); in fp32 when the VAE's config says it overflows in fp16 (``force_upcast``)."""
    vae_dtype = placement(vae)[1]
    upcast = getattr(vae.config, "force_upcast", False) and vae_dtype != torch.float32
    with _in_float32(vae) if upcast else contextlib.nullcontext():
        sample = pixels.to(vae.device, torch.float32 if upcast else vae_dtype)
        latents = vae.encode(sample).latent_dist.sample(generator).to(dtype)
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - mean_t) * config.scaling_factor / std_t
    return config.scaling_factor * latents


def draw_as_encoding(vae: Any, latent_shape: tuple[int, ...], generator: torch.Generator) -> None:
    """Take from ``generator`` the numbers :func:`encode_pixels` of an image with latents of ``latent_shape`` would,
    without encoding it: where a pipeline we follow encodes an image it never reads, its later draws stay in step."""
    from diffusers.utils.torch_utils import randn_tensor

    vae_dtype = placement(vae)[1]
    upcast = getattr(vae.config, "force_upcast", False) and vae_dtype != torch.float32
    randn_tensor(
        latent_shape, generator=generator, device=generator.device, dtype=torch.float32 if upcast else vae_dtype
    )


_DECODERS: KeyedCache[Any] = KeyedCache("decoders", size=2)


def taesd_from_files(decoder: str | Path, encoder: str | Path | None = None) -> Any:
    """An ``AutoencoderTiny`` (TAESD's published architecture) from the single files ComfyUI users keep
    (``vae_approx/taesdxl_decoder.safetensors`` and ``..._encoder.safetensors``: TAESD's own ``nn.Sequential`` keys,
    ``"1.weight"``...). Without ``encoder`` the model only decodes (its encoder stays unset).

    Example:
        >>> taesd = taesd_from_files("~/ComfyUI/models/vae_approx/taesdxl_decoder.safetensors")  # doctest: +SKIP
    """
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    model: Any = AutoencoderTiny()  # TAESD's published configuration (4 latent channels, 64-wide blocks)
    state: dict[str, torch.Tensor] = {}
    # TAESD's decoder starts with a parameterless clamp that diffusers applies in forward(): its layers shift by one.
    for part, file, shift in (("decoder", decoder, 1), ("encoder", encoder, 0)):
        if file is None:
            continue
        path = Path(file).expanduser()
        check_safetensors(path)
        for key, value in load_file(str(path)).items():
            index, _, rest = key.partition(".")
            if not index.isdigit():
                raise IncompatibleModelError(f"{path}: not a TAESD {part} file (key {key!r})")
            state[f"{part}.layers.{int(index) - shift}.{rest}"] = value.float()
    expected = {k for k in model.state_dict() if k.startswith(("decoder.", *(("encoder.",) if encoder else ())))}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise IncompatibleModelError(
            f"{decoder}: not TAESD-XL's layout (missing {missing}, unexpected {extra}); use taesdxl_decoder.safetensors"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{decoder}: the tensors do not fit TAESD's shapes ({str(exc)[:200]})") from None
    return model


# What a tiny autoencoder's folder or hub repo holds.
DECODER_FILES = ("config.json", "*.safetensors")


def find_decoder(source: str | Path) -> Path:
    """A tiny autoencoder's folder or single file (local, or a hub repo through the HF cache); a clear error when it
    is not here."""
    return resolve_source(source, allow=list(DECODER_FILES))


def load_decoder(source: str, latent_channels: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A tiny autoencoder, kept in a process cache: a diffusers ``AutoencoderTiny`` folder (hub id or local path), or
    TAESD's single decoder file (``taesdxl_decoder.safetensors``, as ComfyUI keeps it).

    Example:
        >>> decoder = load_decoder(DRAFT_DECODER, 4, torch.device("cuda"), torch.float16)  # doctest: +SKIP
    """
    path = find_decoder(source)
    key = (str(path.resolve()), str(device), dtype)
    return _DECODERS.get(
        key, lambda: _read_decoder(path, source, latent_channels, dtype).to(device, dtype).eval().requires_grad_(False)
    )


def _read_decoder(path: Path, source: str, latent_channels: int, dtype: torch.dtype) -> Any:
    """The tiny autoencoder at ``path`` (TAESD's single decoder file, or a diffusers folder), checked to decode
    ``latent_channels``-channel latents."""
    import json

    from diffusers import AutoencoderTiny

    if path.is_file():
        decoder = taesd_from_files(path)
        if decoder.config.latent_channels != latent_channels:
            raise IncompatibleModelError(f"{source} decodes 4-channel latents; this model makes {latent_channels}")
        return decoder
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("_class_name") != "AutoencoderTiny":
        raise IncompatibleModelError(
            f"{source}: not a tiny autoencoder folder (config.json naming AutoencoderTiny), e.g. {DRAFT_DECODER}"
        )
    if config.get("latent_channels", 4) != latent_channels:
        raise IncompatibleModelError(
            f"{source} decodes {config.get('latent_channels')}-channel latents; this model makes {latent_channels}"
        )
    check_safetensors(path / "diffusion_pytorch_model.safetensors")
    return AutoencoderTiny.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, local_files_only=True)


_VAES: KeyedCache[Any] = KeyedCache("vaes", size=2)
VAE_FILES = ("*.json", "*.safetensors")


def load_vae(source: str, like: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A VAE that replaces a checkpoint's (as ComfyUI's VAE loader and A1111's VAE setting do), kept in a process
    cache: a diffusers folder (or hub id, or a pipeline holding a ``vae`` folder), or one ``.safetensors`` file in
    diffusers' layout or Stability's original one (``encoder.down.0.block.0``, as ``sdxl_vae.safetensors`` is
    kept), read with the architecture of ``like``, the VAE it replaces.

    Example:
        >>> vae = load_vae("sdxl_vae.safetensors", gen.base.vae, torch.device("cuda"), torch.float16)  # doctest: +SKIP
    """
    path = resolve_source(source, allow=list(VAE_FILES))
    key = (str(path.resolve()), str(sorted(dict(like.config).items())), str(device), dtype)
    return _VAES.get(key, lambda: _read_vae(path, like).to(device, dtype).eval().requires_grad_(False))


def _read_vae(path: Path, like: Any) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from ..weights.checkpoints import checkpoint_kind

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise IncompatibleModelError(
                f"{path} is not a VAE folder (config.json + diffusion_pytorch_model.safetensors)"
            )
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    else:
        check_safetensors(path)
        state = load_file(str(path))
        if any(k.startswith("first_stage_model.") for k in state):  # a whole checkpoint's VAE
            state = {
                k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")
            }
        if any(k.startswith("encoder.down.") for k in state):
            state = convert_ldm_vae_checkpoint(state, dict(like.config))
        elif not any(k.startswith("encoder.down_blocks.") for k in state):
            raise IncompatibleModelError(f"{path} is not a VAE: it holds {checkpoint_kind(state)}")
        vae = AutoencoderKL.from_config(like.config)
        try:
            vae.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise IncompatibleModelError(f"{path} is a VAE of another shape than this model's ({exc})") from None
    if vae.config.latent_channels != like.config.latent_channels:
        raise IncompatibleModelError(
            f"{path} makes {vae.config.latent_channels}-channel latents; this model's VAE makes "
            f"{like.config.latent_channels}"
        )
    return vae
