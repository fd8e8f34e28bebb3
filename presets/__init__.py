"""Presets: named generation recipes kept as JSON data files beside this module.

A preset holds request settings (steps, guidance, scheduler and its options, an explicit schedule), LoRAs to stack
and optionally a UNet checkpoint to load: "Lightning 4-step" is data, not a class.

Example:
    >>> from sdxl_control.presets import load_preset
    >>> load_preset("lightning-4step").settings["scheduler"]
    'euler_trailing'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import InvalidRequestError

__all__ = ["Preset", "available_presets", "load_preset"]


@dataclass(frozen=True)
class Preset:
    """A preset's parts: ``settings`` (fields of :class:`sdxl_control.GenerationRequest`), ``loras`` (LoRA
    condition arguments) and ``unet`` ((repo, file) of a UNet checkpoint for ``Generator.from_pretrained``).

    Example:
        >>> preset = load_preset("lightning-4step")
        >>> [lora.weight_name for lora in preset.conditions()]
        ['sdxl_lightning_4step_lora.safetensors']
    """

    name: str
    description: str
    settings: dict[str, Any]
    loras: tuple[dict[str, Any], ...] = ()
    unet: tuple[str, str] | None = None

    def conditions(self) -> list[Any]:
        """The preset's LoRAs as conditions."""
        from ..adapters.lora import LoRA

        return [LoRA(**spec) for spec in self.loras]


def available_presets() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> Preset:
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        raise InvalidRequestError(f"unknown preset {name!r}: available are {', '.join(available_presets())}")
    data: dict[str, Any] = json.loads(path.read_text())
    unet = data.pop("unet", None)
    return Preset(
        name=name,
        description=data.pop("description", ""),
        loras=tuple(data.pop("loras", ())),
        unet=(unet["source"], unet["weight_name"]) if unet else None,
        settings=data,
    )
