"""PhotoMaker's published files with random weights and the published key names: ``photomaker-v1.bin`` and
``photomaker-v2.bin`` (a pickled ``{"id_encoder": ..., "lora_weights": ...}``, tensors in float32 and bfloat16 mixed as
published); tiny for the tests, the real widths by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .tiny import _seeded

__all__ = ["write_photomaker_checkpoint", "TINY_CLIP"]

# A tiny CLIP vision tower at the real input size (224 px, 14-px patches): two 64-wide heads.
TINY_CLIP = dict(width=128, layers=2, intermediate=64)


def _lora(unet: Any, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    # Old diffusers attention-processor names, for every attention layer of the UNet.
    out = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            key = f"unet.{name}.{proj}_lora"
            out[f"{key}.down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.05
            out[f"{key}.up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.05
    return out


def _mlp(prefix: str, width_in: int, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {
        f"{prefix}.layernorm.weight": 1 + r(width_in), f"{prefix}.layernorm.bias": r(width_in),
        f"{prefix}.fc1.weight": r(width, width_in), f"{prefix}.fc1.bias": r(width),
        f"{prefix}.fc2.weight": r(width, width), f"{prefix}.fc2.bias": r(width),
    }  # fmt: skip


def write_photomaker_checkpoint(
    path: str | os.PathLike[str], unet: Any, version: str, *, widths: tuple[int, int] = (768, 1280), width: int = 1024,
    layers: int = 24, intermediate: int = 4096, face: int = 512, ratio: int = 4, rank: int = 8, seed: int = 0,
) -> Path:  # fmt: skip
    """PhotoMaker ``version`` ("v1" or "v2") for ``unet``: CLIP ViT (``width``, ``layers``; 224 px, 14-px patches,
    64-wide heads), projections to the two text encoders' ``widths``, the fuse module, v2's Q-Former (``face``-d
    embeddings, 2 tokens, 128-wide heads), and a LoRA of ``rank`` on every attention projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    d1, d2 = widths
    embed = d1 + d2
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=intermediate, num_attention_heads=width // 64,
                              num_hidden_layers=layers, patch_size=14, image_size=224, projection_dim=d1)  # fmt: skip
    clip = _seeded(seed, lambda: CLIPVisionModelWithProjection(config)).state_dict()
    encoder: dict[str, torch.Tensor] = {k: v for k, v in clip.items() if not k.endswith("position_ids")}
    encoder["visual_projection_2.weight"] = r(d2, width)
    encoder.update(_mlp("fuse_module.mlp1", 2 * embed, embed, g))
    encoder.update(_mlp("fuse_module.mlp2", embed, embed, g))
    encoder.update({"fuse_module.layer_norm.weight": 1 + r(embed), "fuse_module.layer_norm.bias": r(embed)})
    if version == "v2":
        q = "qformer_perceiver"
        encoder.update({
            f"{q}.token_proj.0.weight": r(face * ratio, face), f"{q}.token_proj.0.bias": r(face * ratio),
            f"{q}.token_proj.2.weight": r(embed * 2, face * ratio), f"{q}.token_proj.2.bias": r(embed * 2),
            f"{q}.token_norm.weight": 1 + r(embed), f"{q}.token_norm.bias": r(embed),
            f"{q}.perceiver_resampler.proj_in.weight": r(embed, width), f"{q}.perceiver_resampler.proj_in.bias": r(embed),
            f"{q}.perceiver_resampler.proj_out.weight": r(embed, embed), f"{q}.perceiver_resampler.proj_out.bias": r(embed),
            f"{q}.perceiver_resampler.norm_out.weight": 1 + r(embed), f"{q}.perceiver_resampler.norm_out.bias": r(embed),
        })  # fmt: skip
        for i in range(4):
            p = f"{q}.perceiver_resampler.layers.{i}"
            encoder.update({
                f"{p}.0.norm1.weight": 1 + r(embed), f"{p}.0.norm1.bias": r(embed),
                f"{p}.0.norm2.weight": 1 + r(embed), f"{p}.0.norm2.bias": r(embed),
                f"{p}.0.to_q.weight": r(embed, embed) * 4, f"{p}.0.to_kv.weight": r(2 * embed, embed) * 4,
                f"{p}.0.to_out.weight": r(embed, embed), f"{p}.1.0.weight": 1 + r(embed), f"{p}.1.0.bias": r(embed),
                f"{p}.1.1.weight": r(4 * embed, embed) * 4, f"{p}.1.3.weight": r(embed, 4 * embed),
            })  # fmt: skip
    elif version != "v1":
        raise ValueError(f"no PhotoMaker version {version!r}")
    # As published, part of the tensors are bfloat16.
    encoder = {k: v.to(torch.bfloat16) if k.startswith("fuse_module.") else v for k, v in encoder.items()}
    lora = {k: v.to(torch.bfloat16) for k, v in _lora(unet, rank, g).items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"id_encoder": encoder, "lora_weights": lora}, out)
    return out
