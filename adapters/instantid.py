"""InstantID: a person's face identity from one photo, through two parts that read the same 16 face tokens.

* **IdentityNet** is a standard SDXL ControlNet whose cross-attention reads the face tokens instead of the prompt,
  and whose control image is the face's five keypoints (:mod:`sdxl_control.preprocessors.keypoints`). It runs in the
  ControlNet channel with its own tokens; other ControlNets of the call keep reading the prompt, as in the
  reference's full pipeline.
* **Face tokens**: a Resampler (``image_proj``) turns the raw 512-d ArcFace embedding into 16 tokens, which every
  cross-attention layer attends to through its own key/value projections (``ip_adapter``) — an attention branch like
  an IP-Adapter's. The unconditional side of guidance sees the Resampler's output for a zero embedding, in both parts.

The published files (``InstantX/InstantID``) are ``ControlNetModel/`` and ``ip-adapter.bin`` (a pickled dict of
``image_proj`` and ``ip_adapter`` state dicts, read with ``torch.load(weights_only=True)``). Faces are analysed with
insightface's ``antelopev2`` pack, whose raw embeddings InstantID was trained on.

Example:
    >>> from sdxl_control.adapters.instantid import InstantID
    >>> InstantID("me.jpg", scale=0.8, controlnet_scale=0.8)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..base.errors import ConditionError, IncompatibleModelError
from ..preprocessors.face import IDENTITY_PACK, Identity, analyze_faces, pack_need, save_identity
from ..preprocessors.keypoints import keypoint_image, place_keypoints
from ..protocol.conditions import (
    Attachment,
    Condition,
    Crop,
    Likeness,
    Parts,
    PrepareContext,
    Prepared,
    Stage,
    Tokens,
    Window,
)
from ..records.infotext import Infotext, control_unit, model_label
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, weights_need
from .controlnet import CONTROLNET_FILES, ControlPrepared, control_tensor, controlnet_for
from .ip_adapter import IPPrepared, checkpoint_family, cross_layers, load_adapter, read_weights, region_mask

__all__ = ["InstantID", "InstantIDPrepared", "save_identity", "REPO", "EMBEDDING_WIDTH"]

REPO = "InstantX/InstantID"
IDENTITYNET = "ControlNetModel"
ADAPTER = "ip-adapter.bin"
# The width of an ArcFace embedding, which InstantID's Resampler reads.
EMBEDDING_WIDTH = 512


@dataclass(frozen=True, eq=False)
class InstantIDPrepared(Prepared):
    """InstantID's two parts, ready: the face-token branch (attention channel) and IdentityNet (ControlNet channel),
    each switched by its own scale and window.

    Example:
        >>> InstantID("me.jpg").prepare(ctx).control.context.shape  # doctest: +SKIP
        torch.Size([2, 16, 2048])
    """

    branch: IPPrepared
    control: ControlPrepared
    condition: InstantID

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        c = self.condition
        branch = self.branch.attach(unet, stage)
        try:
            control = self.control.attach(unet, stage)
        except BaseException:
            branch.detach()
            raise
        return Parts([(branch, c.scale, c.window), (control, c.controlnet_scale, c.controlnet_window)])


@dataclass(frozen=True)
class InstantID(Condition):
    """InstantID with one or several photos of a person (or a saved identity), posed like ``keypoints_from``.

    ``faces``: photos (the largest face of each is used, with a warning when a photo has several) or
    :class:`~sdxl_control.preprocessors.face.FaceInfo`; several photos' embeddings are averaged (``combine="average"``,
    as the authors advise) or all read by the Resampler (``"concat"``). ``identity`` takes a file from
    :func:`save_identity` instead. ``scale`` weighs the face-token branch within ``window``, ``controlnet_scale``
    IdentityNet within ``controlnet_window`` (0.8 each, as the reference recommends, with guidance 5).
    ``keypoints_from`` poses the face like the face in that photo (default: the first photo). ``mask`` (white = here)
    places the face in a region: its keypoints go into the region's box and both parts act only there, so two
    InstantIDs with two masks make two people. ``source`` is the repo holding ``ControlNetModel/`` and
    ``ip-adapter.bin`` (hub id or local copy); ``identitynet`` / ``adapter`` point at those files elsewhere.

    Example:
        >>> InstantID(["me1.jpg", "me2.jpg"], keypoints_from="pose.jpg", scale=0.6, controlnet_window=(0.0, 0.8))  # doctest: +SKIP
    """

    faces: Any = None
    identity: str | None = None
    keypoints_from: Any = None
    controlnet_scale: float = 0.8
    controlnet_window: Window = Window()
    mask: Any = None
    combine: Literal["average", "concat"] = "average"
    source: str = REPO
    identitynet: str | None = None
    adapter: str | None = None
    face_pack: str = IDENTITY_PACK
    face_root: str = "~/.insightface"
    scale: float = field(default=0.8, kw_only=True)

    kind: ClassVar[str] = "instantid"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = "InstantID's IdentityNet and face adapter are trained for the base UNet"
    path_fields: ClassVar[tuple[str, ...]] = (
        "faces", "identity", "keypoints_from", "mask", "source", "identitynet", "adapter", "face_pack", "face_root",
    )  # fmt: skip
    model_fields: ClassVar[Mapping[str, str]] = {
        "identitynet": "controlnet",
        "adapter": "instantid",
        "face_pack": "insightface",
    }

    def likeness(self) -> Likeness:
        return Likeness(self.faces, self.identity, self.mask)

    def in_crop(self, crop: Crop) -> InstantID:
        # The face is already where it is: IdentityNet is posed by the keypoints found in the crop, not by a photo
        # placed in a region (which has done its work by matching the face).
        if crop.face is None:
            return replace(self, mask=None)
        return replace(self, keypoints_from=crop.face, mask=None)

    def infotext(self) -> Infotext:
        # The ControlNet extension runs InstantID as two units: the face embedding, then the keypoints.
        adapter = self._adapter_file()
        identitynet = model_label(self.identitynet) if self.identitynet else f"{model_label(self.source)}/{IDENTITYNET}"
        return Infotext(units=(
            control_unit("instant_id_face_embedding", model_label(adapter, adapter), self.scale, self.window),
            control_unit("instant_id_face_keypoints", identitynet, self.controlnet_scale, self.controlnet_window),
        ))  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "controlnet_window", Window.of(self.controlnet_window))
        if (self.faces is None) == (self.identity is None):
            raise ConditionError("InstantID takes face photos / FaceInfo or a saved identity file (one of the two)")

    def model_needs(self) -> tuple[ModelNeed, ...]:
        adapter = (weights_need("InstantID adapter", self.adapter, ["*.bin", "*.safetensors"]) if self.adapter
                   else weights_need("InstantID adapter", self.source, [ADAPTER]))  # fmt: skip
        net = (weights_need("IdentityNet", self.identitynet, CONTROLNET_FILES) if self.identitynet
               else weights_need("IdentityNet", self.source, [f"{IDENTITYNET}/{f}" for f in CONTROLNET_FILES]))  # fmt: skip
        analysed = self.faces is not None or self.keypoints_from is not None
        return (adapter, net, *([pack_need(self.face_pack, self.face_root)] if analysed else []))

    def _adapter_file(self) -> Path:
        if self.adapter is not None:
            return resolve_source(self.adapter, allow=["*.bin", "*.safetensors"], allow_pickle=True)
        return resolve_in(self.source, ADAPTER)

    def _identity(self) -> Identity:
        pose = None
        if self.keypoints_from is not None:
            (pose,) = analyze_faces([self.keypoints_from], self.face_pack, self.face_root)
        if self.identity is not None:
            saved = Identity.load(self.identity)
            if pose is None:
                return saved
            return Identity(saved.embeddings, pose.landmarks, pose.image_size, saved.pack)
        faces = analyze_faces(self.faces, self.face_pack, self.face_root)
        return Identity.of(faces, pose, self.face_pack)

    def prepare(self, ctx: PrepareContext) -> Prepared:
        unet = ctx.unet(Stage.BASE)
        adapter_file = self._adapter_file()
        _check_layout(read_weights(adapter_file), unet, adapter_file)
        adapter = load_adapter(adapter_file, unet, ctx)
        identitynet = controlnet_for(ctx, self.identitynet or resolve_in(self.source, IDENTITYNET), union=False)
        identity = self._identity()

        embeddings = torch.from_numpy(np.asarray(identity.embeddings, np.float32)).reshape(-1, EMBEDDING_WIDTH)
        if self.combine == "average":
            embeddings = embeddings.mean(0, keepdim=True)
        embeddings = embeddings.reshape(1, -1, EMBEDDING_WIDTH).to(ctx.device, ctx.dtype)
        with torch.no_grad():
            positive = adapter.projection(embeddings)
            negative = adapter.projection(torch.zeros_like(embeddings)) if ctx.guided else None
        tokens = Tokens(positive, negative).batched(ctx.batch_size, ctx.guided)

        width, height = ctx.size
        box: tuple[float, float, float, float] = (0, 0, width, height)
        ip_mask = control_mask = None
        if self.mask is not None:
            host = region_mask(self.mask, ctx, device="cpu")
            box = _region_box(host[0].numpy(), self.mask)
            ip_mask = host.to(ctx.device)
            control_mask = ip_mask[:, None].to(ctx.dtype)
        points = place_keypoints(identity.keypoints, identity.image_size, box)
        keypoints = control_tensor(keypoint_image(points, ctx.size), None, {}, ctx, doubled=ctx.guided)

        scales = dict.fromkeys(cross_layers(unet), float(self.scale))
        branch = IPPrepared("instantid", adapter.weights, tokens, scales, ip_mask)
        control = ControlPrepared(
            identitynet, self.controlnet_scale, False, {"controlnet_cond": keypoints}, tokens, control_mask
        )
        return InstantIDPrepared(branch, control, self)


def _check_layout(parts: dict[str, Any], unet: Any, source: Path) -> None:
    """Refuse another method's checkpoint before it is converted: a FaceID or IP-Adapter file would load, and run."""
    family = checkpoint_family(parts)
    if family != "InstantID":
        raise IncompatibleModelError(
            f"{source} holds {family} weights, not InstantID's ip-adapter.bin (whose image_proj is a Resampler "
            f"reading one {EMBEDDING_WIDTH}-d face embedding)"
        )
    width = parts["image_proj"]["proj_out.weight"].shape[0]
    if width != unet.config.cross_attention_dim:
        raise IncompatibleModelError(
            f"{source}: its face tokens are {width}-wide, but this UNet's cross-attention takes "
            f"{unet.config.cross_attention_dim}"
        )


def _region_box(mask: np.ndarray, source: Any) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1) of a binarised (H, W) region mask."""
    ys, xs = np.nonzero(mask > 0.5)
    if xs.size == 0:
        label = f" {source}" if isinstance(source, (str, os.PathLike)) else ""
        raise ConditionError(f"InstantID's region mask{label} is empty: paint the face's region white")
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
