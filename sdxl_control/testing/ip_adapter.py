"""Tiny IP-Adapter repositories laid out like ``h94/IP-Adapter``, with the published files' key names."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import _seeded

__all__ = ["write_tiny_ip_adapter_repo"]

# Tiny stand-ins: "ViT-H" and "ViT-bigG" differ in width, as the real ones do (1024/1280 vs 1280/1664).
ENCODERS = {"models/image_encoder": (32, 16), "sdxl_models/image_encoder": (48, 24)}  # (hidden, projection)


def _encoder(folder: Path, hidden: int, projection: int, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=projection,
    )  # fmt: skip
    _seeded(seed, lambda: CLIPVisionModelWithProjection(config)).save_pretrained(folder, safe_serialization=True)


def _attention(cross_dim: int, widths: list[int], g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for i, width in enumerate(widths):
        for name in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(width, cross_dim, generator=g) * 0.2
    return out


def _plain(cross_dim: int, embed: int, g: torch.Generator, tokens: int = 4) -> dict[str, torch.Tensor]:
    # ImageProjection of the reference repo: Linear(embed -> tokens * cross_dim) + LayerNorm(cross_dim).
    return {
        "image_proj.proj.weight": torch.randn(tokens * cross_dim, embed, generator=g) * 0.1,
        "image_proj.proj.bias": torch.randn(tokens * cross_dim, generator=g) * 0.1,
        "image_proj.norm.weight": 1 + torch.randn(cross_dim, generator=g) * 0.1,
        "image_proj.norm.bias": torch.randn(cross_dim, generator=g) * 0.1,
    }


def _resampler(
    cross_dim: int, embed: int, g: torch.Generator, dim: int = 32, depth: int = 4, queries: int = 16
) -> dict[str, torch.Tensor]:
    # The reference repo's Resampler (perceiver): latents, proj_in/out, norm_out, and per layer an attention
    # (norm1, norm2, to_q, to_kv, to_out) and a feed-forward (LayerNorm, Linear, GELU, Linear) numbered 0, 1, 3.
    inner, mult = 64, 4  # one 64-wide head: diffusers infers heads = to_q rows / 64

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "image_proj.latents": r(1, queries, dim) * 10,
        "image_proj.proj_in.weight": r(dim, embed), "image_proj.proj_in.bias": r(dim),
        "image_proj.proj_out.weight": r(cross_dim, dim), "image_proj.proj_out.bias": r(cross_dim),
        "image_proj.norm_out.weight": 1 + r(cross_dim), "image_proj.norm_out.bias": r(cross_dim),
    }  # fmt: skip
    for i in range(depth):
        p = f"image_proj.layers.{i}"
        sd.update({
            f"{p}.0.norm1.weight": 1 + r(dim), f"{p}.0.norm1.bias": r(dim),
            f"{p}.0.norm2.weight": 1 + r(dim), f"{p}.0.norm2.bias": r(dim),
            f"{p}.0.to_q.weight": r(inner, dim), f"{p}.0.to_kv.weight": r(2 * inner, dim), f"{p}.0.to_out.weight": r(dim, inner),
            f"{p}.1.0.weight": 1 + r(dim), f"{p}.1.0.bias": r(dim),
            f"{p}.1.1.weight": r(dim * mult, dim), f"{p}.1.3.weight": r(dim, dim * mult),
        })  # fmt: skip
    return sd


def write_tiny_ip_adapter_repo(folder: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = 0) -> Path:
    """The four SDXL IP-Adapter files and both image encoders of ``h94/IP-Adapter``, tiny, fitting the tiny base."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    root = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    cross = unet.config.cross_attention_dim
    widths = [
        unet.get_submodule(n.removesuffix(".processor")).to_q.out_features for n in unet.attn_processors if "attn2" in n
    ]
    for i, (sub, (hidden, projection)) in enumerate(ENCODERS.items()):
        _encoder(root / sub, hidden, projection, seed + i)
    vit_h_hidden, vit_h_proj = ENCODERS["models/image_encoder"]
    big_g_hidden, big_g_proj = ENCODERS["sdxl_models/image_encoder"]
    files = {
        "ip-adapter_sdxl.safetensors": lambda g: _plain(cross, big_g_proj, g),
        "ip-adapter_sdxl_vit-h.safetensors": lambda g: _plain(cross, vit_h_proj, g),
        "ip-adapter-plus_sdxl_vit-h.safetensors": lambda g: _resampler(cross, vit_h_hidden, g),
        "ip-adapter-plus-face_sdxl_vit-h.safetensors": lambda g: _resampler(cross, vit_h_hidden, g),
    }
    for i, (name, image_proj) in enumerate(files.items()):
        g = torch.Generator().manual_seed(seed + 10 + i)
        save_file({**image_proj(g), **_attention(cross, widths, g)}, str(root / "sdxl_models" / name))
    return root
