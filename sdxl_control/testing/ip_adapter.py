"""IP-Adapter and FaceID repositories laid out like ``h94/IP-Adapter`` and ``h94/IP-Adapter-FaceID``, with the
published files' key names and random weights: tiny for the tests, full-size for the GPU benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .tiny import _seeded

__all__ = ["write_ip_adapter_repo", "write_tiny_ip_adapter_repo", "write_faceid_repo", "write_tiny_faceid_repo"]

# Tiny stand-ins: "ViT-H" and "ViT-bigG" differ in width, as the real ones do (1024/1280 vs 1280/1664).
ENCODERS = {"models/image_encoder": (32, 16), "sdxl_models/image_encoder": (48, 24)}  # (hidden, projection)
TINY_VISION = {
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _encoder(folder: Path, config: dict[str, Any], seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = _seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**config)))
    model.save_pretrained(folder, safe_serialization=True)


def _cross_widths(unet: Any) -> list[int]:
    return [
        unet.get_submodule(n.removesuffix(".processor")).to_q.out_features for n in unet.attn_processors if "attn2" in n
    ]


def _attention(cross_dim: int, widths: list[int], g: torch.Generator) -> dict[str, torch.Tensor]:
    # to_k_ip / to_v_ip per cross-attention layer, numbered 1, 3, 5, ... as in the published files.
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
    cross_dim: int, embed: int, g: torch.Generator, dim: int = 32, depth: int = 4, queries: int = 16, heads: int = 1
) -> dict[str, torch.Tensor]:
    # The reference repo's Resampler (perceiver): latents, proj_in/out, norm_out, and per layer an attention
    # (norm1, norm2, to_q, to_kv, to_out) and a feed-forward (LayerNorm, Linear, GELU, Linear) numbered 0, 1, 3.
    inner, mult = 64 * heads, 4  # 64-wide heads: diffusers infers heads = to_q rows / 64

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


def write_ip_adapter_repo(
    folder: str | os.PathLike[str],
    unet: Any,
    *,
    encoders: dict[str, dict[str, Any]],
    resampler: tuple[int, int],
    files: tuple[str, ...] = ("sdxl", "vit-h", "plus", "plus-face"),
    seed: int = 0,
) -> Path:
    """``h94/IP-Adapter``'s layout for ``unet``: image encoders (CLIP vision config per folder) and the weights files
    of the variants in ``files``; ``resampler`` is the plus models' (width, heads) — (1280, 20) when published."""  # fmt: skip
    from safetensors.torch import save_file

    root = Path(folder)
    cross, widths = unet.config.cross_attention_dim, _cross_widths(unet)
    for i, (sub, config) in enumerate(encoders.items()):
        _encoder(root / sub, config, seed + i)
    vit_h = encoders.get("models/image_encoder", {})
    big_g = encoders.get("sdxl_models/image_encoder", {})
    dim, heads = resampler
    builders = {
        "sdxl": ("ip-adapter_sdxl.safetensors", lambda g: _plain(cross, big_g["projection_dim"], g)),
        "vit-h": ("ip-adapter_sdxl_vit-h.safetensors", lambda g: _plain(cross, vit_h["projection_dim"], g)),
        "plus": ("ip-adapter-plus_sdxl_vit-h.safetensors", lambda g: _resampler(cross, vit_h["hidden_size"], g, dim, heads=heads)),
        "plus-face": ("ip-adapter-plus-face_sdxl_vit-h.safetensors", lambda g: _resampler(cross, vit_h["hidden_size"], g, dim, heads=heads)),
    }  # fmt: skip
    (root / "sdxl_models").mkdir(parents=True, exist_ok=True)
    for i, variant in enumerate(files):
        name, image_proj = builders[variant]
        g = torch.Generator().manual_seed(seed + 10 + i)
        save_file({**image_proj(g), **_attention(cross, widths, g)}, str(root / "sdxl_models" / name))
    return root


def write_tiny_ip_adapter_repo(folder: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = 0) -> Path:
    """The four SDXL IP-Adapter files and both image encoders of ``h94/IP-Adapter``, tiny, fitting the tiny base."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    encoders = {sub: {"hidden_size": h, "projection_dim": p, **TINY_VISION} for sub, (h, p) in ENCODERS.items()}
    return write_ip_adapter_repo(folder, unet, encoders=encoders, resampler=(32, 1), seed=seed)


def _faceid_lora(unet: Any, g: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    # LoRA on q/k/v/out of every attention layer, numbered in processor order, as in the published FaceID files.
    out = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            out[f"{index}.{proj}_lora.down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.1
            out[f"{index}.{proj}_lora.up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    return out


def _faceid_mlp(cross: int, g: torch.Generator, tokens: int = 4, ids: int = 512) -> dict[str, torch.Tensor]:
    # MLPProjModel / ProjPlusModel front: Linear(512 -> 1024), GELU, Linear(1024 -> tokens * cross), LayerNorm(cross).
    return {
        "proj.0.weight": torch.randn(2 * ids, ids, generator=g) * 0.05, "proj.0.bias": torch.randn(2 * ids, generator=g) * 0.05,
        "proj.2.weight": torch.randn(tokens * cross, 2 * ids, generator=g) * 0.05, "proj.2.bias": torch.randn(tokens * cross, generator=g) * 0.05,
        "norm.weight": 1 + torch.randn(cross, generator=g) * 0.1, "norm.bias": torch.randn(cross, generator=g) * 0.1,
    }  # fmt: skip


def write_faceid_repo(
    folder: str | os.PathLike[str], unet: Any, *, clip_hidden: int, rank: int = 4, plus: bool = True, seed: int = 0
) -> Path:
    """``h94/IP-Adapter-FaceID``'s ``ip-adapter-faceid_sdxl.bin`` (and ``-plusv2``) for ``unet``, pickled like the
    published files (a dict of ``image_proj`` and ``ip_adapter`` state dicts), their attention LoRA of ``rank``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    cross, widths = unet.config.cross_attention_dim, _cross_widths(unet)
    variants = [("ip-adapter-faceid_sdxl.bin", False)] + ([("ip-adapter-faceid-plusv2_sdxl.bin", True)] if plus else [])
    for i, (name, with_clip) in enumerate(variants):
        g = torch.Generator().manual_seed(seed + 20 + i)
        image_proj = _faceid_mlp(cross, g)
        if with_clip:
            # The perceiver runs at the cross-attention width with 64-wide heads (FacePerceiverResampler).
            resampler = _resampler(cross, clip_hidden, g, dim=cross, depth=4, heads=max(1, cross // 64))
            image_proj.update(
                {
                    k.replace("image_proj.", "perceiver_resampler."): v
                    for k, v in resampler.items()
                    if "latents" not in k
                }
            )
        ip = {k.removeprefix("ip_adapter."): v for k, v in _attention(cross, widths, g).items()}
        ip.update(_faceid_lora(unet, g, rank))
        torch.save({"image_proj": image_proj, "ip_adapter": ip}, root / name)
    return root


def write_tiny_faceid_repo(folder: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = 0) -> Path:
    """Both FaceID files, tiny, fitting the tiny base."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    return write_faceid_repo(folder, unet, clip_hidden=ENCODERS["models/image_encoder"][0], seed=seed)
