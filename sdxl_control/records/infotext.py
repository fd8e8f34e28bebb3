"""The ``parameters`` text AUTOMATIC1111 writes into PNGs, which A1111, Forge, Civitai and image viewers read, made
from a recipe: A1111's quoting, its sampler labels, short model names with its hash convention, conditions as the
ControlNet extension's units, LoRAs as prompt tags with their hashes.

Example:
    >>> quote("a, b"), quote("plain")
    ('"a, b"', 'plain')
    >>> sampler_label("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    ('DPM++ 2M', 'Karras')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.stages import Window

__all__ = ["Infotext", "quote", "sampler_label", "model_label", "control_unit", "parameters_text", "safe_name"]
# Our names of the built-in upscalers -> A1111's.
A1111_UPSCALERS = {
    "lanczos": "Lanczos", "latent": "Latent", "latent-bicubic": "Latent (bicubic)",
    "latent-nearest-exact": "Latent (nearest-exact)",
}  # fmt: skip

# diffusers scheduler class -> A1111 sampler label (the equivalences diffusers' scheduler docs list).
SAMPLERS = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    # k-diffusion's sample_dpmpp_sde; DPMSolverSinglestepScheduler (0.2's "dpmpp_sde") has no A1111 label.
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DDIMScheduler": "DDIM",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
# Keys of the settings line that the ControlNet extension's unit items repeat inside their quoted values; readers
# that split naively on commas (sd-parsers) take the last "Model:" they see, so the checkpoint's is written again.
_REPEATED = ("Model",)


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a newline, else as is."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{float(value):g}"


def sampler_label(class_name: str, config: Mapping[str, Any]) -> tuple[str, str | None]:
    """A1111's sampler label and schedule type for a diffusers scheduler (its class name when A1111 has no match)."""
    label = SAMPLERS.get(class_name, class_name)
    if class_name == "DPMSolverMultistepScheduler":
        # A1111's multistep DPM++ samplers: 2M, 2M SDE (midpoint), 2M SDE Heun, 3M SDE; nothing else is one of them.
        algorithm, order = config.get("algorithm_type", "dpmsolver++"), int(config.get("solver_order", 2))
        heun = config.get("solver_type", "midpoint") == "heun"
        label = {
            ("dpmsolver++", 2, False): "DPM++ 2M", ("sde-dpmsolver++", 2, False): "DPM++ 2M SDE",
            ("sde-dpmsolver++", 2, True): "DPM++ 2M SDE Heun", ("sde-dpmsolver++", 3, False): "DPM++ 3M SDE",
        }.get((algorithm, order, heun), class_name)  # fmt: skip
    schedule = None
    if config.get("use_karras_sigmas"):
        schedule = "Karras"
    elif config.get("use_exponential_sigmas"):
        schedule = "Exponential"
    elif config.get("use_beta_sigmas"):
        schedule = "Beta"
    elif config.get("timestep_spacing") == "trailing":
        schedule = "SGM Uniform"
    elif config.get("timestep_spacing") == "linspace":
        schedule = "Uniform"  # k-diffusion's get_sigmas: evenly spaced from t=999 to 0
    return label, schedule


def safe_name(text: str) -> str:
    """A name usable inside a quoted item (``name: value, ...``): no commas or colons, which the ControlNet extension
    refuses in unit values and which split LoRA hash lists."""
    return text.replace(",", "_").replace(":", "_")


def model_label(value: str | os.PathLike[str], file: str | os.PathLike[str] | None = None) -> str:
    """A model's name as the ControlNet extension shows it: ``stem [hash]`` for a weights file (``file``, else ``value``
    when it is one), a folder's name, or the hub id as given."""
    from ..base.files import a1111_short_hash

    path = Path(file) if file is not None else Path(value).expanduser()
    if path.is_file():
        return safe_name(f"{path.stem} [{a1111_short_hash(path)}]")
    if Path(value).expanduser().is_dir():
        return safe_name(Path(value).expanduser().resolve().name)
    return safe_name(os.fspath(value))


def control_unit(
    module: str, model: str, weight: float, window: Window, *, guess_mode: bool = False, **extra: Any
) -> dict[str, str]:
    """One ControlNet-extension unit: the items it writes, in its order (``extra``: ``Threshold A`` and the like)."""
    unit = {
        "Module": safe_name(module),
        "Model": model,
        "Weight": _number(weight),
        "Resize Mode": "Just Resize",  # control images are stretched to the output size, as diffusers does
        **{k: safe_name(str(v)) for k, v in extra.items()},
        "Guidance Start": _number(window.start),
        "Guidance End": _number(window.end),
        "Control Mode": "ControlNet is more important" if guess_mode else "Balanced",
    }
    return unit


