"""Extensions' fields as A1111's clients send them: ``alwayson_scripts`` entries (the ControlNet extension's units,
ADetailer's args, and sdxl-control's own entry) made conditions and settings of the job; the ControlNet extension's
``/controlnet/...`` routes.

Everything a request asks of an extension is honoured, refused with a 422 naming the field
(``alwayson_scripts.ControlNet.args[0].module``), or, where A1111 itself would pass over it, listed in ``info``'s
notes; nothing is dropped silently. Models are chosen only by the names the server lists (its catalogue's
``controlnet`` and ``ipadapter`` files, and the published models under their A1111 file names): no path in a request
reaches the file system. The conditions are the same values the command line and job files build for the same inputs
(``module: canny, weight: 0.6`` is the ``edges`` input with ``edges.scale`` 0.6).

Example:
    >>> from sdxl_control.serve.app import Limits
    >>> alwayson_scripts({"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}}, Limits()).settings
    {'detailer': {'strength': 0.4, 'confidence': 0.3, 'dilation': 4, 'blur': 4, 'padding': 32}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError, SdxlControlError

if TYPE_CHECKING:
    from fastapi import APIRouter
    from PIL import Image

    from ..protocol.conditions import Condition
    from .app import Limits, ServerState
    from .catalogue import Catalogue

__all__ = ["Scripted", "alwayson_scripts", "router", "MODULES", "published_model_names"]


@dataclass(frozen=True)
class Scripted:
    """What a request's ``alwayson_scripts`` add to its job: conditions, request settings, and the notes for what is
    not done (listed in ``info``)."""

    conditions: tuple[Condition, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# The ControlNet extension's modules (preprocessors) this server runs: module -> (our preprocessor, its options, the
# structure input slot whose ControlNet reads its maps). depth_midas is our depth estimator's own model (MiDaS
# DPT-Hybrid, Intel/dpt-hybrid-midas); the extension's other depth estimators and its lineart, softedge, tile ...
# have no counterpart here and are refused rather than run by another model.
STRUCTURE_MODULES: dict[str, tuple[str | None, dict[str, Any], str | None]] = {
    "none": (None, {}, None),
    "canny": ("canny", {}, "edges"),
    "depth_midas": ("depth", {}, "depth"),
    "depth": ("depth", {}, "depth"),  # the extension's old name for depth_midas
    "openpose": ("pose", {}, "pose"),
    "openpose_hand": ("pose", {"hands": True}, "pose"),
    "openpose_face": ("pose", {"face": True}, "pose"),
    "openpose_full": ("pose", {"hands": True, "face": True}, "pose"),
}
# IP-Adapter modules: the image encoder each one runs (bigG for ip-adapter_sdxl, ViT-H for the others published).
IP_MODULES = {
    "ip-adapter_clip_sdxl": "bigG",
    "ip-adapter_clip_g": "bigG",
    "ip-adapter_clip_sdxl_plus_vith": "ViT-H",
    "ip-adapter_clip_h": "ViT-H",
    "ip-adapter-auto": None,
}
FACEID_MODULES = {"ip-adapter_face_id": "faceid", "ip-adapter_face_id_plus": "plusv2"}
PULID_MODULE = "ip-adapter_pulid"
INSTANTID_MODULES = ("instant_id_face_embedding", "instant_id_face_keypoints")
MODULES: tuple[str, ...] = (*STRUCTURE_MODULES, *IP_MODULES, *FACEID_MODULES, PULID_MODULE, *INSTANTID_MODULES)

# The published models under the names A1111's ControlNet extension lists them by (their files' stems).
_IP_VARIANT_NAMES = {
    "ip-adapter_sdxl": "sdxl",
    "ip-adapter_sdxl_vit-h": "vit-h",
    "ip-adapter-plus_sdxl_vit-h": "plus",
    "ip-adapter-plus-face_sdxl_vit-h": "plus-face",
}
_FACEID_NAMES = {"ip-adapter-faceid_sdxl": "faceid", "ip-adapter-faceid-plusv2_sdxl": "plusv2"}
_INSTANTID_NAMES = {"instant_id_face_embedding": "ip-adapter_instant_id_sdxl",
                    "instant_id_face_keypoints": "control_instant_id_sdxl"}  # fmt: skip
_PULID_NAME = "ip-adapter_pulid_sdxl_fp16"  # PuLID v1's weights, as the extension ships them
_CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
}
# The extension's default preprocessor resolution and canny thresholds (its sliders' values).
DEFAULT_PROCESSOR_RES = 512
CANNY_DEFAULTS = (100, 200)
# Unit fields the extension's UI or batch modes use, which change nothing in an API call's images.
_UI_FIELDS = {
    "low_vram", "lowvram", "is_ui", "input_mode", "batch_images", "batch_input_gallery", "batch_mask_gallery",
    "batch_mask_dir", "batch_image_dir", "batch_modifiers", "output_dir", "loopback", "animatediff_batch",
    "generated_image", "use_preview_as_input", "inpaint_crop_input_image", "guessmode", "save_detected_map",
}  # fmt: skip
_UNIT_FIELDS = {
    "enabled", "module", "model", "weight", "image", "mask", "mask_image", "input_image", "resize_mode",
    "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end", "guidance", "pixel_perfect",
    "control_mode", "hr_option", "advanced_weighting", "effective_region_mask", "pulid_mode", "union_control_type",
    "ipadapter_input",
}  # fmt: skip


def published_model_names() -> dict[str, str]:
    """The published models a unit may name, by the names A1111 users know them by (their files' stems), with the
    hub id or variant each is here."""
    from ..base.defaults import STRUCTURE_CONTROLS

    names = {control.model.rpartition("/")[2]: control.model for control in STRUCTURE_CONTROLS.values()}
    names.update(_IP_VARIANT_NAMES)
    names.update(_FACEID_NAMES)
    names.update({name: name for name in _INSTANTID_NAMES.values()})
    names[_PULID_NAME] = _PULID_NAME
    return names


def alwayson_scripts(
    scripts: Mapping[str, Any],
    limits: Limits,
    *,
    catalogue: Catalogue | None = None,
    size: tuple[int, int] | None = None,
    init_image: Image.Image | None = None,
    img2img: bool = False,
) -> Scripted:
    """The conditions and settings ``scripts`` (A1111's ``alwayson_scripts``: title -> {"args": [...]}) ask for.

    ``catalogue``: the server's models, by which a unit's ``model`` is found (none: the published names only);
    ``size``: the (width, height) asked for, to which a unit's image is fitted by its ``resize_mode``;
    ``init_image``: img2img's image, a unit's image where it gives none; ``img2img``: ADetailer's skip-img2img applies.
    Titles are matched without regard to case, as A1111 matches them."""
    if not isinstance(scripts, Mapping):
        raise InvalidRequestError('alwayson_scripts: an object of script title -> {"args": [...]}')
    context = _Context(limits, catalogue, size, init_image, img2img)
    conditions: list[Condition] = []
    settings: dict[str, Any] = {}
    for title, entry in scripts.items():
        where = f"alwayson_scripts.{title}"
        args = _args(entry, where)
        key = str(title).casefold()
        if key == "controlnet":
            conditions += _controlnet(args, where, context)
        elif key == "adetailer":
            settings.update(_adetailer(args, where, context))
        elif key == "sdxl-control":
            conditions += _own(args, where, context)
        elif not args or args == [False]:  # a client saying the script is off (webuiapi sends {"args": [False]})
            context.notes.append(f"{where}: not a script this server runs; its args ask for nothing, so not read")
        else:
            raise InvalidRequestError(
                f"{where}: always on script {title!r} not found (this server runs ControlNet, ADetailer and "
                "sdxl-control; A1111 answers the same 422 for a script it lacks)"
            )
    return Scripted(tuple(conditions), settings, tuple(context.notes))


@dataclass
class _Context:
    limits: Limits
    catalogue: Catalogue | None
    size: tuple[int, int] | None
    init_image: Image.Image | None
    img2img: bool
    notes: list[str] = field(default_factory=list)


def _args(entry: Any, where: str) -> list[Any]:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("args", []), (list, tuple)):
        raise InvalidRequestError(f'{where}: an object {{"args": [...]}} as A1111 takes it, got {entry!r:.80}')
    return list(entry.get("args", []))


# -- the ControlNet extension's units ---------------------------------------------------------------------------------


def _controlnet(args: list[Any], where: str, context: _Context) -> list[Condition]:
    conditions: list[Condition] = []
    pairs: dict[str, list[tuple[str, Mapping[str, Any], Image.Image]]] = {name: [] for name in INSTANTID_MODULES}
    for index, raw in enumerate(args):
        at = f"{where}.args[{index}]"
        if not isinstance(raw, Mapping):
            raise InvalidRequestError(f"{at}: a unit is an object of the extension's fields, got {raw!r:.60}")
        unit = _legacy_aliases(raw, at)
        enabled = unit.get("enabled", True)
        if not isinstance(enabled, bool):
            raise InvalidRequestError(f"{at}.enabled: true or false, got {enabled!r}")
        if not enabled:
            continue  # as the extension: a disabled unit is passed over
        _unit_notes(unit, at, context)
        module = unit.get("module", "none")
        if not isinstance(module, str) or module not in MODULES:
            raise InvalidRequestError(
                f"{at}.module: {module!r} is not a module this server runs; it runs {', '.join(MODULES)} "
                "(GET /controlnet/module_list)"
            )
        if module in INSTANTID_MODULES:
            pairs[module].append((at, unit, _unit_image(unit, at, context)))
        elif module in STRUCTURE_MODULES:
            conditions.append(_structure_unit(unit, module, at, context))
        else:
            conditions.append(_adapter_unit(unit, module, at, context))
    conditions += _instantid(pairs, where)
    return conditions


def _legacy_aliases(unit: Mapping[str, Any], at: str) -> dict[str, Any]:
    """The extension's legacy names (guidance, lowvram, input_image, mask_image) read as its current ones."""
    out = dict(unit)
    for old, new in (("guidance", "guidance_end"), ("lowvram", "low_vram"), ("input_image", "image"),
                     ("mask_image", "mask")):  # fmt: skip
        if old in out:
            if new in out and out[new] not in (None, "") and out[old] not in (None, ""):
                raise InvalidRequestError(f"{at}: {old} and {new} are the same field; give one")
            value = out.pop(old)
            out.setdefault(new, value)
            if out[new] in (None, ""):
                out[new] = value
    return out


def _unit_notes(unit: Mapping[str, Any], at: str, context: _Context) -> None:
    """Fields refused (they would change the images and are not done here) or noted (the extension's UI fields)."""
    unknown = sorted(set(unit) - _UNIT_FIELDS - _UI_FIELDS)
    if unknown:
        context.notes.append(f"{at}: {', '.join(unknown)}: not fields of the ControlNet extension's units; not read")
    if unit.get("advanced_weighting") not in (None, []):
        raise InvalidRequestError(f"{at}.advanced_weighting: per-layer weights are not supported here; leave it null")
    if unit.get("union_control_type") not in (None, "", "Unknown"):
        raise InvalidRequestError(
            f"{at}.union_control_type: ControlNet-Union through a unit is not supported here; use the union input "
            "of a job file"
        )
    if unit.get("ipadapter_input") not in (None, []):
        raise InvalidRequestError(
            f"{at}.ipadapter_input: pickled tensors are not read (unsafe); send the reference image as image"
        )
    hr_option = unit.get("hr_option", "Both")
    if hr_option not in ("Both", None):
        context.notes.append(f"{at}.hr_option: {hr_option!r} not applied; the unit acts where its condition acts")
    module = unit.get("module", "none")
    if unit.get("save_detected_map", True) is not False and module in STRUCTURE_MODULES and module != "none":
        context.notes.append(f"{at}.save_detected_map: the detected map is not appended to the images")


def _number(unit: Mapping[str, Any], name: str, default: float, at: str, low: float, high: float) -> float:
    value = unit.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{at}.{name}: a number, got {value!r:.40}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{at}.{name}: {value} is outside {low:g}..{high:g}, as the extension takes it")
    return float(value)


def _window(unit: Mapping[str, Any], at: str) -> Any:
    from ..protocol.conditions import Window

    start = _number(unit, "guidance_start", 0.0, at, 0.0, 1.0)
    end = _number(unit, "guidance_end", 1.0, at, 0.0, 1.0)
    if start > end:
        raise InvalidRequestError(f"{at}.guidance_start: {start} is after guidance_end {end}")
    return Window(start, end)


def _choice(unit: Mapping[str, Any], name: str, choices: Sequence[str], default: str, at: str) -> str:
    """A mode given as the extension's string or as the index old clients send (0, 1, 2)."""
    value = unit.get(name, default)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        value = _RESIZE_ALIASES.get(value, value)
        if value in choices:
            return value
    raise InvalidRequestError(f"{at}.{name}: one of {', '.join(map(repr, choices))} (or 0..{len(choices) - 1}), "
                              f"got {value!r:.40}")  # fmt: skip


def _image_and_mask(unit: Mapping[str, Any], at: str) -> tuple[Any, Any, str]:
    """(image, mask, the field the image came from): a string, {"image", "mask"}, or [image, mask]."""
    image, mask = unit.get("image"), unit.get("mask")
    if isinstance(image, Mapping):
        unknown = set(image) - {"image", "mask"}
        if unknown:
            raise InvalidRequestError(f"{at}.image: an object with image and mask, got {sorted(unknown)}")
        return image.get("image"), image.get("mask") or mask, f"{at}.image.image"
    if isinstance(image, (list, tuple)):
        if len(image) == 2 and all(isinstance(v, str) or v is None for v in image):
            return image[0], image[1] or mask, f"{at}.image[0]"
        raise InvalidRequestError(
            f'{at}.image: one image (base64), {{"image", "mask"}} or [image, mask]; several inputs per unit are '
            "not supported here: give one unit per image"
        )
    return image, mask, f"{at}.image"


def _unit_image(unit: Mapping[str, Any], at: str, context: _Context) -> Image.Image:
    from .app import decode_image

    image, mask, where = _image_and_mask(unit, at)
    if mask not in (None, ""):
        context.notes.append(f"{at}.mask: a unit's mask is read by the extension's inpaint modules only; not used")
    if image in (None, ""):
        if context.init_image is not None:
            return context.init_image  # as the extension: img2img's image where the unit gives none
        raise InvalidRequestError(f"{where}: the unit gives no image, and txt2img has no init image to use")
    return decode_image(image, where, context.limits)


def _region(unit: Mapping[str, Any], at: str, context: _Context) -> Any:
    from .app import decode_image

    value = unit.get("effective_region_mask")
    if value in (None, ""):
        return None
    return decode_image(value, f"{at}.effective_region_mask", context.limits).convert("L")


def _structure_unit(unit: Mapping[str, Any], module: str, at: str, context: _Context) -> Condition:
    from ..adapters import condition_class
    from ..jobs.slots import slot_defaults

    preprocessor, options, slot = STRUCTURE_MODULES[module]
    control_mode = _choice(unit, "control_mode", _CONTROL_MODES, "Balanced", at)
    if control_mode == "My prompt is more important":
        raise InvalidRequestError(
            f"{at}.control_mode: {control_mode!r} is not supported here; 'Balanced' or 'ControlNet is more important' "
            "(the ControlNet without the prompt, guess mode)"
        )
    resize_mode = _choice(unit, "resize_mode", _RESIZE_MODES, "Crop and Resize", at)
    image = _unit_image(unit, at, context)
    image = _fitted(image, resize_mode, module, at, context)
    options = dict(options)
    if preprocessor is not None:
        image = _at_processor_res(image, unit, resize_mode, at, context)
    if preprocessor == "canny":
        low = _number(unit, "threshold_a", -1, at, -1, 255)
        high = _number(unit, "threshold_b", -1, at, -1, 255)
        options["low"] = int(low) if low >= 1 else CANNY_DEFAULTS[0]
        options["high"] = int(high) if high >= 1 else CANNY_DEFAULTS[1]
    model = _controlnet_model(unit.get("model"), slot, module, at, context)
    values = {key: value for key, value in slot_defaults(slot).items() if key != "map"} if slot else {}
    values.update(
        model=model, image=image, preprocess=preprocessor, preprocess_options=options,
        scale=_number(unit, "weight", 1.0, at, 0.0, 2.0), window=_window(unit, at),
        guess_mode=control_mode == "ControlNet is more important", mask=_region(unit, at, context),
    )  # fmt: skip
    return _built(condition_class("controlnet"), values, at)


def _built(cls: Any, values: Mapping[str, Any], at: str) -> Condition:
    try:
        condition: Condition = cls(**values)
    except SdxlControlError as exc:
        raise InvalidRequestError(f"{at}: {exc}") from None
    return condition


def _fitted(image: Image.Image, resize_mode: str, module: str, at: str, context: _Context) -> Image.Image:
    """The unit's image at the aspect of the size asked for, as its ``resize_mode`` fits it: our ControlNets stretch
    their map to the output's size (the extension's "Just Resize"), so "Crop and Resize" crops the middle of the
    image to the output's aspect and "Resize and Fill" pads it (the extension pads the map; a photo padded before its
    map is made may show an edge at the border, which is noted)."""
    from PIL import Image

    if context.size is None or resize_mode == "Just Resize":
        return image
    width, height = context.size
    w, h = image.size
    if abs((w / h) / (width / height) - 1) < 0.01:
        return image  # the output's aspect already
    if resize_mode == "Crop and Resize":
        from PIL import ImageOps

        scale = max(width / w, height / h)
        crop = (round(width / scale), round(height / scale))
        return ImageOps.fit(image, crop, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    scale = min(width / w, height / h)
    canvas_size = (max(w, round(width / scale)), max(h, round(height / scale)))
    canvas = Image.new(image.mode, canvas_size, 0)
    canvas.paste(image, ((canvas_size[0] - w) // 2, (canvas_size[1] - h) // 2))
    if module != "none":
        context.notes.append(f"{at}.resize_mode: 'Resize and Fill' padded the photo before its map was made")
    return canvas


def _at_processor_res(
    image: Image.Image, unit: Mapping[str, Any], resize_mode: str, at: str, context: _Context
) -> Image.Image:
    """The photo resized so its short side is the preprocessor resolution, as the extension resizes it before its
    preprocessor runs (``-1``: the extension's default, 512; ``pixel_perfect``: the resolution that maps the photo
    onto the output's pixels, as the extension estimates it)."""
    from PIL import Image

    pixel_perfect = unit.get("pixel_perfect", False)
    if not isinstance(pixel_perfect, bool):
        raise InvalidRequestError(f"{at}.pixel_perfect: true or false, got {pixel_perfect!r}")
    w, h = image.size
    if pixel_perfect and context.size is not None:
        width, height = context.size
        k = (min if resize_mode == "Resize and Fill" else max)(height / h, width / w)
        resolution = round(k * min(w, h))
    else:
        given = _number(unit, "processor_res", -1, at, -1, 8192)
        # As the extension: a value outside its slider's range (64..2048) is its default.
        resolution = int(given) if 64 <= given <= 2048 else DEFAULT_PROCESSOR_RES
    if resolution == min(w, h):
        return image
    k = resolution / min(w, h)
    new = (max(1, round(w * k)), max(1, round(h * k)))
    context.limits.check_size(*new, f"{at}.processor_res")
    # The extension's annotators resize with INTER_AREA down and INTER_CUBIC up; PIL's BOX and BICUBIC are those.
    method = Image.Resampling.BOX if k < 1 else Image.Resampling.BICUBIC
    return image.resize(new, method)


def _bare_name(name: str) -> str:
    """A model name as the extension lists it (``name [hash]``), without its hash and file extension."""
    text = name.strip()
    if text.endswith("]") and " [" in text:
        text = text[: text.rindex(" [")]
    if PurePath(text).suffix in (".safetensors", ".bin", ".pth", ".pt", ".ckpt"):
        text = text[: -len(PurePath(text).suffix)]
    return text


def _refuse_path(name: str, at: str) -> None:
    if "/" in name or "\\" in name or name.startswith((".", "~")) or ":" in name:
        raise InvalidRequestError(
            f"{at}.model: {name!r} looks like a path or hub id; a server takes only the model names it lists "
            "(GET /controlnet/model_list)"
        )


def _listed(kinds: Sequence[str], name: str, context: _Context) -> str | None:
    """The source of the catalogue's model of one of ``kinds`` named ``name`` (title, name or file name)."""
    if context.catalogue is None:
        return None
    for kind in kinds:
        for entry in context.catalogue.listed(kind):
            names = {entry.title, entry.name, _bare_name(entry.title)}
            if entry.file is not None:
                names.add(entry.file.name)
            if name.strip() in names or _bare_name(name) in names:
                return entry.source
    return None


def _controlnet_model(value: Any, slot: str | None, module: str, at: str, context: _Context) -> str:
    """A ControlNet by the name a unit gives: a catalogue file, or a published one; "None" is the module's default."""
    from ..base.defaults import STRUCTURE_CONTROLS

    if value in (None, "", "None", "none"):
        if slot is None:
            raise InvalidRequestError(f"{at}.model: module 'none' (a ready map) needs the ControlNet that reads it")
        default = STRUCTURE_CONTROLS[slot].model
        context.notes.append(f"{at}.model: none given; {default} (the {module} ControlNet) runs")
        return default
    if not isinstance(value, str):
        raise InvalidRequestError(f"{at}.model: a model name, got {value!r:.40}")
    found = _listed(("controlnet",), value, context)
    if found is not None:
        return found
    _refuse_path(value, at)
    published = {c.model.rpartition("/")[2]: c.model for c in STRUCTURE_CONTROLS.values()}
    if _bare_name(value) in published:
        return published[_bare_name(value)]
    offered = [*(e.title for e in (context.catalogue.listed("controlnet") if context.catalogue else [])), *published]
    raise InvalidRequestError(
        f"{at}.model: {value!r} is not a ControlNet this server offers; it offers {', '.join(offered)} "
        "(GET /controlnet/model_list)"
    )


def _adapter_model(value: Any, names: Mapping[str, str], what: str, at: str) -> str:
    """The published adapter (variant) a unit's model names, by its file's stem, listed or not in the catalogue."""
    if not isinstance(value, str) or value in ("", "None", "none"):
        raise InvalidRequestError(f"{at}.model: the {what} model to run, one of {', '.join(names)}")
    _refuse_path(value, at)
    bare = _bare_name(value)
    if bare in names:
        return names[bare]
    raise InvalidRequestError(
        f"{at}.model: {value!r} is not a {what} model this server runs; one of {', '.join(names)}"
    )


def _adapter_unit(unit: Mapping[str, Any], module: str, at: str, context: _Context) -> Condition:
    from ..adapters import condition_class

    _choice(unit, "control_mode", _CONTROL_MODES, "Balanced", at)  # validated; the extension ignores it for these
    if unit.get("control_mode") not in (None, 0, "Balanced"):
        context.notes.append(f"{at}.control_mode: an IP-Adapter unit's control mode changes nothing; not read")
    image = _unit_image(unit, at, context)
    common = {"scale": _number(unit, "weight", 1.0, at, 0.0, 2.0), "window": _window(unit, at),
              "mask": _region(unit, at, context)}  # fmt: skip
    if module in IP_MODULES:
        variant = _adapter_model(unit.get("model"), _IP_VARIANT_NAMES, "IP-Adapter", at)
        encoder = "bigG" if variant == "sdxl" else "ViT-H"
        if IP_MODULES[module] not in (None, encoder):
            raise InvalidRequestError(
                f"{at}.module: {module!r} runs the {IP_MODULES[module]} image encoder; {unit.get('model')!r} takes "
                f"{encoder} features (ip-adapter_clip_sdxl for ip-adapter_sdxl, ip-adapter_clip_sdxl_plus_vith for "
                "the ViT-H ones)"
            )
        return _built(condition_class("ip-adapter"), {"variant": variant, "images": [image], **common}, at)
    if module in FACEID_MODULES:
        variant = _adapter_model(unit.get("model"), _FACEID_NAMES, "IP-Adapter FaceID", at)
        if FACEID_MODULES[module] != variant:
            raise InvalidRequestError(
                f"{at}.module: {module!r} prepares faces for {FACEID_MODULES[module]}; the model is {variant} "
                "(ip-adapter_face_id for ip-adapter-faceid_sdxl, ip-adapter_face_id_plus for -plusv2)"
            )
        return _built(condition_class("faceid"), {"variant": variant, "faces": [image], **common}, at)
    _adapter_model(unit.get("model"), {_PULID_NAME: _PULID_NAME}, "PuLID", at)
    mode = unit.get("pulid_mode", "Fidelity")
    modes = {"Fidelity": "fidelity", "Extremely style": "style"}
    if mode not in modes:
        raise InvalidRequestError(f"{at}.pulid_mode: 'Fidelity' or 'Extremely style', got {mode!r:.40}")
    values = {"faces": [image], "version": "v1", "mode": modes[mode], **common}
    return _built(condition_class("pulid"), values, at)


def _instantid(pairs: Mapping[str, list[tuple[str, Mapping[str, Any], Any]]], where: str) -> list[Condition]:
    """InstantID from its two units, paired in order: the face embedding's (its image the face, its weight the
    adapter's) and the keypoints' (its image the pose, its weight IdentityNet's)."""
    from ..adapters import condition_class

    embeddings, keypoints = pairs["instant_id_face_embedding"], pairs["instant_id_face_keypoints"]
    if len(embeddings) != len(keypoints):
        at = (embeddings or keypoints)[-1][0]
        raise InvalidRequestError(
            f"{at}.module: InstantID takes two units, instant_id_face_embedding and instant_id_face_keypoints; "
            f"{where} has {len(embeddings)} and {len(keypoints)}"
        )
    out = []
    for (at, unit, face), (at_kp, unit_kp, pose) in zip(embeddings, keypoints, strict=True):
        for a, u, module in ((at, unit, INSTANTID_MODULES[0]), (at_kp, unit_kp, INSTANTID_MODULES[1])):
            name = _INSTANTID_NAMES[module]
            if u.get("model") not in (None, "", "None"):
                _adapter_model(u.get("model"), {name: name}, f"{module}'s", a)
        values = {
            "faces": [face], "keypoints_from": pose, "scale": _number(unit, "weight", 1.0, at, 0.0, 2.0),
            "window": _window(unit, at), "controlnet_scale": _number(unit_kp, "weight", 1.0, at_kp, 0.0, 2.0),
            "controlnet_window": _window(unit_kp, at_kp),
        }  # fmt: skip
        out.append(_built(condition_class("instantid"), values, at))
    return out


# -- ADetailer ----------------------------------------------------------------------------------------------------

# ADetailer's fields (25.3.0, adetailer/args.py ADetailerArgs) read here: ours, and those honoured only at their
# defaults (a value that asks for something else is refused naming it); fields that only matter when their
# ad_use_* switch is on, or that name no behaviour, are passed over as ADetailer passes over them.
_AD_OURS = {"ad_denoising_strength": "strength", "ad_confidence": "confidence", "ad_dilate_erode": "dilation",
            "ad_mask_blur": "blur", "ad_inpaint_only_masked_padding": "padding"}  # fmt: skip
_AD_AT_DEFAULT: dict[str, Any] = {
    "ad_model_classes": "", "ad_prompt": "", "ad_negative_prompt": "", "ad_mask_k": 0, "ad_mask_k_largest": 0,
    "ad_mask_min_ratio": 0.0, "ad_mask_max_ratio": 1.0, "ad_x_offset": 0, "ad_y_offset": 0,
    "ad_mask_merge_invert": "None", "ad_inpaint_only_masked": True, "ad_use_inpaint_width_height": False,
    "ad_use_cfg_scale": False, "ad_use_checkpoint": False, "ad_use_vae": False, "ad_use_sampler": False,
    "ad_use_noise_multiplier": False, "ad_use_clip_skip": False, "ad_restore_face": False,
    "ad_controlnet_model": "None",
}  # fmt: skip
_AD_PASSED_OVER = {
    "ad_tab_enable", "ad_model", "ad_use_steps", "ad_steps", "ad_inpaint_width", "ad_inpaint_height", "ad_cfg_scale",
    "ad_checkpoint", "ad_vae", "ad_sampler", "ad_scheduler", "ad_noise_multiplier", "ad_clip_skip",
    "ad_controlnet_module", "ad_controlnet_weight", "ad_controlnet_guidance_start", "ad_controlnet_guidance_end",
    "ad_mask_filter_method", "is_api",
}  # fmt: skip
# ADetailer's face detectors; ours (insightface, the detailer's own) finds the faces instead.
AD_FACE_MODELS = ("face_yolov8n.pt", "face_yolov8s.pt", "face_yolov8m.pt", "face_yolov9c.pt", "mediapipe_face_full",
                  "mediapipe_face_short", "mediapipe_face_mesh")  # fmt: skip


def _adetailer(args: list[Any], where: str, context: _Context) -> dict[str, Any]:
    """ADetailer's args (``[ad_enable, skip_img2img?, {tab}, ...]``: one or two leading booleans, webuiapi sends
    one, SillyTavern two) as the face detailer's settings."""
    from ..passes.detailer import FaceDetailer

    enabled = True
    start = 0
    if args and isinstance(args[0], bool):
        enabled, start = args[0], 1
        if len(args) > 1 and isinstance(args[1], bool):
            start = 2
            if args[1] and context.img2img:
                raise InvalidRequestError(
                    f"{where}.args[1]: skip img2img (detail the init image's faces without an img2img pass) is not "
                    "supported here; send false"
                )
    if not enabled:
        return {}
    tabs = []
    for index in range(start, len(args)):
        at = f"{where}.args[{index}]"
        tab = args[index]
        if not isinstance(tab, Mapping):
            raise InvalidRequestError(
                f"{at}: after the leading booleans, ADetailer's args are objects, got {tab!r:.40}"
            )
        if tab.get("ad_tab_enable", True) is not False and tab.get("ad_model", "None") not in ("None", None):
            tabs.append((at, tab))
    if not tabs:
        return {}
    if len(tabs) > 1:
        raise InvalidRequestError(f"{tabs[1][0]}: one ADetailer tab is run here (the face detailer); give one")
    at, tab = tabs[0]
    unknown = sorted(set(tab) - set(_AD_OURS) - set(_AD_AT_DEFAULT) - _AD_PASSED_OVER)
    if unknown:
        raise InvalidRequestError(f"{at}.{unknown[0]}: not a field of ADetailer's args (25.3.0)")
    model = tab["ad_model"]
    if model not in AD_FACE_MODELS:
        raise InvalidRequestError(
            f"{at}.ad_model: {model!r}: this server details faces only ({', '.join(AD_FACE_MODELS)})"
        )
    context.notes.append(f"{at}.ad_model: {model}: the faces are found by the face detailer's own detector")
    for name, default in _AD_AT_DEFAULT.items():
        if name in tab and tab[name] != default and not (tab[name] in (None, "") and default in ("", "None")):
            raise InvalidRequestError(
                f"{at}.{name}: {tab[name]!r} is not supported here (the face detailer runs with {default!r})"
            )
    settings: dict[str, Any] = {ours: getattr(FaceDetailer(), ours) for ours in _AD_OURS.values()}
    for theirs, ours in _AD_OURS.items():
        if theirs in tab:
            settings[ours] = tab[theirs]
    if tab.get("ad_use_steps"):
        settings["steps"] = tab.get("ad_steps", 28)
    try:
        FaceDetailer(**settings)
    except (SdxlControlError, TypeError) as exc:
        raise InvalidRequestError(f"{at}: {exc}") from None
    return {"detailer": settings}


# -- sdxl-control's own entry ---------------------------------------------------------------------------------------


def _own(args: list[Any], where: str, context: _Context) -> list[Condition]:
    """``{"args": [{"family": "pulid", "images": [b64, ...], "scale": 0.8, ...}, ...]}``: each arg fills one input
    slot of the registry (``input``: its name; or ``family``: an identity family fills the face input, another family
    its one input), its other keys the slot's options; what A1111 lacks (PuLID, PhotoMaker) and every family added later
    come this way with no code here. Options naming files (weights, folders) are refused: models only by name."""
    from ..adapters import CONDITION_KINDS, condition_class, identity_kinds, input_slots
    from ..jobs.slots import slot_conditions
    from .app import decode_image

    slots = input_slots()
    out: list[Condition] = []
    for index, arg in enumerate(args):
        at = f"{where}.args[{index}]"
        if not isinstance(arg, Mapping):
            raise InvalidRequestError(f'{at}: an object {{"family" or "input", "images", options...}}')
        options = dict(arg)
        family, name = options.pop("family", None), options.pop("input", None)
        if family is not None and family not in CONDITION_KINDS:
            raise InvalidRequestError(f"{at}.family: {family!r} is not a family; one of {', '.join(CONDITION_KINDS)}")
        if name is None:
            if family in identity_kinds():
                name = "face"
            elif family is not None and len(CONDITION_KINDS[family].slots) == 1:
                name = CONDITION_KINDS[family].slots[0].name
            else:
                declared = [s.name for s in CONDITION_KINDS[family].slots] if family else list(slots)
                raise InvalidRequestError(f"{at}.input: name the input to fill, one of {', '.join(declared)}")
        if name not in slots:
            raise InvalidRequestError(f"{at}.input: {name!r} is not an input; one of {', '.join(slots)}")
        kind, slot = slots[name]
        if family is not None and family != kind:
            if slot.role is None or family not in identity_kinds():
                raise InvalidRequestError(f"{at}.family: the {name} input is {kind}'s, not {family!r}'s")
            options["kind"] = family
        if "weight" in options:  # A1111's word for a condition's scale
            if "scale" in options:
                raise InvalidRequestError(f"{at}.weight: weight and scale are the same option; give one")
            options["scale"] = options.pop("weight")
        images = options.pop("images", None)
        if isinstance(images, str):
            images = [images]
        if slot.files is not None and (not isinstance(images, list) or not images):
            raise InvalidRequestError(f"{at}.images: the {name} input takes a list of base64 images")
        decoded = [decode_image(value, f"{at}.images[{i}]", context.limits) for i, value in enumerate(images or [])]
        cls = condition_class(str(options.get("kind", kind)))
        # Images among the options (a region mask, InstantID's pose photo: the family's image flags) come as base64.
        family_flags = CONDITION_KINDS[str(options.get("kind", kind))].flags
        pictures = {"mask", *(flag.field for flag in family_flags if flag.type == "image")}
        guarded = {*cls.path_fields, *cls.model_fields} - pictures - {"variant"}
        for key, value in list(options.items()):
            if key in pictures and value is not None:
                picture = decode_image(value, f"{at}.{key}", context.limits)
                options[key] = picture.convert("L") if key == "mask" else picture
            elif key in guarded or (key == "variant" and isinstance(value, str) and _looks_like_path(value)):
                raise InvalidRequestError(
                    f"{at}.{key}: options naming files or folders are not taken from a request (the server's "
                    "models are chosen by name only)"
                )
        try:
            out += slot_conditions({name: decoded} if slot.files is not None else {},
                                   {f"{name}.{key}": value for key, value in options.items()})  # fmt: skip
        except SdxlControlError as exc:
            raise InvalidRequestError(f"{at}: {exc}") from None
    return out


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith((".", "~")) or PurePath(value).suffix != ""


# -- the ControlNet extension's routes --------------------------------------------------------------------------------

# Our preprocessors' sliders as the extension describes its own (module_list's module_detail).
_RESOLUTION = {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 1}
_SLIDERS: dict[str, list[dict[str, Any]]] = {
    "canny": [_RESOLUTION, {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
              {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}],
}  # fmt: skip
# What /controlnet/detect runs for each module it takes: InstantID's keypoints are our face keypoint map.
_DETECT = {**{m: (p, o) for m, (p, o, _) in STRUCTURE_MODULES.items()}, "instant_id_face_keypoints": ("face", {})}


def router(state: ServerState) -> APIRouter:
    """The ControlNet extension's ``/controlnet/...`` routes (host root, as the extension mounts them)."""
    from fastapi import APIRouter, Body

    api = APIRouter(prefix="/controlnet")

    @api.get("/version")
    def version() -> dict[str, Any]:
        return {"version": 3}  # the extension's API version (v1.1.455: external_code.get_api_version)

    @api.get("/model_list")
    def model_list(update: bool = True) -> dict[str, Any]:
        if update:
            state.catalogue.refresh()
        # The server's ControlNet files, then the published models units may name (IP-Adapters by those names only).
        listed = [e.title for e in state.catalogue.listed("controlnet")]
        return {"model_list": [*listed, *(n for n in published_model_names() if n not in listed)]}

    @api.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        # Our modules have no labels apart from their names, so alias_names gives the same list.
        detail = {
            name: {"model_free": False, "sliders": _SLIDERS.get(name, [_RESOLUTION] if name in _DETECT else [])}
            for name in MODULES
        }
        return {"module_list": list(MODULES), "module_detail": detail}

    @api.get("/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": 3}

    @api.post("/detect")
    async def detect(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        from starlette.concurrency import run_in_threadpool

        images, options, preprocessor = _detect_request(payload, state.limits)
        maps = await run_in_threadpool(_run_detect, images, preprocessor, options, state)
        from .app import encode_png

        return {"images": [encode_png(m) for m in maps], "info": "Success"}

    return api


def _detect_request(payload: Mapping[str, Any], limits: Limits) -> tuple[list[Image.Image], dict[str, Any], str | None]:
    from .app import decode_image

    module = payload.get("controlnet_module", "none")
    if module not in _DETECT:
        raise InvalidRequestError(
            f"controlnet_module: {module!r}: Module not available here; one of {', '.join(_DETECT)}"
        )
    # The extension's key, and webuiapi's (its controlnet_detect sends controlnet_images).
    key = "controlnet_input_images" if payload.get("controlnet_input_images") else "controlnet_images"
    given = payload.get(key)
    if not isinstance(given, list) or not given:
        raise InvalidRequestError("controlnet_input_images: No image selected (a list of base64 images)")
    images = [decode_image(value, f"{key}[{i}]", limits) for i, value in enumerate(given)]
    preprocessor, options = _DETECT[module]
    options = dict(options)
    unit = {"processor_res": payload.get("controlnet_processor_res", -1)}
    if preprocessor is not None:
        context = _Context(limits, None, None, None, False)
        images = [_at_processor_res(image, unit, "Crop and Resize", "controlnet_processor_res", context)
                  for image in images]  # fmt: skip
    if preprocessor == "canny":
        low = _number(payload, "controlnet_threshold_a", -1, "controlnet", -1, 255)
        high = _number(payload, "controlnet_threshold_b", -1, "controlnet", -1, 255)
        options["low"] = int(low) if low >= 1 else CANNY_DEFAULTS[0]
        options["high"] = int(high) if high >= 1 else CANNY_DEFAULTS[1]
    return images, options, preprocessor


def _run_detect(
    images: list[Image.Image], preprocessor: str | None, options: Mapping[str, Any], state: ServerState
) -> list[Image.Image]:
    from ..preprocessors import preprocess

    if preprocessor is None:
        return [image.convert("RGB") for image in images]
    # The resolver's stand-ins for the annotator models (--tiny), as a job's preprocessors get them.
    chosen = state.resolver.preprocess_options(preprocessor, options)
    if preprocessor == "face":  # analysed with the identity methods' pack, as `sdxl-control preprocess face` does
        from ..preprocessors.face import IDENTITY_PACK

        chosen.setdefault("pack", state.resolver.face_pack(IDENTITY_PACK))
    try:
        return [preprocess(preprocessor, image, **chosen) for image in images]
    except SdxlControlError as exc:
        raise InvalidRequestError(f"controlnet_module: {exc}") from None
