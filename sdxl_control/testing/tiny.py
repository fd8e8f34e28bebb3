"""Tiny SDXL base and refiner with random weights, written as real diffusers pipeline folders.

The architectures are SDXL's (UNet with text_time conditioning and the same block types, two CLIP text encoders
with the second projected, a KL VAE with 8x downsampling and SDXL's latent scaling), with tiny widths. The
tokenizer is the real 49,408-token CLIP BPE tokenizer, rebuilt from the merges file the ``open-clip-torch`` wheel
ships, so prompts tokenize exactly as with the published models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..weights.clip_vocab import clip_bpe, write_clip_tokenizer
from ..weights.sdxl_configs import SDXL_SCHEDULER

__all__ = ["SDXL_SCHEDULER", "TinyModels", "clip_bpe", "tiny_models", "write_tiny_base", "write_tiny_refiner"]

FORMAT_VERSION = 1
TEXT_WIDTH = 32
TIME_EMBED = 8

# ``save_pretrained`` stamps every config with the release that wrote it, and a folder's fingerprint (what a recipe
# records of it) hashes those bytes: the stamp would tie each recorded tiny folder to one transformers or diffusers
# release, and any new release would refuse the recipes made before it. The tiny folders carry these fixed stamps
# instead, the releases that wrote the 0.1 golden recipes: the same seed gives the same bytes under any release.
VERSION_STAMPS = {"transformers_version": "5.24.0", "_diffusers_version": "0.42.1"}
_STAMP = re.compile(r'("(' + "|".join(VERSION_STAMPS) + r')": )"[^"]*"')


def freeze_version_stamps(folder: str | os.PathLike[str]) -> None:
    """Rewrite the library version stamps in every JSON file under ``folder`` to ``VERSION_STAMPS``, leaving the rest
    of each file's bytes as the library wrote them.

    Example:
        >>> freeze_version_stamps(write_tiny_refiner(tmp / "refiner"))  # doctest: +SKIP
    """
    for path in Path(folder).rglob("*.json"):
        text = path.read_text()
        fixed = _STAMP.sub(lambda m: f'{m.group(1)}"{VERSION_STAMPS[m.group(2)]}"', text)
        if fixed != text:
            path.write_text(fixed)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoders(
    seed: int, with_first: bool, width: int = TEXT_WIDTH, first_width: int | None = None
) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Token ids as in the published SDXL text encoder configs (bos 0, eos 2, pad 1: pooling takes the argmax id,
    # i.e. the end-of-text token).
    common: dict[str, Any] = dict(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5,
    )  # fmt: skip
    first = None
    if with_first:
        first_common = {**common, "hidden_size": first_width or width}
        first = _seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **first_common)))
    second = _seeded(
        seed + 2,
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", projection_dim=width, **common)),
    )
    return first, second


def _vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    return _seeded(
        seed + 3,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=128,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
    )


# What the tiny TAESD's decoder gives for random latents, per colour channel in [0, 1]: mid-grey with visible noise.
# At random initialisation its last layer gives about 0.00 ± 0.01, which TAESD maps to -1: a black image.
TAESD_MEAN, TAESD_STD = 0.5, 0.2


def write_tiny_taesd(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny ``AutoencoderTiny`` (TAESD's architecture, 8x upsampling, tiny widths) as diffusers saves it —
    the layout of ``madebyollin/taesdxl``. Its last layer is scaled so that latents decode to visible noise about
    mid-grey (see ``TAESD_MEAN``), not to black, as a draft or a preview would show."""
    from diffusers import AutoencoderTiny

    def build() -> Any:
        model: Any = AutoencoderTiny(  # diffusers registers its submodules at run time
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
        *body, last = model.decoder.layers
        latents = torch.randn(2, 4, 16, 16)  # drawn from the seeded stream: the same weights every time
        with torch.no_grad():
            out = last(torch.nn.Sequential(*body)(torch.tanh(latents / 3) * 3))
            mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
            last.weight.mul_((TAESD_STD / std).view(-1, 1, 1, 1))
            last.bias.copy_(TAESD_MEAN + (last.bias - mean) * TAESD_STD / std)
        return model

    model = _seeded(seed + 7, build)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# Transformer blocks per attention of each UNet block: "tiny" keeps tests fast; "sdxl" is SDXL's own [1, 2, 10], which
# gives the 140 attention processors that published adapters number their layers by.
LAYOUTS = {"tiny": (1, 1, 2), "sdxl": (1, 2, 10)}


def _base_unet(
    seed: int, layout: str = "tiny", text_width: int = TEXT_WIDTH, in_channels: int = 4, first_width: int | None = None
) -> Any:
    from diffusers import UNet2DConditionModel

    # SDXL base's block layout (no attention in the first block, two cross-attention blocks, mid block), tiny widths.
    return _seeded(
        seed + 4,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32),
            layers_per_block=2,
            transformer_layers_per_block=LAYOUTS[layout],
            attention_head_dim=(2, 4, 8),
            norm_num_groups=8,
            cross_attention_dim=(first_width or text_width) + text_width,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TIME_EMBED + text_width,
        ),
    )


