"""ControlNet conditions: SDXL ControlNets (one or several per call) and ControlNet-Union / ProMax.

Each ControlNet runs once per step inside its window and returns residuals; the loop sums the residuals of all
ControlNets and feeds them to the UNet in its single forward pass. Nothing on the UNet is changed. A ControlNet
attends to the prompt unless it is given its own :class:`~sdxl_control.Tokens` (as InstantID's IdentityNet attends to
face tokens), and a region ``mask`` limits its residuals to part of the image.

Example:
    >>> from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
    >>> conditions = [ControlNet("diffusers/controlnet-canny-sdxl-1.0", image=photo, preprocess="canny", scale=0.6,
    ...                          window=(0.0, 0.7)),
    ...               ControlNetUnion("xinsir/controlnet-union-sdxl-1.0", depth=photo, canny=edges,
    ...                               preprocess=("depth",))]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ..base.caches import KeyedCache
from ..base.errors import ConditionError, IncompatibleModelError, MissingWeightsError
from ..engine.devices import placement
from ..preprocessors import ImageInput, preprocess, preprocessor_needs
from ..protocol.conditions import (
    Attachment,
    Condition,
    Crop,
    PrepareContext,
    Prepared,
    Residuals,
    Stage,
    StepInfo,
    Tokens,
)
from ..protocol.fast import match_fast_path
from ..records.infotext import Infotext, control_unit, model_label
from ..weights.checkpoints import check_safetensors
from ..weights.hub import resolve_source
from ..weights.inventory import ModelNeed, weights_need
from ..weights.storage import store_weights, stored_as

__all__ = [
    "ControlNet",
    "ControlNetUnion",
    "UNION_CONTROL_TYPES",
    "load_controlnet",
    "ControlPrepared",
    "controlnet_for",
    "control_tensor",
]

log = logging.getLogger(__name__)

# xinsir's ControlNet-Union control types (index into the model's task embedding); ProMax adds tile and inpaint.
UNION_CONTROL_TYPES: dict[str, int] = {
    "pose": 0,
    "depth": 1,
    "softedge": 2,
    "canny": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "inpaint": 7,
}
# The union's inpaint control made from the call's own start: the image it starts from with the mask's area black
# (ProMax's repaint type, as its authors and diffusers' union inpainting example make it; outpainting: the canvas).
START = "start"
# Which preprocessor makes each union control type's map from a photo.
_UNION_PREPROCESSORS = {"pose": "pose", "depth": "depth", "canny": "canny"}

_LOADED: KeyedCache[Any] = KeyedCache("ControlNets", size=4)
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_REFINER_REASON = "SDXL ControlNets are trained against the base UNet's blocks; the refiner's architecture differs"


def _check_config(config: Mapping[str, Any], unet: Any, source: str) -> None:
    cross = config.get("cross_attention_dim")
    if cross != unet.config.cross_attention_dim:
        hint = " (an SD 1.5 ControlNet)" if cross == 768 else ""
        raise IncompatibleModelError(
            f"{source}: this ControlNet's cross-attention size is {cross}{hint}, but the SDXL UNet expects "
            f"{unet.config.cross_attention_dim}"
        )
    if config.get("addition_embed_type") != "text_time":
        raise IncompatibleModelError(f"{source}: not an SDXL ControlNet (no text_time conditioning)")
    if list(config.get("block_out_channels", [])) != list(unet.config.block_out_channels):
        raise IncompatibleModelError(
            f"{source}: ControlNet blocks {config.get('block_out_channels')} do not match the UNet's "
            f"{list(unet.config.block_out_channels)}"
        )


def load_controlnet(source: str | Path, *, union: bool, unet: Any, device: torch.device | None = None) -> Any:
    """Load (kept in a process cache, see :mod:`sdxl_control.base.caches`) a ControlNet that fits ``unet``: hub id,
    local folder or single file.

    A folder's config is checked against the UNet before any weights are read; every ControlNet returned, cached or
    new, is checked against the UNet it is for.
    """
    from diffusers import ControlNetModel, ControlNetUnionModel

    unet_device, dtype = placement(unet)
    device = device or unet_device  # the call's device: with offloading the UNet may sit in CPU memory now
    storage = stored_as(unet)  # a ControlNet is kept as the UNet it serves: in fp8 for an fp8 UNet
    key = (str(source), union, str(device), str(dtype), storage)

    def build() -> Any:
        cls = ControlNetUnionModel if union else ControlNetModel
        path = resolve_source(source, allow=list(CONTROLNET_FILES))
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.exists():
                raise IncompatibleModelError(f"{path} is not a diffusers ControlNet folder (no config.json)")
            config = json.loads(config_file.read_text())
            is_union = config.get("_class_name") == "ControlNetUnionModel"
            if is_union != union:
                wanted = "ControlNetUnion" if is_union else "ControlNet"
                raise IncompatibleModelError(f"{path} holds a {config.get('_class_name')}: use {wanted} for it")
            _check_config(config, unet, str(source))
            check_safetensors(path / "diffusion_pytorch_model.safetensors")
            model = cls.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        else:
            check_safetensors(path)
            model = None if union else _shaped_like(unet, path, dtype)
            if model is None:
                try:
                    model = cls.from_single_file(str(path), torch_dtype=dtype, local_files_only=True)
                except Exception as exc:
                    raise MissingWeightsError(
                        f"{path}: diffusers could not convert this single-file ControlNet offline ({exc}); use its "
                        "diffusers folder (config.json + diffusion_pytorch_model.safetensors) instead"
                    ) from None
            _check_config(dict(model.config), unet, str(source))  # before it is kept
        model.to(device).eval().requires_grad_(False)
        if storage is not None:
            store_weights(model, storage)
        return model

    model = _LOADED.get(key, build)
    _check_config(dict(model.config), unet, str(source))  # a cached ControlNet may meet another UNet
    return model


def _shaped_like(unet: Any, path: Path, dtype: torch.dtype) -> Any:
    """A single file holding a ControlNet in diffusers' layout and the shape of ``unet``'s encoder (how SDXL's
    published ControlNets are kept as one file: ``diffusers_xl_canny_full.safetensors``), built from the UNet's own
    config without any hub; ``None`` for any other file (left to diffusers' conversion)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        if not any(k.startswith("controlnet_cond_embedding.") for k in f.keys()):
            return None
    with init_empty_weights():
        model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    try:
        model.load_state_dict(load_file(str(path)), strict=True, assign=True)
    except RuntimeError:  # another layout (a "mid" or "small" ControlNet): its own config is needed
        return None
    return model.to(dtype)


def _as_list(images: ImageInput | list[ImageInput] | tuple[ImageInput, ...]) -> list[ImageInput]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def control_tensor(
    images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
    preprocessor: str | None,
    options: Mapping[str, Any],
    ctx: PrepareContext,
    doubled: bool,
) -> torch.Tensor:
    """Control images as the ControlNet takes them: resized as diffusers does, one per image of the batch."""
    maps = [preprocess(preprocessor, image, **options) for image in _as_list(images)]
    if len(maps) not in (1, ctx.batch_size):
        raise ConditionError(f"{len(maps)} control images for a batch of {ctx.batch_size}: give 1 or {ctx.batch_size}")
    width, height = ctx.size
    for control in maps:
        _check_aspect(control, width, height)
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    tensor = processor.preprocess(maps, height=height, width=width).to(torch.float32)
    if len(maps) == 1:
        tensor = tensor.repeat_interleave(ctx.batch_size, dim=0)
    tensor = tensor.to(ctx.device, ctx.dtype)
    return torch.cat([tensor, tensor]) if doubled else tensor


# A control map is stretched to the output's size, as diffusers does; beyond this much out of shape it no longer guides.
MAX_STRETCH = 4.0


def _check_aspect(control: Any, width: int, height: int) -> None:
    if isinstance(control, Image.Image):
        w, h = control.size
    elif isinstance(control, (np.ndarray, torch.Tensor)) and control.ndim >= 2:
        h, w = (control.shape[-3], control.shape[-2]) if control.shape[-1] in (1, 3, 4) else control.shape[-2:]
    else:
        return
    stretch = (w / h) / (width / height)
    stretch = max(stretch, 1 / stretch)
    if stretch > MAX_STRETCH:
        raise ConditionError(
            f"a control image of {w}x{h} for a {width}x{height} output would be stretched {stretch:.1f} times out of "
            f"shape (at most {MAX_STRETCH:g}): crop it to the output's aspect"
        )
    if stretch > 1.01:
        log.warning("control image %dx%d is stretched to the output's %dx%d (another aspect)", w, h, width, height)


@dataclass(frozen=True, eq=False)
class ControlPrepared(Prepared):
    """A ControlNet ready to run: its model, inputs (control image(s), union types), strength, and optionally its own
    batched ``context`` tokens and a region ``mask`` (1, 1, H, W) its residuals are multiplied by.

    Example:
        >>> ControlPrepared(model, 0.8, False, {"controlnet_cond": image}, context=face_tokens)  # doctest: +SKIP
    """

    model: Any
    scale: float
    guess_mode: bool
    inputs: Mapping[str, Any]
    context: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        return _ControlAttachment(self)


class _ControlAttachment(Attachment):
    """Runs a ControlNet at each active step; attaches nothing to the UNet, so detaching has nothing to undo."""

    def __init__(self, ready: ControlPrepared) -> None:
        self.ready = ready
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # the region mask at each residual's size

    def _masked(self, residual: torch.Tensor) -> torch.Tensor:
        assert self.ready.mask is not None
        size = tuple(residual.shape[-2:])
        if size not in self._masks:
            # As InstantID's full pipeline masks IdentityNet: the mask resized (bilinear) to each residual.
            self._masks[size] = F.interpolate(self.ready.mask, size=size, mode="bilinear")
        return residual * self._masks[size]

    def contribute(self, step: StepInfo, active: bool) -> Residuals | None:
        if not active:
            return None
        ready = self.ready
        # Guess mode with guidance: the ControlNet sees only the prompt's rows; the negative prompt's get 0.
        half = ready.guess_mode and step.guided
        sample, added = step.sample, dict(step.added_cond_kwargs)
        hidden = step.encoder_hidden_states if ready.context is None else step.gather(ready.context)
        inputs = dict(ready.inputs)
        image = inputs["controlnet_cond"]  # prepared rows, laid out as the step's
        inputs["controlnet_cond"] = [step.gather(i) for i in image] if isinstance(image, list) else step.gather(image)
        if half:
            keep = step.prompt_rows
            sample, hidden = sample[keep], hidden[keep]
            added = {k: v[keep] for k, v in added.items()}
            image = inputs["controlnet_cond"]
            inputs["controlnet_cond"] = [i[keep] for i in image] if isinstance(image, list) else image[keep]
        control_type = inputs.get("control_type")
        if control_type is not None:
            inputs["control_type"] = control_type.repeat(sample.shape[0], 1)
            scale: float | list[float] = [ready.scale] * len(inputs["control_type_idx"])
        else:
            scale = ready.scale
        down, mid = ready.model(
            sample, step.timestep, encoder_hidden_states=hidden, conditioning_scale=scale, guess_mode=ready.guess_mode,
            added_cond_kwargs=added, return_dict=False, **inputs,
        )  # fmt: skip
        if ready.mask is not None:
            down, mid = [self._masked(d) for d in down], self._masked(mid)
        if half:
            down, mid = [_filled(d, keep) for d in down], _filled(mid, keep)
        return Residuals(tuple(down), mid)

    def detach(self) -> None:
        return None


def _filled(residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``residual`` of the ``rows`` marked, as a residual of every row (0 in the others)."""
    out = residual.new_zeros((rows.shape[0], *residual.shape[1:]))
    out[rows] = residual
    return out


def control_mask(mask: Any, ctx: PrepareContext) -> torch.Tensor:
    """A region mask (white = here) at the output size as (1, 1, H, W) in the call's dtype; binarised as IP-Adapter
    masks are, so both channels of one condition cover the same region."""
    from .ip_adapter import region_mask

    return region_mask(mask, ctx)[:, None].to(ctx.dtype)


def _unit(model: str | Path, preprocessor: str | None, options: Mapping[str, Any], condition: Any) -> dict[str, str]:
    from ..preprocessors import a1111_module

    thresholds = {}
    if preprocessor in ("canny", "edges") and "low" in options:
        thresholds = {"Threshold A": options["low"], "Threshold B": options["high"]}
    return control_unit(a1111_module(preprocessor, options), model_label(model), condition.scale, condition.window,
                        guess_mode=condition.guess_mode, **thresholds)  # fmt: skip


def controlnet_for(ctx: PrepareContext, source: str | Path, union: bool) -> Any:
    """The (cached) ControlNet for the call's base UNet and device, on the call's fast path."""
    unet = ctx.unet(Stage.BASE)
    model = load_controlnet(source, union=union, unet=unet, device=ctx.device)
    match_fast_path(model, ctx.fast)
    return model


@dataclass(frozen=True)
class ControlNet(Condition):
    """One SDXL ControlNet with its control image(s).

    ``image`` is a photo to run ``preprocess`` on (``"canny"``, ``"depth"``, ``"pose"``, ``"face"``), or a ready
    control map when ``preprocess`` is ``None``; give one image, or one per image of the batch. ``guess_mode`` lets
    the ControlNet work without the prompt (its residuals scaled from 0.1 at the input to 1.0 at the middle block).
    ``context`` gives it its own :class:`~sdxl_control.Tokens` to attend to instead of the prompt; ``mask``
    (white = here) limits its effect to a region.

    Example:
        >>> ControlNet("diffusers/controlnet-canny-sdxl-1.0", image="photo.jpg", preprocess="canny", scale=0.6)
        ControlNet(scale=0.6, ...)  # doctest: +SKIP
    """

    model: str | Path
    image: Any
    preprocess: str | None = None
    preprocess_options: Mapping[str, Any] = field(default_factory=dict)
    guess_mode: bool = False
    context: Tokens | None = None
    mask: Any = None

    kind: ClassVar[str] = "controlnet"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = _REFINER_REASON
    path_fields: ClassVar[tuple[str, ...]] = ("model", "image", "mask", "preprocess_options")
    model_fields: ClassVar[Mapping[str, str]] = {"model": "controlnet"}
    aligned_fields: ClassVar[tuple[str, ...]] = ("image", "mask")

    def infotext(self) -> Infotext:
        return Infotext(units=(_unit(self.model, self.preprocess, self.preprocess_options, self),))

    def model_needs(self) -> tuple[ModelNeed, ...]:
        needed = preprocessor_needs(self.preprocess, self.preprocess_options)
        return (weights_need("ControlNet", self.model, CONTROLNET_FILES), *needed)

    def prepare(self, ctx: PrepareContext) -> Prepared:
        model = controlnet_for(ctx, self.model, union=False)
        guess = self.guess_mode or bool(getattr(model.config, "global_pool_conditions", False))
        image = control_tensor(self.image, self.preprocess, self.preprocess_options, ctx, ctx.guided)
        context = None
        if self.context is not None:
            if self.context.positive.shape[-1] != model.config.cross_attention_dim:
                raise ConditionError(
                    f"{self.model} attends to {model.config.cross_attention_dim}-wide tokens; context tokens are "
                    f"{self.context.positive.shape[-1]} wide"
                )
            context = self.context.batched(ctx.batch_size, ctx.guided).to(ctx.device, ctx.dtype)
        mask = control_mask(self.mask, ctx) if self.mask is not None else None
        return ControlPrepared(model, self.scale, guess, {"controlnet_cond": image}, context, mask)


def _masked_start(ctx: PrepareContext) -> Image.Image:
    if ctx.start_image is None or ctx.start_mask is None:
        raise ConditionError(
            f"ControlNetUnion inpaint={START!r} is the inpainting's own image with its mask's area black: give the "
            "call an init image with a mask, or outpaint"
        )
    pixels = np.array(ctx.start_image.convert("RGB"))
    pixels[np.asarray(ctx.start_mask.convert("L")) > 0] = 0
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class ControlNetUnion(Condition):
    """One ControlNet-Union (or ProMax) model driven by several control types at once.

    Each control type takes a ready map, or a photo when its name is listed in ``preprocess`` (pose, depth and
    canny have preprocessors; ``preprocess_options`` passes each its options). Types map to the model's task
    indices by :data:`UNION_CONTROL_TYPES`. ``inpaint="start"`` (ProMax) is the image an inpainting or outpainting
    call starts from, with its mask's area black.

    Example:
        >>> ControlNetUnion("xinsir/controlnet-union-sdxl-1.0", depth=photo, canny=edges, preprocess=("depth",))
        ControlNetUnion(...)  # doctest: +SKIP
    """

    model: str | Path
    pose: Any = None
    depth: Any = None
    softedge: Any = None
    canny: Any = None
    normal: Any = None
    segment: Any = None
    tile: Any = None
    inpaint: Any = None
    preprocess: tuple[str, ...] = ()
    preprocess_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    guess_mode: bool = False

    kind: ClassVar[str] = "controlnet-union"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = _REFINER_REASON
    path_fields: ClassVar[tuple[str, ...]] = ("model", *UNION_CONTROL_TYPES, "preprocess_options")
    model_fields: ClassVar[Mapping[str, str]] = {"model": "controlnet"}
    aligned_fields: ClassVar[tuple[str, ...]] = tuple(UNION_CONTROL_TYPES)

    def infotext(self) -> Infotext:
        # The extension drives a union model with one unit per control type, each naming its preprocessor.
        units = []
        for name in self.controls():
            preprocessor = _UNION_PREPROCESSORS[name] if name in self.preprocess else None
            units.append(_unit(self.model, preprocessor, self.preprocess_options.get(name, {}), self))
        return Infotext(units=tuple(units))

    def model_needs(self) -> tuple[ModelNeed, ...]:
        needed = [weights_need("ControlNet-Union", self.model, CONTROLNET_FILES)]
        for name in self.preprocess:
            needed += preprocessor_needs(_UNION_PREPROCESSORS.get(name), self.preprocess_options.get(name, {}))
        return tuple(needed)

    def controls(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in UNION_CONTROL_TYPES if getattr(self, name) is not None}

    def in_crop(self, crop: Crop) -> ControlNetUnion:
        # A crop's repaint starts from the crop itself: "start" stays.
        cut = {name: crop.image(v) for name, v in self.controls().items() if not (isinstance(v, str) and v == START)}
        return replace(self, **cut)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "preprocess", tuple(self.preprocess))
        if not self.controls():
            raise ConditionError(f"ControlNetUnion needs at least one control image ({', '.join(UNION_CONTROL_TYPES)})")
        for name in self.preprocess:
            if name not in _UNION_PREPROCESSORS:
                raise ConditionError(
                    f"no preprocessor for union control {name!r}: one of {sorted(_UNION_PREPROCESSORS)}"
                )
            if name not in self.controls():
                raise ConditionError(f"preprocess names {name!r} but no {name}= image was given")

    def prepare(self, ctx: PrepareContext) -> Prepared:
        model = controlnet_for(ctx, self.model, union=True)
        n_types = model.config.num_control_type
        modes = []
        images = []
        for name, image in self.controls().items():
            index = UNION_CONTROL_TYPES[name]
            if index >= n_types:
                raise ConditionError(f"{self.model} knows {n_types} control types; {name!r} needs a ProMax model")
            modes.append(index)
            preprocessor = _UNION_PREPROCESSORS[name] if name in self.preprocess else None
            options = self.preprocess_options.get(name, {}) if preprocessor else {}
            if name == "inpaint" and isinstance(image, str) and image == START:
                image = _masked_start(ctx)
            images.append(control_tensor(image, preprocessor, options, ctx, ctx.guided))
        control_type = torch.zeros(n_types).scatter_(0, torch.tensor(modes), 1).reshape(1, -1).to(ctx.device, ctx.dtype)
        inputs = {"controlnet_cond": images, "control_type": control_type, "control_type_idx": modes}
        return ControlPrepared(model, self.scale, self.guess_mode, inputs)


def union_from_slots(
    cls: type[ControlNetUnion], values: Mapping[str, Any], joined: Mapping[str, tuple[str, list[Any], dict[str, Any]]]
) -> list[ControlNetUnion]:
    """The ``union`` input slot's condition (:mod:`sdxl_control.jobs.slots`): one ControlNet-Union driven by the
    structure slots it takes, ``joined`` (slot -> (control type, files, options)); their photos are preprocessed for
    their type, a ready map (``SLOT.map``) is not. The union's own model, scale and window apply to all of them."""
    if not joined:
        raise ConditionError("it drives the structure inputs through one model: give at least one of them")
    images: dict[str, Any] = {}
    preprocess = []
    for name, (control_type, files, options) in joined.items():
        if set(options) - {"map"}:
            given = ", ".join(f"{name}.{option}" for option in sorted(set(options) - {"map"}))
            raise ConditionError(f"{given}: with the union on, its own options apply (union.model, union.scale, ...)")
        if not isinstance(options.get("map", False), bool):
            raise ConditionError(f"{name}.map is true or false, got {options['map']!r}")
        images[control_type] = files[0]
        if not options.get("map"):
            preprocess.append(control_type)
    return [cls(**{**values, "preprocess": tuple(preprocess), **images})]
