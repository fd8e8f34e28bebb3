"""PuLID's files with random weights and the published key names: both PuLID checkpoints, an EVA02-CLIP checkpoint in
the original EVA-CLIP layout, and facexlib's BiSeNet parsing weights; tiny for the tests, the real widths by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .ip_adapter import _cross_widths
from .tiny import _seeded

__all__ = ["write_eva_clip_checkpoint", "write_pulid_checkpoint", "write_face_parser", "write_tiny_pulid_models"]

# Tiny EVA02 tower: two 64-wide heads, the real depth, a 4x4 patch grid, a 16-wide class embedding.
TINY_EVA = dict(width=128, depth=24, patch=14, grid=4, proj=16)


def write_eva_clip_checkpoint(
    path: str | os.PathLike[str], *, width: int = 1024, depth: int = 24, patch: int = 14, grid: int = 24,
    proj: int = 768, mlp_ratio: float = 2.6667, seed: int = 0,
) -> Path:  # fmt: skip
    """An EVA02-CLIP checkpoint as ``QuanSun/EVA-CLIP`` publishes it (``torch.save`` of the CLIP state dict): the
    vision tower under ``visual.`` with the original names (q/k/v projections, ``q_bias``/``v_bias``,
    ``inner_attn_ln``, SwiGLU ``w1``/``w2``/``w3`` with ``ffn_ln``, rotary tables) and a text-tower key beside it."""
    g = torch.Generator().manual_seed(seed)
    hidden = int(width * mlp_ratio)

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(width, scale=0.1), f"{prefix}.bias": r(width)}

    v = "visual"
    state: dict[str, torch.Tensor] = {
        f"{v}.cls_token": r(1, 1, width, scale=0.5), f"{v}.pos_embed": r(1, grid * grid + 1, width, scale=0.5),
        f"{v}.patch_embed.proj.weight": r(width, 3, patch, patch), f"{v}.patch_embed.proj.bias": r(width),
        **norm(f"{v}.norm"), f"{v}.head.weight": r(proj, width), f"{v}.head.bias": r(proj),
        # Rotary tables are stored too (the reference recomputes them): 2D positions x head width.
        f"{v}.rope.freqs_cos": torch.ones(grid * grid, width // (width // 64)),
        f"{v}.rope.freqs_sin": torch.zeros(grid * grid, width // (width // 64)),
        "text.token_embedding.weight": r(8, 4),
    }  # fmt: skip
    for i in range(depth):
        b = f"{v}.blocks.{i}"
        state.update({
            **norm(f"{b}.norm1"), **norm(f"{b}.norm2"),
            f"{b}.attn.q_proj.weight": r(width, width), f"{b}.attn.k_proj.weight": r(width, width),
            f"{b}.attn.v_proj.weight": r(width, width), f"{b}.attn.q_bias": r(width), f"{b}.attn.v_bias": r(width),
            **norm(f"{b}.attn.inner_attn_ln"), f"{b}.attn.proj.weight": r(width, width), f"{b}.attn.proj.bias": r(width),
            f"{b}.mlp.w1.weight": r(hidden, width), f"{b}.mlp.w1.bias": r(hidden),
            f"{b}.mlp.w2.weight": r(hidden, width), f"{b}.mlp.w2.bias": r(hidden),
            f"{b}.mlp.ffn_ln.weight": 1 + r(hidden, scale=0.1), f"{b}.mlp.ffn_ln.bias": r(hidden),
            f"{b}.mlp.w3.weight": r(width, hidden), f"{b}.mlp.w3.bias": r(width),
            f"{b}.attn.rope.freqs_cos": state[f"{v}.rope.freqs_cos"], f"{b}.attn.rope.freqs_sin": state[f"{v}.rope.freqs_sin"],
        })  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def _mlp(prefix: str, sizes: list[int], g: torch.Generator) -> dict[str, torch.Tensor]:
    # Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear: modules 0, 1, 3, 4, 6.
    a, b, c, d = sizes
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {
        f"{prefix}.0.weight": r(b, a), f"{prefix}.0.bias": r(b), f"{prefix}.1.weight": 1 + r(b), f"{prefix}.1.bias": r(b),
        f"{prefix}.3.weight": r(c, b), f"{prefix}.3.bias": r(c), f"{prefix}.4.weight": 1 + r(c), f"{prefix}.4.bias": r(c),
        f"{prefix}.6.weight": r(d, c), f"{prefix}.6.bias": r(d),
    }  # fmt: skip


def write_pulid_checkpoint(
    path: str | os.PathLike[str], unet: Any, version: str, *, vit_width: int = 1024, id_width: int = 1280,
    hidden: int = 1024, former_width: int = 1024, former_heads: int = 16, seed: int = 0,
) -> Path:  # fmt: skip
    """A PuLID checkpoint for ``unet``: ``version="v1"`` (``IDEncoder``, published as ``pulid_v1.bin``) or ``"v1.1"``
    (``IDFormer``, ``pulid_v1.1.safetensors``); a flat dict of ``id_adapter.*`` and
    ``id_adapter_attn_layers.<i>.id_to_{k,v}.weight`` numbered by position among the UNet's attention processors
    (odd: cross-attention only), written as safetensors or as a pickle by the file's suffix."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    cross = unet.config.cross_attention_dim
    state: dict[str, torch.Tensor] = {}
    if version == "v1":
        first, second = min(cross * 5 // 4, hidden), min(cross * 5 // 2, hidden)
        body = _mlp("id_adapter.body", [id_width, first, second, cross * 5], g)
        state.update(body)
        for i in range(5):
            state.update(_mlp(f"id_adapter.mapping_{i}", [vit_width, hidden, hidden, cross], g))
            state.update(_mlp(f"id_adapter.mapping_patch_{i}", [vit_width, hidden, hidden, cross], g))
    elif version == "v1.1":
        dim, inner = former_width, 64 * former_heads
        # The reference initialises both at dim^-1/2 scale; larger ones make the tokens, and so ortho_v2's unscaled
        # logits, ill-conditioned.
        state["id_adapter.latents"] = torch.randn(1, 32, dim, generator=g) * dim**-0.5
        state["id_adapter.proj_out"] = torch.randn(dim, cross, generator=g) * dim**-0.5 * 0.3
        state.update(_mlp("id_adapter.id_embedding_mapping", [id_width, hidden, hidden, dim * 5], g))
        for i in range(5):
            state.update(_mlp(f"id_adapter.mapping_{i}", [vit_width, hidden, hidden, dim], g))
        for i in range(10):
            p = f"id_adapter.layers.{i}"
            state.update({
                f"{p}.0.norm1.weight": 1 + r(dim), f"{p}.0.norm1.bias": r(dim),
                f"{p}.0.norm2.weight": 1 + r(dim), f"{p}.0.norm2.bias": r(dim),
                f"{p}.0.to_q.weight": r(inner, dim) * 4, f"{p}.0.to_kv.weight": r(2 * inner, dim) * 4,
                f"{p}.0.to_out.weight": r(dim, inner),
                f"{p}.1.0.weight": 1 + r(dim), f"{p}.1.0.bias": r(dim),
                f"{p}.1.1.weight": r(dim * 4, dim) * 4, f"{p}.1.3.weight": r(dim, dim * 4),
            })  # fmt: skip
    else:
        raise ValueError(f"no PuLID version {version!r}")
    for n, width in enumerate(_cross_widths(unet)):
        for name in ("id_to_k", "id_to_v"):
            state[f"id_adapter_attn_layers.{2 * n + 1}.{name}.weight"] = r(width, cross) * 4
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out


def write_face_parser(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """facexlib's BiSeNet (the real architecture, 13 M parameters) with random weights, as ``parsing_bisenet.pth``."""
    from facexlib.parsing.bisenet import BiSeNet

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = _seeded(seed, lambda: BiSeNet(num_class=19))
    torch.save(model.state_dict(), out / "parsing_bisenet.pth")
    return out


def write_tiny_pulid_models(folder: str | os.PathLike[str], unet: Any, seed: int = 0) -> dict[str, Path]:
    """A ``guozinan/PuLID`` folder with both checkpoints, a ``QuanSun/EVA-CLIP`` folder with a tiny EVA02 tower and a
    facexlib weights folder, all fitting ``unet``. Returns their paths: ``pulid``, ``eva``, ``parsing``."""
    root = Path(folder)
    eva = TINY_EVA
    widths = dict(
        vit_width=eva["width"], id_width=512 + eva["proj"], hidden=eva["width"], former_width=32, former_heads=1
    )
    write_pulid_checkpoint(root / "pulid" / "pulid_v1.bin", unet, "v1", seed=seed, **widths)
    write_pulid_checkpoint(root / "pulid" / "pulid_v1.1.safetensors", unet, "v1.1", seed=seed + 1, **widths)
    write_eva_clip_checkpoint(root / "eva" / "EVA02_CLIP_L_336_psz14_s6B.pt", seed=seed + 2, **eva)
    write_face_parser(root / "facexlib", seed=seed + 3)
    return {"pulid": root / "pulid", "eva": root / "eva", "parsing": root / "facexlib"}
