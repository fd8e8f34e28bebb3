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
from dataclasses import dataclass, fields, replace
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

from ..base.errors import ConditionError

if TYPE_CHECKING:
    from ..base.files import Locator
    from ..protocol.conditions import Condition

__all__ = [
    "CONDITION_KINDS", "Family", "Flag", "condition_class", "condition_from_settings", "identity_kinds",
    "with_face_pack",
]  # fmt: skip


@dataclass(frozen=True)
class Flag:
    """A front-end option for one field of a family's condition: ``--NAME`` on the command line. ``type`` says how
    its text reads, ``choices`` the values it takes (the field's ``Literal``); its default is the field's own, so a
    flag not given leaves the class's default in place.

    Example:
        >>> Flag("pulid-version", "version", "v1 or v1.1", choices=("v1", "v1.1")).field
        'version'
    """

    name: str
    field: str
    help: str
    type: Literal["text", "number", "window", "image"] = "text"
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """A condition family as the front-ends see it, without importing it (the command line's ``--help`` answers
    before torch loads): where its class lives, its ``role`` (``"identity"``: made from photos of one person, the
    ``--face`` photos, with the shared ``--face-scale``, ``--face-window`` and ``--face-pack``) and its own ``flags``.

    Example:
        >>> CONDITION_KINDS["pulid"].role
        'identity'
    """

    module: str
    cls: str
    role: Literal["identity"] | None = None
    flags: tuple[Flag, ...] = ()


_PULID_FLAGS = (
    Flag("identity-mode", "mode", "PuLID: fidelity (default) or style (v1: more zero tokens, plain orthogonal "
         "projection)", choices=("fidelity", "style")),
    Flag("pulid-version", "version", "PuLID: v1 (Lightning 4-step) or v1.1 (default)", choices=("v1", "v1.1")),
    Flag("pulid-model", "source", "PuLID: repo or folder holding pulid_v1.bin / pulid_v1.1.safetensors"),
    Flag("eva-model", "eva", "PuLID: EVA-CLIP repo or file (default QuanSun/EVA-CLIP)"),
    Flag("face-parsing", "parsing", "PuLID: folder with facexlib's parsing_bisenet.pth (default: facexlib's own)"),
)  # fmt: skip
_PHOTOMAKER_FLAGS = (
    Flag("trigger", "trigger", "PhotoMaker: the trigger word after the class word in the prompt (default img)"),
    Flag("photomaker-version", "version", "PhotoMaker: v1 or v2 (default)", choices=("v1", "v2")),
    Flag("photomaker-weights", "weights", "PhotoMaker: a checkpoint file instead of the hub's"),
    Flag("start-merge", "start_merge", "PhotoMaker: fraction of the steps before the identity joins the prompt "
         "(default 0.2)", "number"),
)  # fmt: skip
_INSTANTID_FLAGS = (
    Flag("identitynet-scale", "controlnet_scale", "InstantID: strength of IdentityNet (default 0.8)", "number"),
    Flag("identitynet-window", "controlnet_window", "InstantID: where IdentityNet acts (default 0:1)", "window"),
    Flag("face-keypoints", "keypoints_from", "InstantID: pose the face like the face in this photo", "image"),
    Flag("instantid-model", "source", "InstantID: repo or folder with ControlNetModel/ and ip-adapter.bin"),
)  # fmt: skip

# kind -> family; a family's module is imported only when its kind is asked for. A family added here needs no code in
# the command line, the page or the batch runner: they read this.
CONDITION_KINDS: dict[str, Family] = {
    "controlnet": Family("controlnet", "ControlNet"),
    "controlnet-union": Family("controlnet", "ControlNetUnion"),
    "ip-adapter": Family("ip_adapter", "IPAdapter"),
    "faceid": Family(
        "faceid", "FaceID", "identity", (Flag("face-variant", "variant", "FaceID: faceid or plusv2 (default)"),)
    ),  # fmt: skip
    "instantid": Family("instantid", "InstantID", "identity", _INSTANTID_FLAGS),
    "pulid": Family("pulid", "PuLID", "identity", _PULID_FLAGS),
    "photomaker": Family("photomaker", "PhotoMaker", "identity", _PHOTOMAKER_FLAGS),
    "lora": Family("lora", "LoRA"),
}


def identity_kinds() -> list[str]:
    """The families that make an identity condition from photos of one person, in their registry order."""
    return [kind for kind, family in CONDITION_KINDS.items() if family.role == "identity"]


def condition_class(kind: str) -> type[Condition]:
    if kind not in CONDITION_KINDS:
        raise ConditionError(f"unknown condition kind {kind!r}: one of {', '.join(sorted(CONDITION_KINDS))}")
    family = CONDITION_KINDS[kind]
    cls: type[Condition] = getattr(import_module(f"{__name__}.{family.module}"), family.cls)
    return cls


def condition_from_settings(
    settings: Mapping[str, Any], locate: Locator | None = None, version: str | None = None
) -> Condition:
    """The condition a recipe of sdxl-control ``version`` (``None``: this one) describes, with its files found again by
    ``locate`` (default: where this machine last saw them). Inputs recorded only as a summary (an in-memory image)
    cannot be rebuilt; unknown keys are refused."""
    from ..base.files import Locator
    from ..base.validation import unknown_keys

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
