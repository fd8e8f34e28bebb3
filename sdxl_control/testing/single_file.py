"""A diffusers SDXL pipeline folder written as the single ``.safetensors`` checkpoint A1111 and ComfyUI users download:
Stability's original (SGM) key layout, the inverse of diffusers' single-file conversion.

* UNet -> ``model.diffusion_model.``: ``input_blocks`` / ``middle_block`` / ``output_blocks`` numbered as the
  original UNet numbers them (``layers_per_block`` resnets per down block, one more per up block, the resample
  layer last), resnets as ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``;
* VAE -> ``first_stage_model.``: ``down.i.block.j``, ``up.(n-1-i).block.j``, ``mid.block_1`` / ``attn_1`` (its
  projections as 1x1 convolutions), ``nin_shortcut``;
* CLIP ViT-L -> ``conditioner.embedders.0.transformer.text_model.`` (the transformers layout);
* OpenCLIP ViT-bigG -> ``conditioner.embedders.1.model.`` (the refiner's only encoder: ``embedders.0``):
  ``transformer.resblocks.i`` with the attention's q/k/v stacked in ``in_proj``, ``text_projection`` transposed.

Example:
    >>> write_single_file(tiny_base_folder, "base.safetensors")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_single_file", "write_vae_file"]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def write_single_file(
    folder: str | os.PathLike[str], file: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """The pipeline at ``folder`` (a base: two text encoders; a refiner: one) as one SGM-layout checkpoint, in
    ``dtype`` (default: as diffusers loads the components, float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
    out = _unet(unet.state_dict(), dict(unet.config))
    out.update(_vae(AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).state_dict()))
    open_clip = 0
    if (index.get("text_encoder") or [None])[0] is not None:
        first = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype).state_dict()
        for key, value in first.items():
            inner = key if key.startswith("text_model.") else f"text_model.{key}"
            out[f"conditioner.embedders.0.transformer.{inner}"] = value
        open_clip = 1
    second = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype).state_dict()
    out.update(_open_clip(second, f"conditioner.embedders.{open_clip}.model."))
    target = Path(file)
    save_file({k: v.contiguous() for k, v in out.items()}, str(target))
    return target


def write_vae_file(folder: str | os.PathLike[str], file: str | os.PathLike[str]) -> Path:
    """The VAE folder at ``folder`` as one file in the original layout (``encoder.down.0.block.0...``), as
    ``sdxl_vae.safetensors`` is published."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    state = _vae(AutoencoderKL.from_pretrained(folder).state_dict())
    target = Path(file)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}, str(target))
    return target


def _unet(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    per_down = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    places = {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
    }  # fmt: skip
    for i in range(blocks):
        for j in range(per_down):
            number = 1 + i * (per_down + 1) + j
            places[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{number}.0"
            places[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{number}.1"
        places[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per_down + 1)}.0.op"
        for j in range(per_down + 1):
            number = i * (per_down + 1) + j
            places[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{number}.0"
            places[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{number}.1"
        last = i * (per_down + 1) + per_down
        places[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if up_attention[i] else 1}.conv"
    out = {}
    for key, value in state.items():
        prefix = max((p for p in places if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1 :]
        if ".resnets." in f".{prefix}.":
            name, _, leaf = rest.rpartition(".")
            rest = f"{_RESNET[name]}.{leaf}"
        out[f"model.diffusion_model.{places[prefix]}.{rest}"] = value
    return out


def _vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ups = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            number = int(parts[2]) if parts[1] == "down_blocks" else ups - 1 - int(parts[2])
            kind = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                inner = f"block.{parts[4]}.{_vae_resnet(parts[5:])}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                inner = f"{'downsample' if kind == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
            key = f"{parts[0]}.{kind}.{number}.{inner}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                key = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{_vae_resnet(parts[4:])}"
            else:
                rest = ".".join(parts[4:])
                name, _, leaf = rest.rpartition(".")
                key = f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION[name]}.{leaf}"
                if value.ndim == 2:  # the original's projections are 1x1 convolutions
                    value = value[:, :, None, None]
        elif parts[1] == "conv_norm_out":
            key = f"{parts[0]}.norm_out.{parts[2]}"
        out[f"first_stage_model.{key}"] = value
    return out


def _vae_resnet(parts: list[str]) -> str:
    return ".".join(["nin_shortcut" if parts[0] == "conv_shortcut" else parts[0], *parts[1:]])


def _open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    state = {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in state.items()
    }
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
    }
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    for i in range(layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{ours}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[f"{theirs}attn.out_proj.{kind}"] = state[f"{ours}self_attn.out_proj.{kind}"]
            out[f"{theirs}ln_1.{kind}"] = state[f"{ours}layer_norm1.{kind}"]
            out[f"{theirs}ln_2.{kind}"] = state[f"{ours}layer_norm2.{kind}"]
            out[f"{theirs}mlp.c_fc.{kind}"] = state[f"{ours}mlp.fc1.{kind}"]
            out[f"{theirs}mlp.c_proj.{kind}"] = state[f"{ours}mlp.fc2.{kind}"]
    return {prefix + k: v for k, v in out.items()}