def _refiner_unet(seed: int, text_width: int = TEXT_WIDTH) -> Any:
    from diffusers import UNet2DConditionModel

    # SDXL refiner's block layout (four blocks, attention in the middle two), aesthetic-score conditioning.
    return _seeded(
        seed + 5,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=2,
            transformer_layers_per_block=1,
            attention_head_dim=(2, 4, 4, 4),
            norm_num_groups=8,
            cross_attention_dim=text_width,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=5 * TIME_EMBED + text_width,
        ),
    )


def _mark(folder: Path, seed: int, role: str) -> None:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_sdxl_control_tiny"] = {"seed": seed, "role": role, "format": FORMAT_VERSION}
    index_file.write_text(json.dumps(index, indent=2))


def write_tiny_base(
    folder: str | os.PathLike[str],
    seed: int = 0,
    layout: str = "tiny",
    text_width: int = TEXT_WIDTH,
    inpainting: bool = False,
    first_width: int | None = None,
) -> Path:
    """Write a tiny SDXL base pipeline folder (model_index.json, per-component config + safetensors, tokenizers);
    ``layout="sdxl"`` gives its UNet SDXL's own transformer depths (see ``LAYOUTS``), ``text_width`` each text
    encoder's width (the UNet's cross-attention takes twice that); ``inpainting`` gives it an inpainting UNet (9 input
    channels: latents, mask, masked image), as ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` has;
    ``first_width`` gives the first text encoder a width of its own (as SDXL's 768 and 1280 differ: what tells a
    single-file checkpoint's two encoders apart)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        te1, te2 = _text_encoders(seed, with_first=True, width=text_width, first_width=first_width)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=write_clip_tokenizer(Path(tmp) / "t1", "<|endoftext|>"),
            tokenizer_2=write_clip_tokenizer(Path(tmp) / "t2", "!"),
            unet=_base_unet(seed, layout, text_width, in_channels=9 if inpainting else 4, first_width=first_width),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
            force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    _mark(out, seed, "base")
    return out


def write_tiny_refiner(folder: str | os.PathLike[str], seed: int = 0, text_width: int = TEXT_WIDTH) -> Path:
    """Write a tiny SDXL refiner pipeline folder (second text encoder only, aesthetic-score conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    out = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        _, te2 = _text_encoders(seed + 100, with_first=False, width=text_width)
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=_vae(seed),
            text_encoder=None,
            text_encoder_2=te2,
            tokenizer=None,
            tokenizer_2=write_clip_tokenizer(Path(tmp) / "t2", "!"),
            unet=_refiner_unet(seed, text_width),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    _mark(out, seed, "refiner")
    return out


@dataclass(frozen=True)
class TinyModels:
    """Paths of a tiny base and refiner pair, ready for ``Generator.from_pretrained``.

    Example:
        >>> tiny = tiny_models(seed=0)
        >>> Generator.from_pretrained(base=tiny.base, refiner=tiny.refiner)  # doctest: +SKIP
    """

    base: Path
    refiner: Path


def _default_root() -> Path:
    return (
        Path(os.environ.get("SDXL_CONTROL_CACHE", Path.home() / ".cache" / "sdxl-control")) / f"tiny-v{FORMAT_VERSION}"
    )


def tiny_models(
    seed: int = 0, root: str | os.PathLike[str] | None = None, layout: str = "tiny", text_width: int = TEXT_WIDTH
) -> TinyModels:
    """The tiny pair for ``seed``, written once under ``root`` (default: the sdxl-control cache) and reused; ``layout``
    is the base UNet's (``"tiny"``, or ``"sdxl"`` for SDXL's 140 attention processors), ``text_width`` the text
    encoders' (32; PhotoMaker's 128-wide heads need the two together at least 128)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tiny layout {layout!r}: {', '.join(LAYOUTS)}")
    folder = Path(root) if root is not None else _default_root()
    name = (
        f"seed-{seed}"
        + ("" if layout == "tiny" else f"-{layout}")
        + ("" if text_width == TEXT_WIDTH else f"-t{text_width}")
    )
    target = folder / name
    if not (target / "base" / "model_index.json").exists() or not (target / "refiner" / "model_index.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".build-"))
        try:
            write_tiny_base(staging / "base", seed, layout, text_width)
            write_tiny_refiner(staging / "refiner", seed, text_width)
            freeze_version_stamps(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return TinyModels(target / "base", target / "refiner")
