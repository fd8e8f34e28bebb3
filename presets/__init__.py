"""Presets: named generation recipes kept as JSON data files beside this module.

A preset holds request settings (steps, guidance, scheduler and its options, an explicit schedule), LoRAs to stack,
optionally a UNet checkpoint to load, and settings for condition kinds the user adds (PuLID's id_scale and mode for
the Lightning UNet, say): "Lightning 4-step" is data, not a class.

Example:
    >>> from sdxl_control.presets import load_preset
    >>> load_preset("lightning-4step").settings["scheduler"]
    'euler_trailing'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import InvalidRequestError

__all__ = ["Preset", "available_presets", "load_preset"]


@dataclass(frozen=True)
class Preset:
    """A preset's parts: ``settings`` (fields of :class:`sdxl_control.GenerationRequest`), ``loras`` (LoRA
    condition arguments), ``unet`` ((repo, file) of a UNet checkpoint for ``Generator.from_pretrained``) and
    ``condition_defaults`` (settings per condition kind, for the conditions a user adds: see :meth:`condition`).

    Example:
        >>> preset = load_preset("lightning-4step")
        >>> [lora.weight_name for lora in preset.conditions()]
        ['sdxl_lightning_4step_lora.safetensors']
        >>> load_preset("pulid-lightning").condition("pulid", "me.jpg").version
        'v1'
    """

    name: str
    description: str
    settings: dict[str, Any]
    loras: tuple[dict[str, Any], ...] = ()
    unet: tuple[str, str] | None = None
    condition_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def conditions(self) -> list[Any]:
        """The preset's LoRAs as conditions."""
        from ..adapters.lora import LoRA

        return [LoRA(**spec) for spec in self.loras]

    def condition(self, kind: str, *args: Any, **options: Any) -> Any:
        """A condition of ``kind`` with this preset's settings for it; ``options`` given here win."""
        from ..adapters import condition_class

        return condition_class(kind)(*args, **{**self.condition_defaults.get(kind, {}), **options})


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
        condition_defaults=data.pop("conditions", {}),
        settings=data,
    )
