"""Tiny stand-ins for the published models a condition, a LoRA or a preset names: what ``--tiny`` runs on.

Every hub id a condition would load is swapped for a tiny model of the same layout, written once into the cache next
to the tiny pipelines; paths the user gave stay as they are. Face analysis packs named (``antelopev2``,
``buffalo_l``) rather than given as folders become stand-in packs in insightface's layout (a detector that finds one
face in the middle of any photo, and a tiny recognition model), so identity conditions run offline too.

Example:
    >>> from sdxl_control.adapters.controlnet import ControlNet
    >>> tiny = tiny_condition(ControlNet("diffusers/controlnet-canny-sdxl-1.0", image="p.png", preprocess="canny"))
    >>> Path(tiny.model).name                                              # doctest: +SKIP
    'controlnet-edges'
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from ..base.files import looks_like_hub_id
from ..base.model_refs import ModelRef
from ..protocol.conditions import Condition
from .annotators import tiny_control_models
from .tiny import tiny_models, write_tiny_taesd

__all__ = ["tiny_condition", "tiny_face_pack", "tiny_pack", "tiny_unet", "tiny_decoder", "tiny_preprocess_options"]

# Which tiny ControlNet stands in for a hub ControlNet, by the preprocessor that feeds it.
_CONTROLNETS = {"canny": "controlnet-edges", "edges": "controlnet-edges", "depth": "controlnet-depth",
                "pose": "controlnet-pose"}  # fmt: skip
_ANNOTATORS = {"depth": "depth-estimator", "pose": "openpose"}


def _hub(value: Any) -> bool:
    return isinstance(value, str) and looks_like_hub_id(value) and not Path(value).expanduser().exists()


def tiny_preprocess_options(preprocess: str | None, options: Any = None, seed: int = 0) -> dict[str, Any]:
    """``options`` for a preprocessor with a tiny stand-in for the annotator model it would load (depth, pose)."""
    options = dict(options or {})
    if preprocess in _ANNOTATORS and _hub(options.get("model", "default/hub-model")):
        options["model"] = str(tiny_control_models(_ANNOTATORS[preprocess], seed))
    return options


def _tiny_lora(source: str, weight_name: str | None, seed: int) -> dict[str, Any]:
    from .lora import write_tiny_lora

    name = weight_name or "pytorch_lora_weights.safetensors"
    folder = tiny_models(seed).base.parent / "loras" / source.replace("/", "--")
    if not (folder / name).exists():
        folder.mkdir(parents=True, exist_ok=True)
        salt = int(hashlib.sha256(f"{source}/{name}".encode()).hexdigest()[:6], 16)
        write_tiny_lora(folder / name, tiny_models(seed).base, "kohya", seed=salt, text=False)
    return {"source": str(folder), "weight_name": name}


def tiny_face_pack(pack: str, seed: int = 0) -> Path:
    """A stand-in for the insightface pack named ``pack``, written once into the cache beside the tiny pipelines."""
    from ..preprocessors.face import IDENTITY_PACK, PACK_FILES
    from .faces import write_tiny_face_pack

    folder = tiny_models(seed).base.parent / "insightface" / "models" / pack
    if not folder.exists():
        write_tiny_face_pack(folder, pack if pack in PACK_FILES else IDENTITY_PACK, seed)
    return folder


def tiny_pack(pack: str, seed: int = 0) -> str:
    """``pack`` as the tiny models run it: a folder the user gave stays; a pack named is swapped for its stand-in."""
    return pack if Path(pack).expanduser().is_dir() else str(tiny_face_pack(Path(pack).name, seed))


def tiny_condition(condition: Condition, seed: int = 0) -> Condition:
    """``condition`` with every hub model it would load replaced by a tiny stand-in of the same layout."""
    kind = condition.kind
    changes: dict[str, Any] = {}
    pack = getattr(condition, "face_pack", None)
    if isinstance(pack, str) and not Path(pack).expanduser().is_dir():
        changes["face_pack"] = tiny_pack(pack, seed)
    get = condition.__getattribute__
    tiny = lambda name: str(tiny_control_models(name, seed))  # noqa: E731
    if kind == "controlnet":
        if _hub(get("model")):
            changes["model"] = tiny(_CONTROLNETS.get(get("preprocess") or "", "controlnet-edges"))
        changes["preprocess_options"] = tiny_preprocess_options(get("preprocess"), get("preprocess_options"), seed)
    elif kind == "controlnet-union":
        if _hub(get("model")):
            changes["model"] = tiny("controlnet-union")
        options = get("preprocess_options")
        changes["preprocess_options"] = {
            name: tiny_preprocess_options(name, options.get(name), seed) for name in get("preprocess")
        }
    elif kind == "ip-adapter" and _hub(get("source")):
        changes["source"] = tiny("ip-adapter")
    elif kind == "faceid":
        if _hub(get("source")):
            changes["source"] = tiny("ip-adapter-faceid")
        if get("image_encoder") is None:
            changes["image_encoder"] = str(tiny_control_models("ip-adapter", seed) / "models" / "image_encoder")
    elif kind == "instantid" and _hub(get("source")):
        changes["source"] = tiny("instantid")
    elif kind == "pulid":
        folder = tiny_control_models("pulid", seed)
        for name, sub in (("source", "pulid"), ("eva", "eva"), ("parsing", "facexlib")):
            if get(name) is None or _hub(get(name)):
                changes[name] = str(folder / sub)
    elif kind == "photomaker" and get("weights") is None:
        changes["weights"] = str(tiny_control_models("photomaker", seed) / f"photomaker-{get('version') or 'v2'}.bin")
    elif kind == "lora" and _hub(get("source")):
        changes.update(_tiny_lora(get("source"), get("weight_name"), seed))
    return dataclasses.replace(condition, **changes) if changes else condition


def tiny_unet(unet: ModelRef | None, seed: int = 0) -> ModelRef | None:
    """A UNet-only checkpoint for the tiny base (its own weights, in the published single-file layout)."""
    if unet is None or (unet.weight_name is None and Path(unet.source).expanduser().exists()):
        return unet
    return ModelRef(str(tiny_models(seed).base / "unet" / "diffusion_pytorch_model.safetensors"))


def tiny_decoder(decoder: str | None, seed: int = 0) -> str | None:
    """A tiny autoencoder in TAESD's layout for a hub decoder such as ``madebyollin/taesdxl``."""
    if decoder is None or not _hub(decoder):
        return decoder
    # "taesd-2": the decoder that gives visible noise (the first, "taesd", decoded everything to black).
    folder = tiny_models(seed).base.parent / "taesd-2"
    if not (folder / "config.json").exists():
        write_tiny_taesd(folder, seed)
    return str(folder)
