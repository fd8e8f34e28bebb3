"""Input slots made conditions: the one place where a job's named inputs (``JobSpec.inputs``: slot -> files) and
their options (``JobSpec.set``: ``"slot.option"`` -> value) become the conditions of the families that declare the
slots in :data:`sdxl_control.adapters.CONDITION_KINDS`. The command line, the page and job files only fill those two;
:func:`sdxl_control.jobs.spec.resolve` calls :func:`slot_conditions` for the inputs no preset takes.

A slot's option defaults are its family's: the class's field defaults, over which the slot declares its own (the
style slot's ``scale`` 0.8, the structure slots' ControlNets and preprocessors).

Example:
    >>> [c.kind for c in slot_conditions({"edges": ["photo.jpg"], "style": ["look.png"]}, {"edges.scale": 0.6})]
    ['controlnet', 'ip-adapter']
    >>> slot_defaults("reference")["variant"], slot_defaults("reference")["layers"]
    ('plus', 'all')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError, SdxlControlError
from ..base.validation import unknown_keys

if TYPE_CHECKING:
    from ..adapters import Slot
    from ..protocol.conditions import Condition

__all__ = ["slot_conditions", "slot_defaults", "split_options"]

# name -> (the files given, the slot's options): what a builder of a joining slot (union) receives of the slots it takes
Joined = Mapping[str, tuple[str, list[Any], dict[str, Any]]]


def split_options(options: Mapping[str, Any], what: str = "the job's set") -> dict[str, dict[str, Any]]:
    """``{"edges.scale": 0.6}`` as ``{"edges": {"scale": 0.6}}``; a key naming no slot is refused."""
    from ..adapters import input_slots

    slots = input_slots()
    out: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        name, dot, option = str(key).partition(".")
        if not dot or not option or "." in option:
            raise InvalidRequestError(f"{what}: {key!r} is SLOT.OPTION (edges.scale, face.kind), got no option")
        message = unknown_keys([name], slots, what, "input slot")
        if message:
            raise InvalidRequestError(message)
        out.setdefault(name, {})[option] = value
    return out


def slot_defaults(name: str, kind: str | None = None) -> dict[str, Any]:
    """The options of slot ``name`` with their defaults (its family's class's, under the slot's own), built by
    ``kind`` where the slot's role lets another family build it; the field its files fill is left out."""
    from ..adapters import condition_class, input_slots

    declared, slot = input_slots()[name]
    out: dict[str, Any] = {}
    for f in dataclasses.fields(condition_class(kind or declared)):
        if f.init and f.name != slot.files:
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    out.update(slot.fields)
    out.update({switch: False for switch in slot.switches})
    if slot.role is not None:
        out["kind"] = kind or declared
    return out


def slot_conditions(inputs: Mapping[str, Any], options: Mapping[str, Any]) -> list[Condition]:
    """The conditions the registry's slots build from ``inputs`` (slot -> a file, or a list of files) and ``options``
    (``"slot.option"`` -> value), in registry order. An option of a slot given no files is refused, except for a slot
    of options only, which they switch on."""
    from ..adapters import input_slots

    slots = input_slots()
    message = unknown_keys(inputs, slots, "the job's inputs (no preset takes them)", "input slot")
    if message:
        raise InvalidRequestError(message)
    chosen = split_options(options)
    given = {name: _files(name, slots[name][1], value) for name, value in inputs.items()}
    given = {name: files for name, files in given.items() if files}
    for name in chosen:
        if slots[name][1].files is not None and name not in given:
            keys = ", ".join(f"{name}.{option}" for option in chosen[name])
            raise InvalidRequestError(f"{keys}: options of the {name} input, which is not given (inputs: {name})")
    out: list[Condition] = []
    for name, (kind, slot) in slots.items():
        if slot.joins is not None and slot.joins[0] in chosen:
            continue  # the joining slot takes its files
        if (slot.files is None and name not in chosen) or (slot.files is not None and name not in given):
            continue
        joined = {
            other: (s.joins[1], given[other], chosen.get(other, {}))
            for other, (_, s) in slots.items()
            if s.joins is not None and s.joins[0] == name and other in given
        }
        try:
            out += _build(kind, slot, given.get(name, []), dict(chosen.get(name, {})), joined)
        except TypeError as exc:  # a field the class requires that neither the slot nor its options give
            raise InvalidRequestError(f"the {name} input: {exc}") from None
        except SdxlControlError as exc:
            raise type(exc)(f"the {name} input: {exc}") from None
    return out


def _files(name: str, slot: Slot, value: Any) -> list[Any]:
    files = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    if len(files) > 1 and not (slot.many or slot.each):
        raise InvalidRequestError(f"the {name} input takes one file, got {len(files)}")
    return files


def _build(kind: str, slot: Slot, files: list[Any], options: dict[str, Any], joined: Joined) -> list[Condition]:
    """One slot's conditions: its family's class with the slot's fields, its options and its files."""
    from ..adapters import condition_class, identity_kinds

    if slot.role is not None and "kind" in options:
        kind = options.pop("kind")
        kinds = identity_kinds() if slot.role == "identity" else [kind]
        if kind not in kinds:
            raise InvalidRequestError(f"{slot.name}.kind is one of {', '.join(kinds)}, got {kind!r}")
    cls = condition_class(kind)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != slot.files]
    message = unknown_keys(options, [*known, *slot.switches], f"the {slot.name} input ({kind})", "option")
    if message:
        raise InvalidRequestError(message)
    values = {k: v for k, v in slot.fields.items() if k in known}
    for switch, sets in slot.switches.items():
        on = options.pop(switch, False)
        if not isinstance(on, bool):
            raise InvalidRequestError(f"{slot.name}.{switch} is true or false, got {on!r}")
        if on:
            values.update(sets)
    values.update(options)
    if slot.build is not None:
        module, _, function = slot.build.partition(":")
        build = getattr(import_module(f"sdxl_control.adapters.{module}"), function)
        if slot.files is not None:  # a builder of a slot with files gets them as that field
            values[slot.files] = files
        conditions: list[Condition] = build(cls, values, joined)
        return conditions
    if slot.each:
        return [cls(**{slot.files: file}, **_one_of_each(slot, values, i)) for i, file in enumerate(files)]
    if slot.files is None:  # a slot of options only: one condition of them
        return [cls(**values)]
    return [cls(**{slot.files: files if slot.many else files[0]}, **values)]


def _one_of_each(slot: Slot, values: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The options of file ``index`` of a slot that builds one condition per file: an option of ``slot.per_file``
    given as a list has one value per file, its last repeating; ``None`` there keeps the field's default."""
    out = dict(values)
    for key in slot.per_file:
        value = out.get(key)
        if isinstance(value, (list, tuple)):
            out[key] = value[min(index, len(value) - 1)] if value else None
        if out.get(key, 0) is None:
            del out[key]
    return out
