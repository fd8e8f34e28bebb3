"""Condition families, one module per family, imported as ``sdxl_control.adapters``.

Each module defines frozen :class:`sdxl_control.Condition` values and the mechanism that attaches them.
:func:`condition_from_settings` rebuilds a condition from the settings a recipe recorded.

Example:
    >>> from sdxl_control.adapters import condition_from_settings
    >>> condition_from_settings({"kind": "controlnet", "model": "m", "image": "edges.png"}).image
    'edges.png'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..conditions import Condition
from ..errors import ConditionError

if TYPE_CHECKING:
    from ..files import Locator

__all__ = ["CONDITION_KINDS", "condition_class", "condition_from_settings", "with_face_pack"]

# kind -> (module in this package, class); modules are imported only when a kind is asked for.
CONDITION_KINDS: dict[str, tuple[str, str]] = {
    "controlnet": ("controlnet", "ControlNet"),
    "controlnet-union": ("controlnet", "ControlNetUnion"),
    "ip-adapter": ("ip_adapter", "IPAdapter"),
    "faceid": ("faceid", "FaceID"),
    "instantid": ("instantid", "InstantID"),
    "pulid": ("pulid", "PuLID"),
    "photomaker": ("photomaker", "PhotoMaker"),
    "lora": ("lora", "LoRA"),
}


def condition_class(kind: str) -> type[Condition]:
    if kind not in CONDITION_KINDS:
        raise ConditionError(f"unknown condition kind {kind!r}: one of {', '.join(sorted(CONDITION_KINDS))}")
    module, name = CONDITION_KINDS[kind]
    cls: type[Condition] = getattr(import_module(f"{__name__}.{module}"), name)
    return cls


def condition_from_settings(
    settings: Mapping[str, Any], locate: Locator | None = None, version: str | None = None
) -> Condition:
    """The condition a recipe of sdxl-control ``version`` (``None``: this one) describes, with its files found again by
    ``locate`` (default: where this machine last saw them). Inputs recorded only as a summary (an in-memory image)
    cannot be rebuilt; unknown keys are refused."""
    from ..files import Locator
    from ..validation import unknown_keys

    if not isinstance(settings, Mapping) or not isinstance(settings.get("kind"), str):
        raise ConditionError(f"a recipe condition is a JSON object with a 'kind', got {settings!r:.80}")
    kind = settings["kind"]
    cls = condition_class(kind)
    names = {f.name for f in fields(cls) if f.init}
    message = unknown_keys(set(settings) - {"kind"}, names, f"the recipe's {kind} condition")
    if message:
        raise ConditionError(message)
    locate = locate or Locator()
    values = {}
    for name, value in cls.upgrade_settings({k: v for k, v in settings.items() if k != "kind"}, version).items():
        if isinstance(value, dict) and ({"image", "mode"} <= value.keys() or "tensor" in value):
            raise ConditionError(
                f"the recipe's {kind} condition got its {name} as an in-memory image, which recipes do "
                "not store; pass the condition again, or give inputs as file paths so recipes can re-run them"
            )
        values[name] = locate.resolve(value, f"the recipe's {kind} {name}")
    return cls(**values)


def with_face_pack(conditions: Sequence[Condition], pack: str | None) -> list[Condition]:
    """``conditions`` with every face analysis done by ``pack`` (a name or folder); ``None`` leaves them as they are.
    Packs often live in a folder of the user's own, which a preset cannot know."""
    if not pack:
        return list(conditions)
    return [replace(c, face_pack=pack) if "face_pack" in {f.name for f in fields(c)} else c for c in conditions]
