"""Extensions' fields as A1111's clients send them: ``alwayson_scripts`` entries (the ControlNet extension's units,
ADetailer's args, and sdxl-control's own entry) made conditions and settings of the job; the ControlNet extension's
``/controlnet/...`` routes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..protocol.conditions import Condition
    from .app import Limits

__all__ = ["Scripted", "alwayson_scripts"]


@dataclass(frozen=True)
class Scripted:
    """What a request's ``alwayson_scripts`` add to its job: conditions, request settings, and the notes for what is
    not done (listed in ``info``)."""

    conditions: tuple[Condition, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def alwayson_scripts(scripts: Mapping[str, Any], limits: Limits) -> Scripted:
    """The conditions and settings ``scripts`` (A1111's ``alwayson_scripts``: title -> {"args": [...]}) ask for."""
    notes = tuple(f"alwayson_scripts[{name!r}]: not read by this server" for name in scripts)
    return Scripted(notes=notes)
