"""Presets: named generation settings kept as JSON data files beside this module.

Example:
    >>> from sdxl_control.presets import load_preset
    >>> load_preset("quality")["steps"]
    30
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..errors import InvalidRequestError

__all__ = ["available_presets", "load_preset"]


def available_presets() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The settings of a preset: fields of :class:`sdxl_control.GenerationRequest` (plus a ``description``)."""
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        raise InvalidRequestError(f"unknown preset {name!r}: available are {', '.join(available_presets())}")
    data: dict[str, Any] = json.loads(path.read_text())
    data.pop("description", None)
    return data
