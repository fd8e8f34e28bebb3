"""IP-Adapter FaceID conditions: a person's identity from insightface face embeddings.

``faceid`` projects the 512-d ArcFace embedding to identity tokens; ``plusv2`` also reads the CLIP (ViT-H)
features of the aligned face and adds the identity tokens back through a shortcut scaled by ``s_scale``. Both
checkpoints carry a LoRA for every attention layer (the published ``*_lora.safetensors`` companions hold the same
weights for other tools); it is added at ``lora_scale`` (1, as the reference fuses it) at the steps where the condition
acts, through the weight channel, and removed bit-exactly afterwards.

Example:
    >>> from sdxl_control.adapters.faceid import FaceID
    >>> FaceID("plusv2", ["face1.jpg", "face2.jpg"], scale=0.8)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..base.errors import ConditionError
from ..engine.devices import placement
from ..preprocessors.face import DEFAULT_PACK, analyze_faces, pack_need
from ..protocol.conditions import Condition, Likeness, PrepareContext, Prepared, Stage, Tokens
from ..records.infotext import Infotext, control_unit, model_label
from ..weights.checkpoints import check_safetensors
from ..weights.conversion import numbered_lora_deltas
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, pattern_for, weights_need
from .ip_adapter import ENCODER_FILES, IPPrepared, check_variant, encode_images, layer_scales, load_adapter, region_mask
from .ip_adapter import REPO as IP_ADAPTER_REPO
from .ip_adapter import VARIANTS as IP_VARIANTS

__all__ = ["FaceID", "FACEID_VARIANTS", "save_face", "load_face"]

FACEID_REPO = "h94/IP-Adapter-FaceID"
FACEID_VARIANTS: dict[str, str] = {
    "faceid": "ip-adapter-faceid_sdxl.bin",
    "plusv2": "ip-adapter-faceid-plusv2_sdxl.bin",
}


def save_face(
    path: str | os.PathLike[str], id_embeds: torch.Tensor, clip: tuple[torch.Tensor, torch.Tensor] | None = None
) -> None:
    """Store identity embeddings (and, for PlusV2, the CLIP features of the aligned faces) for reuse."""
    from safetensors.torch import save_file

    tensors = {"id_embeds": id_embeds.contiguous()}
    if clip is not None:
        tensors.update(clip_embeds=clip[0].contiguous(), negative_clip_embeds=clip[1].contiguous())
    save_file(tensors, str(path))


def load_face(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_safetensors(Path(path))
    return load_file(str(path))


@dataclass(frozen=True)
class FaceID(Condition):
    """IP-Adapter FaceID (``"faceid"``) or FaceID-PlusV2 (``"plusv2"``, the default) with one or several faces.

    ``faces`` are images (analysed with the insightface pack ``face_pack``) or :class:`FaceInfo`; several faces add
    their tokens together. ``embeddings`` takes a file from :func:`save_face` instead. ``s_scale`` weighs PlusV2's
    identity shortcut, ``lora_scale`` the checkpoint's LoRA (which acts, like the tokens, only where ``scale`` is not
    0 and ``window`` holds the step). ``source`` is the repo of the checkpoints (``h94/IP-Adapter-FaceID`` or a local
    copy), ``image_encoder`` the ViT-H CLIP vision folder PlusV2 needs (default: ``h94/IP-Adapter``'s).

    Example:
        >>> FaceID("faceid", "me.jpg", scale=0.8, window=(0.0, 0.8))  # doctest: +SKIP
    """

    variant: str = "plusv2"
    faces: Any = None
    embeddings: str | None = None
    source: str = FACEID_REPO
    image_encoder: str | None = None
    face_pack: str = DEFAULT_PACK
    face_root: str = "~/.insightface"
    s_scale: float = 1.0
    lora_scale: float = 1.0
    layers: str | Mapping[str, Any] = "all"
    mask: Any = None

    kind: ClassVar[str] = "faceid"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = "FaceID SDXL checkpoints are trained for the base UNet"
    path_fields: ClassVar[tuple[str, ...]] = (
        "variant", "faces", "embeddings", "source", "image_encoder", "face_pack", "face_root", "mask",
    )  # fmt: skip
    model_fields: ClassVar[Mapping[str, str]] = {"face_pack": "insightface", "image_encoder": "clip_vision"}
    aligned_fields: ClassVar[tuple[str, ...]] = ("mask",)

    def likeness(self) -> Likeness:
        return Likeness(self.faces, None, self.mask)

    def infotext(self) -> Infotext:
        weights = self._weights_file()
        module = "ip-adapter_face_id_plus" if self.plus else "ip-adapter_face_id"
        return Infotext(units=(control_unit(module, model_label(weights, weights), self.scale, self.window),))

    def model_needs(self) -> tuple[ModelNeed, ...]:
        licence = "the model card limits IP-Adapter-FaceID to non-commercial research (insightface embeddings)"
        if self.variant in FACEID_VARIANTS:
            needs = [weights_need("IP-Adapter FaceID", self.source, [FACEID_VARIANTS[self.variant]], licence=licence)]
        else:
            needs = [weights_need("IP-Adapter FaceID", self.variant, ["*.bin", "*.safetensors"], licence=licence)]
        if self.plus:
            needs.append(
                weights_need("IP-Adapter image encoder", self.image_encoder, ENCODER_FILES)
                if self.image_encoder
                else weights_need(
                    "IP-Adapter image encoder", IP_ADAPTER_REPO, [pattern_for(IP_VARIANTS["plus"].encoder)]
                )
            )
        if self.faces is not None:
            needs.append(pack_need(self.face_pack, self.face_root))
        return tuple(needs)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_variant(self.variant, FACEID_VARIANTS, "FaceID")
        if (self.faces is None) == (self.embeddings is None):
            raise ConditionError("FaceID takes face images / FaceInfo or saved embeddings (one of the two)")

    @property
    def plus(self) -> bool:
        return self.variant == "plusv2" or "plus" in Path(self.variant).name

    def _weights_file(self) -> Path:
        if self.variant in FACEID_VARIANTS:
            return resolve_in(self.source, FACEID_VARIANTS[self.variant])
        # read_weights loads .bin files with weights_only=True
        return resolve_source(self.variant, allow=["*.bin", "*.safetensors"], allow_pickle=True)

    def _encoder(self) -> Path:
        if self.image_encoder:
            return Path(self.image_encoder)
        return resolve_in(IP_ADAPTER_REPO, IP_VARIANTS["plus"].encoder)

    def _inputs(self, ctx: PrepareContext) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.embeddings is not None:
            saved = load_face(self.embeddings)
            clip = (saved["clip_embeds"], saved["negative_clip_embeds"]) if "clip_embeds" in saved else None
            if self.plus and clip is None:
                raise ConditionError(f"{self.embeddings} holds no CLIP face features, which FaceID-PlusV2 needs")
            return saved["id_embeds"], clip
        faces = analyze_faces(self.faces, self.face_pack, self.face_root)
        # FaceID was trained on unit-length ArcFace embeddings (the reference takes insightface's normed_embedding).
        ids = torch.from_numpy(np.stack([f.normed_embedding for f in faces]))
        if not self.plus:
            return ids, None
        return ids, encode_images(
            [f.aligned for f in faces], self._encoder(), hidden_states=True, device=str(ctx.device), dtype=ctx.dtype
        )

    def prepare(self, ctx: PrepareContext) -> Prepared:
        unet = ctx.unet(Stage.BASE)
        weights_file = self._weights_file()
        adapter = load_adapter(weights_file, unet, ctx)
        projection = adapter.projection
        ids, clip = self._inputs(ctx)
        n = ids.shape[0]
        stack = torch.cat([torch.zeros_like(ids), ids]) if ctx.guided else ids  # [uncond, cond] faces
        if clip is not None:
            cond, uncond = clip
            clip_stack = torch.cat([uncond, cond]) if ctx.guided else cond
            projection.clip_embeds = clip_stack.reshape(-1, n, *cond.shape[1:]).to(ctx.device, ctx.dtype)
            projection.shortcut, projection.shortcut_scale = True, self.s_scale
        width = unet.config.cross_attention_dim
        with torch.no_grad():
            rows = projection(stack.to(ctx.device, ctx.dtype)).reshape(2 if ctx.guided else 1, -1, width)
        tokens = Tokens(rows[-1], rows[0] if ctx.guided else None).batched(ctx.batch_size, ctx.guided)
        mask = region_mask(self.mask, ctx) if self.mask is not None else None
        scales = {k: v * self.scale for k, v in layer_scales(unet, self.layers).items()}
        deltas = numbered_lora_deltas(adapter.weights, unet, self.lora_scale, placement(unet)[0])
        return IPPrepared(f"faceid:{self.variant}", adapter.weights, tokens, scales, mask, deltas)
