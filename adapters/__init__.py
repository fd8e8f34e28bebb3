"""Condition families, one module per family, imported as ``sdxl_control.adapters``.

Each module defines frozen :class:`sdxl_control.Condition` values and the mechanism that attaches them.
:func:`condition_from_settings` rebuilds a condition from the settings a recipe recorded. :data:`CONDITION_KINDS` is
the registry the front-ends read: each family's class, role, command-line flags and input slots (:class:`Slot`: the
named inputs — structure, style, reference, face, LoRA — a job fills with files and options, from which
:func:`sdxl_control.jobs.slots.slot_conditions` builds the conditions).

Example:
    >>> from sdxl_control.adapters import condition_from_settings
    >>> condition_from_settings({"kind": "controlnet", "model": "m", "image": "edges.png"}).image
    'edges.png'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

from ..base.defaults import DEFAULT_UNION, STRUCTURE_CONTROLS
from ..base.errors import ConditionError

if TYPE_CHECKING:
    from ..base.files import Locator
    from ..protocol.conditions import Condition

__all__ = [
    "CONDITION_KINDS", "Family", "Flag", "Slot", "condition_class", "condition_from_settings", "identity_kinds",
    "input_slots", "with_face_pack",
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
    # "list": comma-separated texts; "switch": given or not (a slot's switch, or a bool field)
    type: Literal["text", "number", "window", "image", "list", "switch"] = "text"
    choices: tuple[str, ...] = ()
    # A switch that may also take comma-separated numbers, one for each field named here (--freeu 1.1,1.2,0.6,0.4).
    values: tuple[str, ...] = ()
    # What --help calls its value (default: by its type, N for a number).
    metavar: str | None = None


@dataclass(frozen=True)
class Slot:
    """A named input of a job that a family builds conditions from: a job names its files in ``JobSpec.inputs``
    (``{"edges": ["photo.jpg"]}``) and its options in ``JobSpec.set`` (``{"edges.scale": 0.6}``), and
    :func:`sdxl_control.jobs.slots.slot_conditions` builds them; a front-end only translates its fields into those two.

    Plain data, so the registry imports without torch. ``files`` is the field of the family's class the files fill
    (``None``: a slot of options only, switched on by giving any, such as ``union``); ``many``: several files make one
    condition (photos of one person); ``each``: one condition per file (LoRAs), and an option of ``per_file`` given
    as a list then goes file by file, its last value repeating. The slot's options are its class's fields (their
    defaults the class's, or the slot's own ``fields``), the ``switches`` (an option true or false, and the fields it
    sets when true: a ready ``map`` is not preprocessed) and, for a slot with a ``role``, ``kind``: another family of
    that role builds it. ``joins`` is ``(slot, field)``: while that slot is switched on, it takes this slot's files as its ``field``
    (``--union`` drives every structure slot through one ControlNet-Union). ``build`` names a function
    ``"module:name"`` in ``adapters/`` for a slot the generic rule cannot build (see :mod:`sdxl_control.jobs.slots`).
    ``images``: its files are images, checked as such before any model loads. ``flags`` are the command-line options
    of a slot the command line has no flags of its own for (``--NAME FILE`` it gets in any case).

    Example:
        >>> kind, slot = input_slots()["style"]
        >>> kind, slot.fields["layers"]
        ('ip-adapter', 'style')
    """

    name: str
    help: str
    files: str | None
    many: bool = False
    each: bool = False
    per_file: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)
    switches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    role: Literal["identity"] | None = None
    joins: tuple[str, str] | None = None
    build: str | None = None
    images: bool = True
    flags: tuple[Flag, ...] = ()
    # What the command line calls one value of --NAME in its help (default FILE, or TEXT for a slot of no images).
    metavar: str | None = None


@dataclass(frozen=True)
class Family:
    """A condition family as the front-ends see it, without importing it (the command line's ``--help`` answers
    before torch loads): where its class lives, its ``role`` (``"identity"``: made from photos of one person, the
    ``--face`` photos, with the shared ``--face-scale``, ``--face-window`` and ``--face-pack``), its own ``flags`` and
    the input ``slots`` it builds (a family added with a slot needs no code in the command line, the page or job
    files: they fill the slot by its name).

    Example:
        >>> CONDITION_KINDS["pulid"].role
        'identity'
        >>> [slot.name for slot in CONDITION_KINDS["ip-adapter"].slots]
        ['style', 'reference']
    """

    module: str
    cls: str
    role: Literal["identity"] | None = None
    flags: tuple[Flag, ...] = ()
    slots: tuple[Slot, ...] = ()


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


def _structure_slot(name: str) -> Slot:
    control = STRUCTURE_CONTROLS[name]
    return Slot(name, f"a photo whose {control.preprocessor} map guides the composition (a ready map with "
                f"{name}.map=true)", "image", fields={"model": control.model, "preprocess": control.preprocessor},
                switches={"map": {"preprocess": None}}, joins=("union", control.union_type))  # fmt: skip


_LORA_SLOT = Slot("lora", "LoRA files to stack (lora.scale: one weight, or one per file)", "source", many=True,
                  each=True, per_file=("scale",), images=False)  # fmt: skip
_UNION_SLOT = Slot("union", "drive every structure slot through one ControlNet-Union model (union.model, "
                   "union.scale, union.window)", None, fields={"model": DEFAULT_UNION},
                   build="controlnet:union_from_slots")  # fmt: skip
_STYLE_SLOT = Slot("style", "style image(s) (InstantStyle: the ViT-bigG IP-Adapter on the style block)", "images",
                   many=True, fields={"variant": "sdxl", "layers": "style", "scale": 0.8})  # fmt: skip
_REFERENCE_SLOT = Slot("reference", "IP-Adapter reference image(s)", "images", many=True,
                       fields={"variant": "plus", "scale": 0.6})  # fmt: skip
# The photos of one person, declared by the default identity family (defaults.DEFAULT_IDENTITY); face.kind picks
# another family of its role.
_FACE_SLOT = Slot("face", "photo(s) of one person (face.kind: the identity method)", "faces", many=True,
                  role="identity")  # fmt: skip

_REGION_SLOT = Slot("region", "a prompt for one region: MASK:PROMPT (a mask image, white = the region) or "
                    "X0,Y0,X1,Y1:PROMPT (fractions of the width and height); one per region", "prompt", each=True,
                    images=False, build="regions:regions_from_slot", metavar="MASK_OR_BOX:PROMPT",
                    flags=(Flag("region-mode", "mode", "how regions act: masked (ComfyUI's masked conditioning, "
                                "default)", choices=("masked", "attention")),
                           Flag("region-scale", "scale", "the regions' strength (default 1)", "number"),
                           Flag("region-window", "window", "where the regions act (default 0:1)", "window")))  # fmt: skip
# Slots of options only: a flag (or a job's SLOT.OPTION) given switches the condition on.
_PAG_SLOT = Slot("pag", "perturbed-attention guidance (pag.scale, pag.layers, pag.adaptive_scale)", None,
                 flags=(Flag("pag-scale", "scale", "perturbed-attention guidance at this scale (diffusers' 3.0)",
                             "number"),
                        Flag("pag-layers", "layers", "PAG's self-attention layers, comma-separated (default mid)",
                             "list"),
                        Flag("pag-adaptive", "adaptive_scale", "PAG's adaptive scale (default 0)", "number")))  # fmt: skip
_APG_SLOT = Slot("apg", "adaptive projected guidance (apg.eta, apg.norm_threshold, apg.momentum)", None,
                 flags=(Flag("apg", "eta", "adaptive projected guidance with this eta (0: only the guidance "
                             "orthogonal to the prompt's prediction)", "number", metavar="ETA"),
                        Flag("apg-threshold", "norm_threshold", "APG's norm threshold (default 15, 0: none)", "number"),
                        Flag("apg-momentum", "momentum", "APG's momentum (default 0; the paper's -0.5)", "number")))  # fmt: skip
_FREEU_SLOT = Slot("freeu", "FreeU (freeu.on, freeu.b1, freeu.b2, freeu.s1, freeu.s2, freeu.scale)", None,
                   switches={"on": {}},
                   flags=(Flag("freeu", "on", "FreeU with the published SDXL factors (b1 1.3, b2 1.4, s1 0.9, "
                               "s2 0.2), or B1,B2,S1,S2 given", "switch", values=("b1", "b2", "s1", "s2")),
                          Flag("freeu-scale", "scale", "FreeU's factors moved from 1 by this much (default 1)",
                               "number")))  # fmt: skip

# kind -> family; a family's module is imported only when its kind is asked for. A family added here needs no code in
# the command line, the page or the batch runner: they read this. The slots build in this order (LoRAs first), which
# is the order of the conditions a job stacks.
CONDITION_KINDS: dict[str, Family] = {
    "lora": Family("lora", "LoRA", slots=(_LORA_SLOT,)),
    "controlnet": Family("controlnet", "ControlNet", slots=tuple(map(_structure_slot, STRUCTURE_CONTROLS))),
    "controlnet-union": Family("controlnet", "ControlNetUnion", slots=(_UNION_SLOT,)),
    "ip-adapter": Family("ip_adapter", "IPAdapter", slots=(_STYLE_SLOT, _REFERENCE_SLOT)),
    "faceid": Family(
        "faceid",
        "FaceID",
        "identity",
        (Flag("face-variant", "variant", "FaceID: faceid or plusv2 (default)"),),
        slots=(_FACE_SLOT,),
    ),  # fmt: skip
    "instantid": Family("instantid", "InstantID", "identity", _INSTANTID_FLAGS),
    "pulid": Family("pulid", "PuLID", "identity", _PULID_FLAGS),
    "photomaker": Family("photomaker", "PhotoMaker", "identity", _PHOTOMAKER_FLAGS),
    "region": Family("regions", "Region", slots=(_REGION_SLOT,)),
    "pag": Family("pag", "PAG", slots=(_PAG_SLOT,)),
    "apg": Family("apg", "APG", slots=(_APG_SLOT,)),
    "freeu": Family("freeu", "FreeU", slots=(_FREEU_SLOT,)),
}


def input_slots() -> dict[str, tuple[str, Slot]]:
    """Every input slot by name, with the kind of the family that declares it, in registry order (the order the
    conditions stack in).

    Example:
        >>> kind, slot = input_slots()["edges"]
        >>> kind, slot.files, slot.fields["preprocess"]
        ('controlnet', 'image', 'canny')
    """
    found: dict[str, tuple[str, Slot]] = {}
    for kind, family in CONDITION_KINDS.items():
        for slot in family.slots:
            if slot.name in found:
                raise ConditionError(f"input slot {slot.name!r} is declared by {found[slot.name][0]} and {kind}")
            found[slot.name] = (kind, slot)
    return found


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
