"""Random-weight ControlNets and annotator models in their published file layouts, for offline tests and demos."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .tiny import _seeded, freeze_version_stamps, tiny_models

__all__ = [
    "write_controlnet",
    "write_tiny_controlnet",
    "write_tiny_depth_estimator",
    "write_random_openpose",
    "tiny_control_models",
]


def _randomize_zero_layers(model: torch.nn.Module, seed: int) -> None:
    # ControlNets start with zero convolutions, which would make every test of their effect vacuous.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def write_controlnet(
    folder: str | os.PathLike[str], unet: Any, seed: int = 0, union: bool = False, promax: bool = False
) -> Path:
    """A random-weight ControlNet (or ControlNet-Union; ``promax``: with ProMax's 8 control types, tile and repaint
    among them) shaped after ``unet``, saved as a diffusers folder (config.json + diffusion_pytorch_model.safetensors);
    its zero convolutions made non-zero."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    if union:
        # The published union config ties its control-fusion transformer to the first block's width (320).
        width = unet.config.block_out_channels[0]
        config = dict(ControlNetUnionModel.from_unet(unet, load_weights_from_unet=False).config)
        config.pop("_use_default_values", None)  # else from_config resets the widths below to their defaults
        config.update(num_trans_channel=width, num_trans_head=2, num_proj_channel=width)
        if promax:
            config.update(num_control_type=8)
        model = _seeded(seed, lambda: ControlNetUnionModel.from_config(config))
    else:
        model = _seeded(seed, lambda: ControlNetModel.from_unet(unet, load_weights_from_unet=False))
    _randomize_zero_layers(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_tiny_controlnet(
    folder: str | os.PathLike[str],
    base: str | os.PathLike[str],
    seed: int = 0,
    union: bool = False,
    promax: bool = False,
) -> Path:
    """A ControlNet (or ControlNet-Union, ProMax) shaped after the UNet of the tiny base at ``base``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    return write_controlnet(folder, unet, seed, union, promax)


def write_tiny_depth_estimator(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny DPT depth estimator (the architecture of Intel/dpt-*) with its image processor, as a transformers
    folder that ``pipeline("depth-estimation")`` loads."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=64, patch_size=16,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
    )  # fmt: skip
    model = _seeded(seed, lambda: DPTForDepthEstimation(config))
    model.save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(folder)
    return Path(folder)


def write_random_openpose(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """controlnet-aux's OpenPose body, hand and face networks with random weights, under the published file names
    and key layout (body/hand keys without their block prefix). About 490 MB."""
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, (cls, name, strip) in enumerate(
        [
            (bodypose_model, "body_pose_model.pth", True),
            (handpose_model, "hand_pose_model.pth", True),
            (FaceNet, "facenet.pth", False),
        ]
    ):
        state = _seeded(seed + i, cls).state_dict()
        if strip:
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        torch.save(state, out / name)
    return out


def tiny_control_models(kind: str, seed: int = 0) -> Path:
    """A cached tiny model for the ``--tiny`` demo: ``controlnet-<edges|depth|pose|union>``, ``depth-estimator``,
    ``openpose``, the repos ``ip-adapter``, ``ip-adapter-faceid`` and ``instantid``, ``pulid`` (a folder with
    ``pulid/``, ``eva/`` and ``facexlib/``) or ``photomaker`` (both files), written next to the tiny pipelines on
    first use."""
    base = tiny_models(seed).base
    target = base.parent / kind
    if not target.exists():
        freeze_version_stamps(_write_control_model(kind, target, base, seed))
    return target


def _write_control_model(kind: str, target: Path, base: Path, seed: int) -> Path:
    controlnets = {"controlnet-edges": 11, "controlnet-depth": 12, "controlnet-pose": 13, "controlnet-union": 14}
    if kind in controlnets:
        return write_tiny_controlnet(target, base, seed=seed + controlnets[kind], union=kind == "controlnet-union")
    if kind == "depth-estimator":
        return write_tiny_depth_estimator(target, seed)
    if kind == "openpose":
        return write_random_openpose(target, seed)
    if kind == "photomaker":
        from diffusers import UNet2DConditionModel

        from .photomaker import TINY_CLIP, write_photomaker_checkpoint

        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        half = unet.config.cross_attention_dim // 2
        staging = target.with_name(".photomaker-building")
        for version in ("v1", "v2"):
            write_photomaker_checkpoint(staging / f"photomaker-{version}.bin", unet, version, widths=(half, half),
                                        **TINY_CLIP, seed=seed)  # fmt: skip
        staging.rename(target)
        return target
    if kind == "pulid":
        from diffusers import UNet2DConditionModel

        from .pulid import write_tiny_pulid_models

        staging = target.with_name(".pulid-building")
        write_tiny_pulid_models(staging, UNet2DConditionModel.from_pretrained(base, subfolder="unet"), seed)
        staging.rename(target)
        return target
    if kind in ("ip-adapter", "ip-adapter-faceid", "instantid"):
        from .instantid import write_tiny_instantid_repo
        from .ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo

        writers = {"ip-adapter": write_tiny_ip_adapter_repo, "ip-adapter-faceid": write_tiny_faceid_repo,
                   "instantid": write_tiny_instantid_repo}  # fmt: skip
        writer = writers[kind]
        staging = target.with_name(f".{kind}-building")
        writer(staging, base, seed)
        staging.rename(target)
        return target
    raise ValueError(f"no tiny model called {kind!r}")
