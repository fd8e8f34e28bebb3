"""EVA02-CLIP-L-14-336's vision tower — timm's implementation, loaded from the original EVA-CLIP checkpoint that PuLID
uses — and the features PuLID's ID encoder reads from a face: the class token after the final norm and head, scaled to
unit length, and the token sequences entering blocks 4, 8, 12, 16 and 20 (class token included, no norm).

The checkpoint is the full CLIP model (``QuanSun/EVA-CLIP``, ``EVA02_CLIP_L_336_psz14_s6B.pt``, a pickle read with
``weights_only=True``, or the same tensors as ``.safetensors``); only its ``visual.*`` part is used, renamed to timm's
layout by timm's own converter. The model's size is read from the checkpoint, so smaller EVA02 towers load the same way.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..base.caches import process_cached
from ..base.errors import IncompatibleModelError

__all__ = ["EVA_REPO", "EVA_FILE", "HIDDEN_BLOCKS", "eva_checkpoint", "load_eva_clip", "eva_face_features"]

EVA_REPO = "QuanSun/EVA-CLIP"
EVA_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
# Blocks whose outputs PuLID reads (the inputs of blocks 4, 8, 12, 16, 20).
HIDDEN_BLOCKS = (3, 7, 11, 15, 19)
# OpenAI CLIP's normalisation, which EVA-CLIP was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EVA02-CLIP's attention heads are 64 wide; its rotary positions are scaled to a 16x16 pretraining grid.
_HEAD_WIDTH = 64
_ROPE_GRID = (16, 16)


def eva_checkpoint(source: str | os.PathLike[str] = EVA_REPO) -> Path:
    """The EVA-CLIP weights file: a path, or ``EVA_FILE`` in a local folder or hub repo (through the HF cache)."""
    from ..weights.hub import resolve_in, resolve_source

    path = Path(str(source)).expanduser()
    if path.is_file():
        return resolve_source(path, allow=["*"], allow_pickle=True)
    return resolve_in(source, EVA_FILE)


def _visual_state(path: Path) -> dict[str, torch.Tensor]:
    from ..weights.checkpoints import read_checkpoint

    state = read_checkpoint(path)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    visual = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("visual.")}
    if "visual.cls_token" not in visual or "visual.blocks.0.attn.q_proj.weight" not in visual:
        raise IncompatibleModelError(f"{path} is not an EVA02-CLIP checkpoint (no visual.* EVA02 tower)")
    return visual


@process_cached(2)
def _load(path: str, size: int, mtime_ns: int, device: str) -> Any:
    from timm.models.eva import Eva, checkpoint_filter_fn

    visual = _visual_state(Path(path))
    width = visual["visual.cls_token"].shape[-1]
    patch = visual["visual.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(visual["visual.pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("visual.blocks."))
    hidden = visual["visual.blocks.0.mlp.w1.weight"].shape[0]
    model = Eva(
        img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // _HEAD_WIDTH,
        mlp_ratio=hidden / width, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
        use_rot_pos_emb=True, ref_feat_shape=_ROPE_GRID, global_pool="token",
        num_classes=visual["visual.head.weight"].shape[0],
    )  # fmt: skip
    try:
        model.load_state_dict(checkpoint_filter_fn(visual, model), strict=True)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{path} does not fit an EVA02-CLIP vision tower ({str(exc)[:300]})") from None
    return model.to(device).eval().requires_grad_(False)


def load_eva_clip(source: str | os.PathLike[str] = EVA_REPO, device: str | torch.device = "cpu") -> Any:
    """EVA02-CLIP's vision tower as a timm ``Eva`` in float32 (as PuLID runs it), once per process and file.

    Example:
        >>> eva = load_eva_clip()  # QuanSun/EVA-CLIP from the HF cache  # doctest: +SKIP
    """
    path = eva_checkpoint(source)
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))


@torch.no_grad()
def eva_face_features(model: Any, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(class embedding scaled to unit length (batch, proj), the five hidden token sequences (batch, tokens, width))
    of an image (batch, 3, H, W) in [0, 1].

    The image is resized to the tower's input (bicubic without antialiasing, as the reference's torchvision 0.15
    did) and normalised with CLIP's mean and std.

    Example:
        >>> cls, hidden = eva_face_features(load_eva_clip(), face_only(aligned, parser))  # doctest: +SKIP
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    size = model.patch_embed.img_size
    x = resize(image, list(size), InterpolationMode.BICUBIC, antialias=False)
    x = normalize(x, CLIP_MEAN, CLIP_STD)
    final, taken = model.forward_intermediates(
        x, indices=list(HIDDEN_BLOCKS), return_prefix_tokens=True, output_fmt="NLC"
    )
    cls = model.forward_head(final)
    hidden = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in taken]
    return cls / cls.norm(2, dim=1, keepdim=True), hidden