@dataclass(frozen=True)
class Infotext:
    """A condition's part of the parameters text: ControlNet-extension ``units`` (``ControlNet 0: "Module: ..."``),
    ``tags`` added to the prompt (``<lora:name:0.8>``) and other ``fields``; mapping-valued fields of the same name
    from several conditions merge (``Lora hashes``).

    Example:
        >>> a = Infotext(tags=("<lora:a:1>",), fields={"Lora hashes": {"a": "0123456789ab"}})
        >>> b = Infotext(tags=("<lora:b:0.5>",), fields={"Lora hashes": {"b": "ba9876543210"}})
        >>> (a + b).fields["Lora hashes"]
        {'a': '0123456789ab', 'b': 'ba9876543210'}
    """

    units: tuple[Mapping[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __add__(self, other: Infotext) -> Infotext:
        merged = dict(self.fields)
        for key, value in other.fields.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Infotext(self.units + other.units, self.tags + other.tags, merged)

    def to_json(self) -> dict[str, Any]:
        return {"units": [dict(u) for u in self.units], "tags": list(self.tags), "fields": dict(self.fields)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> Infotext:
        value = value or {}
        return cls(tuple(value.get("units", ())), tuple(value.get("tags", ())), dict(value.get("fields", {})))


def _field_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _file_name(value: Any) -> str:
    """A recorded file: a reference by name and content, or a path."""
    return str(value.get("file", "")) if isinstance(value, Mapping) else str(value)


def _model_name(source: Mapping[str, Any]) -> str:
    name = str(source.get("name", ""))
    return Path(name).stem if source.get("local") == "file" else name


def _ti_hashes(embeddings: Mapping[str, Any] | None) -> str | None:
    """A1111's ``TI hashes`` value: ``name: hash`` items, the name without the commas and colons that would split
    them, the hash the first 12 hex digits of the file's SHA-256."""
    if not embeddings:
        return None
    items = []
    for name, file in embeddings.items():
        digest = file.get("sha256") if isinstance(file, Mapping) else None
        if digest:
            items.append(f"{str(name).replace(',', '').replace(':', '')}: {str(digest)[:12]}")
    return ", ".join(items) or None


def parameters_text(recipe: Mapping[str, Any]) -> str:
    """The recipe as the ``parameters`` text A1111 writes: prompt (with LoRA tags), negative prompt, then one line of
    ``Key: value`` items — Steps first, as readers expect."""
    extras = Infotext.from_json(recipe.get("infotext"))
    width, height = recipe["size"]
    scheduler = recipe.get("scheduler", {})
    sampler, schedule = sampler_label(scheduler.get("class", ""), scheduler.get("config", {}))
    base = recipe["models"]["base"]
    refiner = recipe["models"].get("refiner")
    items: dict[str, Any] = {
        "Steps": recipe["steps"],
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": recipe["guidance"],
        "Seed": recipe["seed"],
        "Size": f"{width}x{height}",
        "Model hash": base["sha256"][:10] if base.get("sha256") else None,
        "Model": _model_name(base),
        # A1111 writes this for img2img and inpainting; its "Mask blur" only with a mask.
        "Denoising strength": recipe.get("strength"),
        "Mask blur": recipe.get("mask_blur") if recipe.get("mask") else None,
        # A1111 writes its emphasis option only when it is not its default; brackets read as text are its "None".
        "Emphasis": "None" if recipe.get("emphasis") == "off" else None,
        # Forge's meaning of the key for SDXL (A1111 reads SDXL's penultimate layers whatever it says).
        "Clip skip": recipe.get("clip_skip"),
        # A1111's: the embeddings' names with the first 12 hex digits of each file's SHA-256.
        "TI hashes": _ti_hashes(recipe.get("embeddings")),
        "Pad conds": True if recipe.get("pad_conds") else None,  # A1111 writes it only when it padded
        # Seshelle/CFG_Rescale_webui's key, written (as it does) only when it rescales; read back by jobs/png_import.
        "CFG Rescale": recipe.get("guidance_rescale") or None,
    }
    if recipe.get("hires_scale"):  # A1111's hires fix items; its denoising strength is the redraw's
        upscaler = recipe.get("upscaler")
        items.update(
            {
                "Denoising strength": recipe.get("hires_strength"),
                "Hires upscale": recipe["hires_scale"],
                "Hires steps": recipe.get("hires_steps") or recipe["steps"],
                "Hires upscaler": A1111_UPSCALERS.get(str(upscaler)) or Path(_file_name(upscaler)).stem,
            }
        )
    if refiner:
        hashed = f" [{refiner['sha256'][:10]}]" if refiner.get("sha256") else ""
        items["Refiner"] = _model_name(refiner) + hashed
        items["Refiner switch at"] = recipe.get("refiner_switch")
        # The refiner's own prompts (no A1111 key holds them; A1111 keeps unknown items as they are), read back by
        # sdxl_control.jobs.png_import.
        items["Refiner prompt"] = recipe.get("refiner_prompt")
        items["Refiner negative prompt"] = recipe.get("refiner_negative_prompt")
    for i, unit in enumerate(extras.units):
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in unit.items())
    items.update({k: _field_value(v) for k, v in extras.fields.items()})
    items["Version"] = f"sdxl-control {recipe.get('version', '')}".strip()
    settings = ", ".join(f"{k}: {quote(v)}" for k, v in items.items() if v is not None)
    if extras.units:
        settings += "".join(f", {k}: {quote(items[k])}" for k in _REPEATED if items.get(k) is not None)
    prompt = " ".join(p for p in (recipe.get("prompt", ""), *extras.tags) if p)
    lines = [prompt]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    lines.append(settings)
    return "\n".join(lines)
