"""Presets: what works together, as data files beside this module (or any JSON file a user writes).

A preset holds request settings (steps, guidance, scheduler and its options, size, negative prompt, refiner switch,
the image to start from, the face detailer...), ``models`` (base, refiner, a UNet checkpoint), ``loras`` to stack, the
``inputs`` a user supplies ("face", "style", "structure", "pose", "init_image") and ``conditions``: templates of
conditions whose inputs are those, written ``"$face"``. A request setting may name an input the same way
(``"init_image": "$init_image"``). A template runs, and a setting is set, when any of its inputs is given; a required
input that is missing is an error. "Portrait" is data, not a class.

An input with ``"text": true`` takes a text, not a file (a person's description: ``--input left_prompt=TEXT``). A
``layout`` names regions of the image, each a ``box`` (x0, y0, x1, y1 fractions) that an optional mask ``input``
replaces when given; a template field written ``"@left"`` gets that region's mask, so a regional prompt and an
identity given the same ``"@left"`` act on one region (the ``two-people`` preset).

Example:
    >>> from sdxl_control.presets import load_preset
    >>> preset = load_preset("style-transfer")
    >>> sorted(preset.inputs)
    ['structure', 'style']
    >>> preset.with_settings({"style.scale": 0.8}).templates["style"]["scale"]
    0.8
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError, SdxlControlError
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys

if TYPE_CHECKING:
    from ..passes.request import GenerationRequest
    from ..protocol.conditions import Condition
    from ..weights.inventory import ModelNeed

__all__ = ["Preset", "PresetInput", "available_presets", "load_preset", "parse_assignment"]

# Request fields a preset may set; the prompt, seed and batch size are the user's.
REQUEST_KEYS = (
    "negative_prompt", "steps", "guidance", "guidance_rescale", "refiner_switch", "size", "scheduler",
    "scheduler_options", "timesteps", "aesthetic_score", "negative_aesthetic_score", "vae_tiling", "decoder",
    "strength", "mask_blur", "refiner_only", "padding_mask_crop", "hires_scale", "hires_strength", "hires_steps", "upscaler",
    "init_image", "mask", "outpaint", "detailer",
)  # fmt: skip
PRESET_KEYS = ("description", "models", "inputs", "layout", "conditions", "loras", *REQUEST_KEYS)
MODEL_KEYS = ("base", "refiner", "unet", "weight_storage")
INPUT_KEYS = ("help", "required", "many", "text")
LAYOUT_KEYS = ("box", "input")


class PresetError(InvalidRequestError):
    """A preset file or a ``--set`` that does not make a valid preset; the message names the file and the key."""


@dataclass(frozen=True)
class PresetInput:
    """An input a preset's conditions take from the user: ``many`` takes several files (photos of one person);
    ``text`` takes a text instead of a file (a prompt)."""

    name: str
    help: str
    required: bool = False
    many: bool = False
    text: bool = False


@dataclass(frozen=True)
class Preset:
    """A preset's parts (see the module docstring for the file format).

    Example:
        >>> preset = load_preset("portrait")
        >>> [c.kind for c in preset.conditions({"face": ["me.jpg"]})]
        ['pulid']
        >>> preset.request("a portrait of an astronaut", {"face": ["me.jpg"]}).steps
        25
    """

    name: str
    description: str
    settings: Mapping[str, Any]
    models: Mapping[str, Any] = field(default_factory=dict)
    loras: tuple[Mapping[str, Any], ...] = ()
    inputs: Mapping[str, PresetInput] = field(default_factory=dict)
    templates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    origin: str = ""  # the file it came from, for messages
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)
    layout: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def unet(self) -> ModelRef | None:
        """The UNet checkpoint the preset loads over the base's, if any."""
        return ModelRef.parse(self.models.get("unet"), f"preset {self.name}'s models.unet")

    def _fail(self, key: str, problem: str) -> PresetError:
        return PresetError(f"preset {self.name} ({self.origin}): {key}: {problem}")

    def with_settings(self, assignments: Mapping[str, Any]) -> Preset:
        """A copy with ``key=value`` assignments applied (``steps``, ``models.base``, ``face.scale`` for the template
        ``face``) and checked like the file itself; ``None`` removes a key."""
        data = copy.deepcopy(dict(self.data))
        for key, value in assignments.items():
            parts = key.split(".")
            if parts[0] in self.templates and parts[0] not in PRESET_KEYS:
                parts = ["conditions", *parts]
            if parts[0] not in PRESET_KEYS:
                message = unknown_keys([parts[0]], [*PRESET_KEYS, *self.templates], f"--set {key}: the preset")
                raise PresetError(f"preset {self.name}: {message}")
            target = data
            for part in parts[:-1]:
                child = target.setdefault(part, {})
                if not isinstance(child, dict):
                    raise PresetError(f"preset {self.name}: --set {key}: {part} is not a group of settings")
                target = child
            if value is None:
                target.pop(parts[-1], None)
            else:
                target[parts[-1]] = value
        return _from_data(self.name, self.origin + " with --set", data)

    def _filled(
        self, template: Mapping[str, Any], given: Mapping[str, Any], masks: Mapping[str, Any] | None = None
    ) -> Condition | None:
        from ..adapters import condition_class

        refs = {k: v[1:] for k, v in template.items() if isinstance(v, str) and v.startswith("$")}
        if refs and not any(ref in given for ref in refs.values()):
            return None
        values = {k: v for k, v in template.items() if k != "kind" and k not in refs}
        values.update({k: given[ref] for k, ref in refs.items() if ref in given})
        masks = masks if masks is not None else {}
        for key, value in template.items():
            if _layout_ref(value):
                name = value[1:]
                values[key] = masks[name] if name in masks else self.region_mask(name, given)
        return condition_class(template["kind"])(**values)

    def region_mask(self, name: str, given: Mapping[str, Any]) -> Any:
        """The mask of the layout's region ``name``: its mask input where given, else its box drawn at the preset's
        size, as a file (so recipes re-make it; a box is fractions: the mask is resized to any output size as every
        region mask is)."""
        from ..adapters.people import box_mask_file

        region = self.layout[name]
        if region.get("input") in given:
            return given[region["input"]]
        width, height = self.settings.get("size") or (1024, 1024)
        return box_mask_file(tuple(region["box"]), (width, height))

    def conditions(self, inputs: Mapping[str, Any] | None = None) -> list[Condition]:
        """The preset's LoRAs, then its templates filled with ``inputs`` (name -> a file, or a list for ``many``
        inputs); templates whose inputs are all absent are left out. Without ``inputs``: the LoRAs alone."""
        from ..adapters.lora import LoRA

        out: list[Condition] = [LoRA(**spec) for spec in self.loras]
        if inputs is None:
            return out
        given = self._check_inputs(inputs)
        # Each region's mask made once: the conditions that name it share one image (one region, given once).
        masks = {name: self.region_mask(name, given) for name in self.layout}
        for name, template in self.templates.items():
            try:
                condition = self._filled(template, given, masks)
            except (TypeError, SdxlControlError) as exc:  # TypeError: a required field the template lacks
                raise self._fail(f"conditions.{name}", str(exc)) from None
            if condition is not None:
                out.append(condition)
        return out

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        message = unknown_keys(inputs, self.inputs, f"preset {self.name}", "input")
        if message:
            raise InvalidRequestError(message)
        given: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            value = inputs.get(name)
            values = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
            if not values:
                if spec.required and spec.text:
                    raise InvalidRequestError(
                        f"preset {self.name} needs its {name} input ({spec.help}): --input {name}=TEXT "
                        f'(a job file: "inputs": {{"{name}": TEXT}})'
                    )
                if spec.required:
                    raise InvalidRequestError(
                        f"preset {self.name} needs its {name} input ({spec.help}): --{name.replace('_', '-')} FILE "
                        f'(a job file: "inputs": {{"{name}": FILE}})'
                    )
                continue
            if spec.text and not all(isinstance(v, str) and v.strip() for v in values):
                raise InvalidRequestError(f"preset {self.name}'s {name} input is a text, got {values[0]!r:.60}")
            if len(values) > 1 and not spec.many:
                raise InvalidRequestError(f"preset {self.name} takes one {name} input, got {len(values)}")
            given[name] = values if spec.many else values[0]
        return given

    def request_settings(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The preset's request settings with those that name an input (``"$init_image"``) filled from ``inputs``,
        and left out where that input is not given."""
        given = self._check_inputs(inputs) if inputs is not None else {}
        out = {}
        for key, value in self.settings.items():
            ref = _input_ref(value)
            if ref is None:
                out[key] = value
            elif ref in given:
                out[key] = given[ref]
        return out

    def placeholder_inputs(self) -> dict[str, Any]:
        """Stand-in names for every input: the conditions they make list their models without reading any file."""
        return {
            name: f"<{name}>" if spec.text else [f"<{name}>.png"] if spec.many else f"<{name}>.png"
            for name, spec in self.inputs.items()
        }

    def request(self, prompt: str, inputs: Mapping[str, Any] | None = None, **options: Any) -> GenerationRequest:
        """The request this preset makes for ``prompt`` and ``inputs``; ``options`` (request fields) win, and
        ``options["conditions"]`` are added after the preset's."""
        from ..passes.request import GenerationRequest

        extra = tuple(options.pop("conditions", ()))
        inputs = inputs if inputs is not None else {}
        conditions = (*self.conditions(inputs), *extra)
        return GenerationRequest(prompt, **{**self.request_settings(inputs), **options}, conditions=conditions)

    def model_needs(self, *, refiner: bool | None = None) -> list[ModelNeed]:
        """Every model this preset loads (with all its optional inputs given): base, refiner when it switches to
        one, UNet checkpoint, draft decoder, LoRAs and each condition's weights."""
        from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER
        from ..jobs.needs import model_needs

        switches = refiner if refiner is not None else self.settings.get("refiner_switch") is not None
        return model_needs(
            self.models.get("base", DEFAULT_BASE),
            self.models.get("refiner", DEFAULT_REFINER) if switches else None,
            self.unet,
            decoder=self.settings.get("decoder") or None,
            conditions=self.conditions(self.placeholder_inputs()),
        )


def _input_ref(value: Any) -> str | None:
    """The input a setting or template field names (``"$face"`` -> ``"face"``), if it names one."""
    return value[1:] if isinstance(value, str) and value.startswith("$") else None


def _layout_ref(value: Any) -> bool:
    """Whether a template field names a region of the preset's layout (``"@left"``)."""
    return isinstance(value, str) and value.startswith("@")


def _preset_files() -> dict[str, Any]:
    return {p.name.removesuffix(".json"): p for p in resources.files(__name__).iterdir() if p.name.endswith(".json")}


def available_presets() -> list[str]:
    """The shipped presets' names."""
    return sorted(_preset_files())


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line: the value as JSON when it parses (``8``, ``[768, 1024]``, ``null``),
    else as text (``euler``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InvalidRequestError(f"--set takes KEY=VALUE (steps=8, face.scale=0.6), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def load_preset(name: str, check: bool = True) -> Preset:
    """A shipped preset by name, or a preset file by path; checked completely (unknown keys, types, templates) —
    ``check=False`` skips the checks that need the condition classes (and torch): for listing presets."""
    files = _preset_files()
    if name in files:
        origin, text = f"presets/{name}.json", files[name].read_text()
    elif name.endswith(".json") or Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        if not path.is_file():
            raise InvalidRequestError(f"preset file {path} does not exist")
        origin, text, name = str(path), path.read_text(), path.stem
    else:
        close = difflib.get_close_matches(name, files, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidRequestError(
            f"unknown preset {name!r}{hint}: available are {', '.join(sorted(files))}, or give a preset file's path"
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PresetError(f"preset {name} ({origin}): not valid JSON ({exc})") from None
    return _from_data(name, origin, data, check)


def _expect(ok: bool, preset: str, origin: str, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise PresetError(f"preset {preset} ({origin}): {key} must be {expected}, got {value!r:.80}")


def _from_data(name: str, origin: str, data: Any, check: bool = True) -> Preset:
    """Check a preset's data through and through, then build it: every error names the file and the key."""
    _expect(isinstance(data, dict), name, origin, "the file", "a JSON object", data)
    message = unknown_keys(data, PRESET_KEYS, f"preset {name} ({origin})")
    if message:
        raise PresetError(message)
    description = data.get("description")
    _expect(isinstance(description, str) and bool(description), name, origin, "description", "a text", description)
    models = data.get("models", {})
    _expect(isinstance(models, dict), name, origin, "models", "an object (base, refiner, unet, weight_storage)",
            models)  # fmt: skip
    message = unknown_keys(models, MODEL_KEYS, f"preset {name} ({origin}) models")
    if message:
        raise PresetError(message)
    for key in ("base", "refiner"):
        if key in models:
            _expect(isinstance(models[key], str), name, origin, f"models.{key}", "a hub id or path", models[key])
    if "weight_storage" in models:
        from ..weights.storage import WEIGHT_STORAGE

        _expect(models["weight_storage"] in WEIGHT_STORAGE, name, origin, "models.weight_storage",
                f"one of {', '.join(WEIGHT_STORAGE)}", models["weight_storage"])  # fmt: skip
    unet = models.get("unet")
    if unet is not None:
        ok = (
            isinstance(unet, dict)
            and set(unet) == {"source", "weight_name"}
            and all(isinstance(v, str) for v in unet.values())
        )
        _expect(ok, name, origin, "models.unet", '{"source": REPO, "weight_name": FILE}', unet)
    inputs = _inputs(name, origin, data.get("inputs", {}))
    templates = data.get("conditions", {})
    _expect(isinstance(templates, dict), name, origin, "conditions", "an object of named condition templates",
            templates)  # fmt: skip
    loras = data.get("loras", [])
    _expect(isinstance(loras, list) and all(isinstance(x, dict) for x in loras), name, origin, "loras",
            "a list of LoRA settings objects", loras)  # fmt: skip
    settings = {k: data[k] for k in REQUEST_KEYS if k in data}
    layout = _layout(name, origin, data.get("layout", {}), inputs)
    preset = Preset(name, description, settings, dict(models), tuple(loras), inputs, dict(templates), origin, data,
                    layout)  # fmt: skip
    if check:
        _check_deep(preset)
    return preset


def _inputs(name: str, origin: str, raw: Any) -> dict[str, PresetInput]:
    _expect(isinstance(raw, dict), name, origin, "inputs", "an object of named inputs", raw)
    out = {}
    for key, spec in raw.items():
        _expect(isinstance(spec, dict), name, origin, f"inputs.{key}", "an object (help, required, many)", spec)
        message = unknown_keys(spec, INPUT_KEYS, f"preset {name} ({origin}) inputs.{key}")
        if message:
            raise PresetError(message)
        _expect(isinstance(spec.get("help"), str), name, origin, f"inputs.{key}.help", "a text", spec.get("help"))
        for flag in ("required", "many", "text"):
            _expect(isinstance(spec.get(flag, False), bool), name, origin, f"inputs.{key}.{flag}", "true or false",
                    spec.get(flag))  # fmt: skip
        out[key] = PresetInput(key, spec["help"], spec.get("required", False), spec.get("many", False),
                               spec.get("text", False))  # fmt: skip
        _expect(not (out[key].many and out[key].text), name, origin, f"inputs.{key}", "a text or many files", spec)
    return out


def _layout(name: str, origin: str, raw: Any, inputs: Mapping[str, PresetInput]) -> dict[str, Mapping[str, Any]]:
    """The preset's named regions: each a ``box`` of fractions and, optionally, the ``input`` of a mask that replaces
    it."""
    _expect(isinstance(raw, dict), name, origin, "layout", "an object of named regions", raw)
    for key, region in raw.items():
        _expect(isinstance(region, dict), name, origin, f"layout.{key}", "an object (box, input)", region)
        message = unknown_keys(region, LAYOUT_KEYS, f"preset {name} ({origin}) layout.{key}")
        if message:
            raise PresetError(message)
        box = region.get("box")
        ok = (
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        )  # fmt: skip
        _expect(ok, name, origin, f"layout.{key}.box", "[x0, y0, x1, y1] fractions with x0 < x1, y0 < y1", box)
        mask = region.get("input")
        if mask is not None:
            spec = inputs.get(mask) if isinstance(mask, str) else None
            _expect(spec is not None and not spec.many and not spec.text, name, origin, f"layout.{key}.input",
                    "a declared input of one mask image", mask)  # fmt: skip
    return dict(raw)


def _check_deep(preset: Preset) -> None:
    """The checks that need the real classes: each template and LoRA builds, the settings make a valid request."""
    from ..adapters import CONDITION_KINDS, condition_class
    from ..adapters.lora import LoRA
    from ..passes.request import GenerationRequest

    for name, template in preset.templates.items():
        key = f"conditions.{name}"
        if not isinstance(template, dict) or template.get("kind") not in CONDITION_KINDS:
            kind = template.get("kind") if isinstance(template, dict) else template
            raise preset._fail(f"{key}.kind", f"must be one of {', '.join(sorted(CONDITION_KINDS))}, got {kind!r}")
        cls = condition_class(template["kind"])
        known = [f.name for f in fields(cls) if f.init]
        message = unknown_keys(set(template) - {"kind"}, known, f"{key} ({template['kind']})")
        if message:
            raise preset._fail(key, message)
        for field_name, value in template.items():
            if isinstance(value, str) and value.startswith("$") and value[1:] not in preset.inputs:
                declared = ", ".join(preset.inputs) or "none"
                raise preset._fail(f"{key}.{field_name}", f"names no declared input {value!r} (inputs: {declared})")
            if _layout_ref(value) and value[1:] not in preset.layout:
                declared = ", ".join(preset.layout) or "none"
                raise preset._fail(f"{key}.{field_name}", f"names no region of the layout {value!r} ({declared})")
    for i, spec in enumerate(preset.loras):
        try:
            LoRA(**spec)
        except (TypeError, SdxlControlError) as exc:
            raise preset._fail(f"loras[{i}]", str(exc)) from None
    for key, value in preset.settings.items():
        ref = _input_ref(value)
        if ref is not None and (ref not in preset.inputs or preset.inputs[ref].many):
            raise preset._fail(key, f"names {value!r}, which is no declared input of one file")
    try:
        preset.conditions(preset.placeholder_inputs())
        from PIL import Image

        # An image of SDXL's size stands for each input a setting names: the settings are checked as a request.
        stand_in = Image.new("RGB", (1024, 1024), (128, 128, 128))
        filled = {k: stand_in if _input_ref(v) else v for k, v in preset.settings.items()}
        GenerationRequest("a preset check", **filled)
    except PresetError:
        raise
    except (TypeError, SdxlControlError) as exc:
        raise preset._fail("settings", str(exc)) from None
