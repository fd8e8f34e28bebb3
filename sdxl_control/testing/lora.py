"""Tiny SDXL LoRA files in the two layouts people publish: diffusers/peft and kohya (SGM block names)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["write_tiny_lora"]

# kohya's SDXL names use the original (SGM) UNet blocks; these are the same layers in diffusers' naming for SDXL's
# layout (three down blocks of two layers), which the tiny UNet shares.
KOHYA_UNET = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks_7_1_proj_in": "down_blocks.2.attentions.0.proj_in",
    "middle_block_1_transformer_blocks_0_attn2_to_v": "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "output_blocks_0_1_transformer_blocks_1_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2",
    "output_blocks_4_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
}
TEXT = "text_model.encoder.layers.1.self_attn.{}_proj"


def write_tiny_lora(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    layout: str,
    seed: int = 0,
    rank: int = 4,
    text: bool = True,
    attention_alpha: float | None = None,
) -> Path:
    """A random LoRA for the tiny base at ``base`` in ``layout`` ``"kohya"`` or ``"peft"``.

    kohya files get ``alpha = rank / 2`` on every other module (else ``rank``); ``attention_alpha`` overrides it on
    attention projections.
    """  # fmt: skip
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def pair(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(module, torch.nn.Conv2d):
            return (torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.2,
                    torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.2)  # fmt: skip
        assert isinstance(module, torch.nn.Linear)
        return (torch.randn(rank, module.in_features, generator=g) * 0.2,
                torch.randn(module.out_features, rank, generator=g) * 0.2)  # fmt: skip

    targets = [(f"lora_unet_{k}", "unet." + v, unet.get_submodule(v)) for k, v in KOHYA_UNET.items()]
    if text:
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        for proj in ("q", "v"):
            name = TEXT.format(proj)
            # Published files use transformers-4 names (text_model.encoder...); transformers 5 has no text_model level.
            module = text_encoder.get_submodule(
                name if hasattr(text_encoder, "text_model") else name.removeprefix("text_model.")
            )
            targets.append((f"lora_te1_{name.replace('.', '_')}", f"text_encoder.{name}", module))
    for i, (kohya, peft, module) in enumerate(targets):
        if layout == "peft" and isinstance(module, torch.nn.Conv2d):
            continue
        down, up = pair(module)
        if layout == "kohya":
            out[f"{kohya}.lora_down.weight"], out[f"{kohya}.lora_up.weight"] = down, up
            alpha = float(rank // 2 if i % 2 else rank)
            if attention_alpha is not None and "_attn" in kohya:
                alpha = attention_alpha
            out[f"{kohya}.alpha"] = torch.tensor(alpha)
        else:
            out[f"{peft}.lora_A.weight"], out[f"{peft}.lora_B.weight"] = down, up
    save_file(out, str(path))
    return Path(path)
