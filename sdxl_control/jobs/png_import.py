"""Settings brought back from PNGs that A1111 (its ``parameters`` text) or ComfyUI (its ``prompt`` graph) wrote.

Everything that maps to a request is restored — prompt, negative prompt, LoRAs, steps, sampler and schedule, guidance,
seed, size, batch size, hires fix, refiner and its switch, emphasis (a ComfyUI prompt is read as ComfyUI reads it),
face detailer — and every other part is listed
in :attr:`Imported.unmapped` with the reason, never dropped silently: control images and face photos are not in a
PNG, and some settings have no equivalent here. A1111's and ComfyUI's noise differ from ours, so the same seed makes
another image.

Example:
    >>> imported = read_a1111("a fox <lora:add-detail-xl:0.6>\\nSteps: 20, Sampler: Euler a, CFG scale: 6, Seed: 3, Size: 1024x768")
    >>> imported.prompt, imported.settings["scheduler"], imported.settings["size"]
    ('a fox', 'euler_a_linspace', (1024, 768))
    >>> imported.conditions[0].source, imported.conditions[0].scale
    ('add-detail-xl', 0.6)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER
from ..base.errors import InputError, InvalidRequestError
from ..protocol.conditions import Condition
from ..records.infotext import A1111_UPSCALERS as WRITTEN_UPSCALERS
from .resolvers import Resolver
from .spec import JobSpec

__all__ = [
    "Imported", "read_a1111", "read_comfyui", "read_image_settings", "missing_loras", "split_infotext", "InfotextParts",
    "SettingsReader", "extra_networks",
]  # fmt: skip

# Checkpoint file names of the published SDXL models -> their hub ids, so a PNG made with them runs without a folder.
PUBLISHED_CHECKPOINTS = {
    "sd_xl_base_1.0": DEFAULT_BASE, "sd_xl_base_1.0_0.9vae": DEFAULT_BASE,
    "sd_xl_refiner_1.0": DEFAULT_REFINER, "sd_xl_refiner_1.0_0.9vae": DEFAULT_REFINER,
}  # fmt: skip
CONTROL_ADVICE = (
    "its control image is not in the PNG; give the photo with --edges, --depth or --pose (and the model with "
    "--edges-model and the like)"
)
NOISE_NOTE = "{tool}'s noise differs from ours: the same seed makes another image"
# A1111's "Hires upscaler" labels -> ours (the labels we write, and A1111's other names for the same modes); any other
# label names an upscaler model.
A1111_UPSCALERS = {label.casefold(): ours for ours, label in WRITTEN_UPSCALERS.items()} | {
    "latent (bilinear)": "latent", "none": "lanczos",
}  # fmt: skip
COMFYUI_LATENT_UPSCALES = {"bilinear": "latent", "bicubic": "latent-bicubic", "nearest-exact": "latent-nearest-exact"}
# A1111's settings line: ``Key: value`` items, a value quoted when it holds a comma.
# A node on a chain of a ComfyUI graph: (node id, class_type, inputs).
_Step = tuple[str, str, Mapping[str, Any]]
# A key is at most 80 characters (A1111's longest are ~30, "ADetailer denoising strength"): unbounded, a long line
# with no colon costs the regex quadratic time (80 kB: half a minute), and a PNG's text reaches 1 MiB.
_KEY = re.compile(r"\s*(\w[\w \-/]{1,80}):\s*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
# ``<`` ends a tag's name and weights: otherwise many unclosed ``<a:b`` cost quadratic time as above.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^:<>]+)((?::[^:<>]*)*)>")


@dataclass(frozen=True)
class Imported:
    """What a PNG of another tool asks for, as a request's settings, conditions and models, and what did not map.

    Example:
        >>> imported = read_comfyui(graph)                     # doctest: +SKIP
        >>> imported.unmapped                                  # doctest: +SKIP
        ('ControlNetApplyAdvanced (node 12): ControlNet canny.safetensors at strength 0.8: its control image is ...',)
    """

    tool: str
    prompt: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()
    models: Mapping[str, str | None] = field(default_factory=dict)
    unmapped: tuple[str, ...] = ()

    def under(self, spec: JobSpec) -> JobSpec:
        """``spec`` with this PNG's prompt, settings, conditions and models where ``spec`` gives none: what the user
        adds to an imported PNG wins.

        Example:
            >>> read_a1111("a fox\\nSteps: 20, CFG scale: 6, Seed: 3").under(JobSpec(settings={"steps": 8})).settings
            {'steps': 8, 'seed': 3, 'guidance': 6.0}
        """
        models = {**self.models, **{k: v for k, v in spec.models.items() if v}}
        settings = {**self.settings, **spec.settings}
        # A prompt the user gives replaces the PNG's for both stages: the refiner's own text went with the PNG's.
        for given, own in (
            (spec.prompt, "refiner_prompt"),
            (spec.settings.get("negative_prompt"), "refiner_negative_prompt"),
        ):
            if given and own not in spec.settings:
                settings.pop(own, None)
        return dataclasses.replace(
            spec,
            prompt=spec.prompt or self.prompt,
            settings=settings,
            conditions=(*self.conditions, *spec.conditions),
            models=models,
            recipe=None,
        )

    def report(self) -> str:
        """The parts that did not map, one per line, for a warning or the page's status."""
        return "\n".join(f"  {part}" for part in self.unmapped)


def read_image_settings(path: str | os.PathLike[str]) -> dict[str, Any] | Imported:
    """The sdxl-control recipe a PNG holds, or else what its A1111 ``parameters`` or ComfyUI ``prompt`` asks for;
    a PNG with none of these is refused, naming what was looked for."""
    from ..records.recipe import RECIPE_KEY, bounded_text, json_text, png_texts, read_recipe
    from .png_formats import read_fooocus, read_invokeai, read_ruinedfooocus, read_swarmui

    texts = png_texts(path)
    if RECIPE_KEY in texts:
        return read_recipe(path)
    try:
        if "parameters" in texts:
            text = bounded_text(texts["parameters"], f"{path}: its A1111 parameters")
            try:  # JSON where A1111 writes its text: Fooocus (its "fooocus" scheme) and SwarmUI write theirs there
                data = json_text(text, f"{path}: its parameters JSON") if text.lstrip().startswith("{") else None
            except InputError:  # not JSON: an A1111 prompt that starts with "{" (dynamic prompts' "{red|blue} car")
                data = None
            if data is None:
                return read_a1111(text)
            if isinstance(data, Mapping) and isinstance(data.get("sui_image_params"), Mapping):
                return read_swarmui(data)
            if isinstance(data, Mapping) and (texts.get("fooocus_scheme") == "fooocus" or "full_prompt" in data):
                return read_fooocus(data)
            if isinstance(data, Mapping) and data.get("software") == "RuinedFooocus":
                return read_ruinedfooocus(data)
            keys = ", ".join(sorted(map(str, data)))[:200] if isinstance(data, Mapping) else type(data).__name__
            raise InputError(
                f"its 'parameters' is JSON of no tool this reads (keys: {keys}); Fooocus's (with fooocus_scheme) "
                "SwarmUI's (sui_image_params) and RuinedFooocus's are read"
            )
        if "invokeai_metadata" in texts:
            data = json_text(texts["invokeai_metadata"], f"{path}: its InvokeAI metadata")
            if not isinstance(data, Mapping):
                raise InputError("its invokeai_metadata is not a JSON object")
            return read_invokeai(data)
        if "prompt" in texts:
            return read_comfyui(json_text(texts["prompt"], f"{path}: its ComfyUI prompt"))
        if "workflow" in texts:  # a workflow as the editor saves it, without the graph it ran (the prompt)
            from .comfy_workflow import workflow_graph

            return read_comfyui(workflow_graph(json_text(texts["workflow"], f"{path}: its ComfyUI workflow")))
    except InputError as exc:  # named by the file, once
        raise InputError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # A value its tool would not have written (a text where a number goes, a list where a name goes): the
        # metadata was edited by hand or made up, and is refused as such, not a crash.
        raise InputError(f"{path}: its metadata holds a value of the wrong kind ({exc!r})") from None
    found = f" (it holds {', '.join(sorted(texts))})" if texts else ""
    older = ""
    if "sd-metadata" in texts or "Dream" in texts:
        older = " InvokeAI 2's 'sd-metadata' and 'Dream' texts are not read (InvokeAI 3 and later write one that is)."
    elif str(texts.get("Software", "")).startswith("NovelAI"):
        older = " NovelAI's 'Comment' is not read (NovelAI's own models are not SDXL checkpoints)."
    raise InputError(
        f"{path} carries no settings this can read: no sdxl-control recipe, no A1111, Fooocus or SwarmUI "
        f"'parameters', no InvokeAI 'invokeai_metadata', no ComfyUI 'prompt' or 'workflow'{found}.{older}"
    )


def _lora(name: str, scale: float) -> Condition:
    from ..adapters.lora import LoRA

    return LoRA(name, scale=scale)


class SettingsReader:
    """Collects settings and the parts that did not map while a PNG's metadata (or a request in a tool's terms, as
    the A1111 server routes read theirs) is read.

    Example:
        >>> reader = SettingsReader("A1111")
        >>> extra_networks("a fox <lora:detail:0.5>", reader), reader.conditions[0].scale
        ('a fox', 0.5)
    """

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.settings: dict[str, Any] = {}
        self.conditions: list[Condition] = []
        self.models: dict[str, str | None] = {}
        self.unmapped: list[str] = []

    def skip(self, part: str, why: str) -> None:
        if f"{part}: {why}" not in self.unmapped:  # a node met on two chains (both prompts' clip) is said once
            self.unmapped.append(f"{part}: {why}")

    def model(self, role: str, name: str) -> None:
        stem = Path(name.strip()).stem if Path(name.strip()).suffix in (".safetensors", ".ckpt") else name.strip()
        self.models[role] = PUBLISHED_CHECKPOINTS.get(stem, name.strip())

    def scheduler(self, sampler: str, schedule: str | None, where: str, *, tool: str | None = None) -> None:
        """Restore a sampler and schedule as ``tool`` (default: this reader's; "ComfyUI custom" for SamplerCustom's
        sampler and sigmas nodes) names them, with that tool's meaning; one diffusers cannot run exactly is listed
        with the reason, and the default sampler is used. The steps and hires steps read so far choose whether the
        "simple" schedule is exact."""
        from ..base.samplers import tool_scheduler

        steps = [int(self.settings[k]) for k in ("steps", "hires_steps") if self.settings.get(k)]
        name, why = tool_scheduler(tool or self.tool, sampler, schedule, steps)
        if name is None:
            self.skip(where, f"{why}; the default sampler is used")
            return
        self.settings["scheduler"] = name
        if timesteps := self.settings.get("timesteps"):  # a graph's own timesteps (SDXL Turbo's), if it takes them
            from ..protocol.schedule import check_schedule

            try:
                check_schedule(name, {}, timesteps)
            except InvalidRequestError as exc:
                del self.settings["timesteps"]
                self.skip(where, f"{exc}: its own spacing of {self.settings.get('steps')} steps is used")

    def done(self, prompt: str) -> Imported:
        self.unmapped.append(NOISE_NOTE.format(tool=self.tool))
        return Imported(self.tool, prompt, self.settings, tuple(self.conditions), self.models, tuple(self.unmapped))


@dataclass(frozen=True)
class InfotextParts:
    """An A1111 ``parameters`` text in its parts, as A1111 splits it: the prompt, the negative prompt (``None`` where
    the text has no "Negative prompt:" line), the settings line's ``Key: value`` items (unquoted), and the fragments
    of that line that are no item.

    Example:
        >>> split_infotext("a fox\\nNegative prompt: blur\\nSteps: 20, Seed: 3, Size: 64x64").items["Seed"]
        '3'
    """

    prompt: str
    negative: str | None
    items: Mapping[str, str]
    stray: tuple[str, ...] = ()


def split_infotext(text: str) -> InfotextParts:
    """``text`` (an A1111 ``parameters`` text) in its parts (see :class:`InfotextParts`)."""
    lines = text.strip().split("\n")
    items: dict[str, str] = {}
    found, stray = _settings_items(lines[-1])
    if len(found) < 3 and (start := _settings_start(lines)) is not None:
        # A quoted value with line breaks in it (some extensions write them raw): the settings are the lines from the
        # last that starts with "Steps:" on, not a negative prompt that swallows them.
        found, stray = _settings_items("\n".join(lines[start:]))
        del lines[start + 1 :]
    if len(found) >= 3:
        lines.pop()
        for key, value in found:
            items[key] = _unquoted(value)
    else:
        stray = []
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.strip().startswith("Negative prompt:"):
            negative_lines = [line.strip()[len("Negative prompt:") :].strip()]
        elif negative_lines is not None:
            negative_lines.append(line.strip())
        else:
            prompt_lines.append(line.strip())
    negative = "\n".join(negative_lines) if negative_lines is not None else None
    return InfotextParts("\n".join(prompt_lines), negative, items, tuple(stray))


def read_a1111(text: str) -> Imported:
    """The request an A1111 ``parameters`` text describes (see the module)."""
    parts = split_infotext(text)
    reader = SettingsReader("A1111")
    for fragment in parts.stray:
        reader.skip(fragment, "text in the settings line that is no 'Key: value' item; not read")
    prompt = extra_networks(parts.prompt, reader)
    if parts.negative is not None:
        reader.settings["negative_prompt"] = parts.negative
    items = dict(parts.items)
    couple = {k: items.pop(k) for k in list(items) if k.startswith("forge_couple")}
    _a1111_items(items, reader)
    if couple:  # Forge Couple's regions: lines of the prompt, boxed by the image's size
        from .png_guidance import read_forge_couple

        _taken, prompt, regions = read_forge_couple(prompt, couple, reader.settings.get("size"), reader.skip)
        reader.conditions.extend(regions)
    return reader.done(prompt)


def _settings_start(lines: list[str]) -> int | None:
    """The line where a settings block of several lines starts: the last line beginning with ``Steps:`` (A1111 writes
    it first), when the lines from it on read as settings; ``None`` where there is none."""
    for start in range(len(lines) - 1, 0, -1):
        if lines[start].startswith("Steps: "):
            return start if len(_settings_items("\n".join(lines[start:]))[0]) >= 3 else None
    return None


def _settings_items(line: str) -> tuple[list[tuple[str, str]], list[str]]:
    """A1111's settings line as (key, value) items, read as A1111 reads them (``re_param``: a value is quoted JSON or
    runs to the next comma), and the text between items that is none, which A1111 skips without a word (listed here).

    One difference: a value that opens a JSON array or object unquoted (as some extensions write one) runs to its
    closing bracket, past the commas inside it, where A1111 cuts it at its first comma and reads the rest as other
    items or drops it."""
    items: list[tuple[str, str]] = []
    stray: list[str] = []
    pos, end, brackets = 0, len(line), True
    while pos < end:
        key = _KEY.match(line, pos)
        if key is None:
            stop = _next_comma(line, pos)
            if line[pos:stop].strip():
                stray.append(line[pos:stop].strip())
            pos = stop + 1
            continue
        start, stop = key.end(), -1
        if start < end and line[start] == '"' and (quoted := _QUOTED.match(line, start)) is not None:
            stop = quoted.end()
        elif brackets and start < end and line[start] in "[{":
            close = _closing_bracket(line, start)
            brackets = close is not None  # an unclosed one is not looked for again: the line stays linear to read
            stop = -1 if close is None else close + 1
        if stop < 0 or line[stop : _next_comma(line, stop)].strip():
            stop = _next_comma(line, start)  # as A1111: up to the next comma
        items.append((key.group(1), line[start:stop]))
        pos = _next_comma(line, stop) + 1
    return items, stray


def _next_comma(line: str, pos: int) -> int:
    found = line.find(",", pos)
    return len(line) if found < 0 else found


def _closing_bracket(line: str, start: int) -> int | None:
    """Where the JSON array or object opening at ``start`` closes (brackets inside strings not counted); ``None``
    where it does not close properly."""
    stack: list[str] = []
    in_string = escaped = False
    for i in range(start, len(line)):
        char = line[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            stack.append("]" if char == "[" else "}")
        elif char in "]}":
            if stack.pop() != char:
                return None
            if not stack:
                return i
    return None


def _unquoted(value: str) -> str:
    """A settings value as A1111 reads it: a quoted one is JSON, kept as written where it is not valid JSON."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def extra_networks(prompt: str, reader: SettingsReader) -> str:
    """The prompt without A1111's ``<lora:name:weight>`` tags, each made a LoRA (others listed as not mapped)."""

    def take(match: re.Match[str]) -> str:
        kind, name, rest = match.group(1), match.group(2), match.group(3)
        numbers = [p for p in rest.split(":")[1:]]
        if kind.lower() in ("lora", "lyco"):
            try:
                scales = [float(n) for n in numbers] or [1.0]
            except ValueError:
                reader.skip(match.group(0), "its weight is not a number")
                return ""
            reader.conditions.append(_lora(name, scales[0]))
            if len(scales) > 1 and scales[1] != scales[0]:
                reader.skip(match.group(0), f"its text-encoder weight {scales[1]:g} differs: {scales[0]:g} is used")
        else:
            reader.skip(match.group(0), f"{kind} networks have no equivalent here")
        return ""

    return re.sub(r"\s{2,}", " ", _EXTRA_NETWORK.sub(take, prompt)).strip()


def _a1111_items(items: dict[str, str], reader: SettingsReader) -> None:
    settings = reader.settings
    taken = set()

    def get(key: str) -> str | None:
        taken.add(key)
        return items.get(key)

    def number(key: str, kind: type = float) -> Any:
        value = get(key)
        if value is None:
            return None
        try:
            if kind is int and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                return int(value)  # exactly: a 64-bit seed is beyond a float's 53 bits
            return kind(float(value)) if kind is int else kind(value)
        except ValueError:
            reader.skip(f"{key}: {value}", "not a number")
            return None

    for key, name in (("Steps", "steps"), ("Seed", "seed"), ("Hires steps", "hires_steps")):
        if (value := number(key, int)) is not None and (value or name != "hires_steps"):
            settings[name] = value
    if (seed := settings.get("seed", 0)) < 0:
        del settings["seed"]
        if seed == -1:  # A1111's "draw one", which a made image's text does not carry
            reader.skip("Seed: -1", "a random seed: give --seed")
        elif seed >= -(2**63):
            # Some installs write the seed as a signed 64-bit number; torch's manual_seed reads s < 0 as 2**64 + s,
            # so this is the seed that drew the image's noise.
            settings["seed"] = 2**64 + seed
        else:
            reader.skip(f"Seed: {seed}", "beyond a 64-bit seed")
    if (guidance := number("CFG scale")) is not None:
        settings["guidance"] = guidance
    if (size := get("Size")) is not None:
        if (match := re.fullmatch(r"\s*(\d+)x(\d+)\s*", size)) is not None:
            settings["size"] = (int(match[1]), int(match[2]))
        else:
            reader.skip(f"Size: {size}", "not a size (WIDTHxHEIGHT)")
    if (sampler := get("Sampler")) is not None:
        schedule = get("Schedule type")
        reader.scheduler(
            sampler, schedule, f"Sampler: {sampler}" + (f", Schedule type: {schedule}" if schedule else "")
        )
    if (model := get("Model")) is not None:
        reader.model("base", model)
    if (refiner := get("Refiner")) is not None:
        reader.model("refiner", re.sub(r"\s*\[[0-9a-f]+\]$", "", refiner))
        settings["refiner_switch"] = number("Refiner switch at") or 0.8
        for key, name in (("Refiner prompt", "refiner_prompt"), ("Refiner negative prompt", "refiner_negative_prompt")):
            if (text := get(key)) is not None:  # as parameters_text writes a recipe's refiner prompts
                settings[name] = text
    strength = number("Denoising strength")
    if (scale := number("Hires upscale")) is not None:
        settings["hires_scale"] = scale
        if strength is not None:
            settings["hires_strength"] = strength
        if (label := get("Hires upscaler")) is not None:
            settings["upscaler"] = A1111_UPSCALERS.get(label.casefold(), label)
    elif strength is not None:
        reader.skip(f"Denoising strength: {strength:g}", "an img2img image is not in the PNG; give --init-image "
                    f"and --strength {strength:g}")  # fmt: skip
    emphasis = get("Emphasis")
    if emphasis is not None and emphasis.casefold() == "none":
        settings["emphasis"] = "off"
    elif emphasis is not None and emphasis.casefold() != "original":
        reader.skip(f"Emphasis: {emphasis}", "A1111's 'Original' emphasis is used")
    if (skip := number("Clip skip", int)) is not None:
        _clip_skip(skip, items.get("Version", ""), reader)
    if (hashes := get("TI hashes")) is not None:  # A1111's "name: hash, ...": the embeddings the prompts used
        names = [item.rpartition(":")[0].strip() for item in hashes.split(",") if ":" in item]
        reader.settings["embeddings"] = {name: name for name in names if name}
    if (pad := get("Pad conds")) is not None and pad.strip().casefold() == "true":
        settings["pad_conds"] = True  # A1111's "Pad prompt/negative prompt" (off: separate UNet calls)
    timelines = get("Old prompt editing timelines")
    if timelines is not None and timelines.strip().casefold() == "true":
        reader.skip("Old prompt editing timelines: True", "prompt editing is read with A1111's timelines since 1.6")
    adetailer = [k for k in items if k.startswith("ADetailer")]
    if adetailer:
        settings["detailer"] = True
        taken.update(adetailer)
        details = [k for k in adetailer if k not in ("ADetailer model", "ADetailer version")]
        if details:
            reader.skip(", ".join(f"{k}: {items[k]}" for k in details), "ADetailer's defaults are used")
        if "ADetailer model" in items:
            reader.skip(
                f"ADetailer model: {items['ADetailer model']}", "the detailer finds faces with its own detector"
            )
        if "ADetailer version" in items:
            reader.skip(f"ADetailer version: {items['ADetailer version']}", "not checked")
    from .png_guidance import read_a1111_guidance

    guided, conditions = read_a1111_guidance(items, settings, reader.skip)
    taken |= guided
    reader.conditions.extend(conditions)
    for key, value in items.items():
        if key in taken:
            continue
        if key.startswith("ControlNet"):
            reader.skip(f"{key} ({value})", CONTROL_ADVICE)
        elif key in ("Model hash", "Lora hashes", "VAE hash", "Version", "Refiner switch at"):
            reader.skip(f"{key}: {value}", "not checked")
        else:
            reader.skip(f"{key}: {value}", "no equivalent here")


# A hires sampler's own settings, listed where they are not the first sampler's (its seed draws the noise it adds).
_HIRES_OWN = ("seed", "noise_seed", "cfg", "sampler_name", "scheduler")
# ComfyUI's sampler nodes: their own settings, or (custom sampling) settings from the nodes they are built of.
_COMFYUI_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
_CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader", "unCLIPCheckpointLoader")
# Custom sampling's sampler nodes -> the sampler name and its settings' defaults (comfy_extras/nodes_custom_sampler.py).
_SAMPLER_NODES: dict[str, tuple[str, dict[str, Any]]] = {
    "SamplerEulerAncestral": ("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerDPMPP_2M_SDE": ("dpmpp_2m_sde", {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0,
                                             "noise_device": "gpu"}),
    "SamplerDPMPP_3M_SDE": ("dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.0, "noise_device": "gpu"}),
    "SamplerDPMPP_SDE": ("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise_device": "gpu"}),
    "SamplerDPMPP_2S_Ancestral": ("dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerLMS": ("lms", {"order": 4}),
}  # fmt: skip
# Custom sampling's sigmas nodes -> the schedule (ComfyUI's scheduler name, A1111's label for Align Your Steps).
_SIGMA_NODES = {
    "KarrasScheduler": "karras", "ExponentialScheduler": "exponential", "BetaSamplingScheduler": "beta",
    "AlignYourStepsScheduler": "Align Your Steps", "BasicScheduler": "normal", "SDTurboScheduler": "normal",
}  # fmt: skip
# Their settings' defaults, ComfyUI's (SD's sigma range, 14.614642 to 0.0291675, which SDXL shares).
_SIGMA_DEFAULTS = {
    "KarrasScheduler": {"sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0},
    "ExponentialScheduler": {"sigma_max": 14.614642, "sigma_min": 0.0291675},
    "BetaSamplingScheduler": {"alpha": 0.6, "beta": 0.6},
}


def _clip_skip(skip: int, version: str, reader: SettingsReader) -> None:
    """A1111's ``Clip skip`` as the tool that wrote it reads it for SDXL: Forge (``Version: f...``) reads both
    encoders' ``max(N, 2)``-th layer from the end, which is our ``clip_skip`` N from 3 on; A1111 reads SDXL's
    penultimate layers whatever it says, unless its "Clip skip SDXL" option (CLIP-L only), which the text does not
    record."""
    if re.match(r"f\d", version.strip()):
        if skip >= 3:
            reader.settings["clip_skip"] = skip
    elif skip > 1:
        reader.skip(f"Clip skip: {skip}", "A1111 reads SDXL's penultimate layers whatever it says (unless its 'Clip "
                    "skip SDXL' option, CLIP-L only, not recorded); not applied, as in A1111")  # fmt: skip


# ComfyUI's node types that only carry what was made to the output.
_COMFYUI_OUTPUTS = {"VAEDecode", "SaveImage", "PreviewImage", "VAEDecodeTiled"}


def read_comfyui(graph: Any) -> Imported:
    """The request a ComfyUI ``prompt`` graph (its API form: node id -> class_type and inputs) describes: its first
    sampler's prompt, model chain (checkpoint, LoRAs), latent size and settings; a second sampler fed its latent,
    upscaled, as the hires fix, or (``KSamplerAdvanced`` from the step the first ended at) as the refiner."""
    if not isinstance(graph, Mapping) or not all(isinstance(n, Mapping) and "class_type" in n for n in graph.values()):
        raise InputError("a ComfyUI prompt graph maps node ids to nodes with a class_type and inputs")
    try:
        return _ComfyGraph(graph).read()
    except InputError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        # A value ComfyUI would have refused to run (a text where a number goes, a list where a name goes, 0 steps):
        # the graph was edited by hand or made up, and is refused as such, not a crash.
        raise InputError(f"the ComfyUI prompt graph holds a value of the wrong kind ({exc})") from None


class _ComfyGraph:
    def __init__(self, graph: Mapping[str, Any]) -> None:
        self.nodes = {str(k): v for k, v in graph.items()}
        self.seen: set[str] = set()
        self.reader = SettingsReader("ComfyUI")
        self.prompts: tuple[str | None, str | None] = ("", "")  # the first sampler's (None: zeroed on purpose)
        self.links: dict[str, Any] = {}  # the first sampler's model and conditioning links
        self.reader.settings["emphasis"] = "comfyui"  # its prompts were weighted and cut as ComfyUI reads them

    def node(self, link: Any) -> tuple[str, Mapping[str, Any]] | None:
        if isinstance(link, list) and link and str(link[0]) in self.nodes:
            return str(link[0]), self.nodes[str(link[0])]
        return None

    def inputs(self, node_id: str) -> Mapping[str, Any]:
        return self.nodes[node_id].get("inputs", {})

    def skip(self, node_id: str, why: str) -> None:
        self.reader.skip(f"{self.nodes[node_id]['class_type']} (node {node_id})", why)

    def name(self, node_id: str) -> str:
        return f"node {node_id} ({self.nodes[node_id]['class_type']})"

    def read(self) -> Imported:
        # In node-id order: a graph that starts several samplers is read from the same one however its nodes are
        # listed (a workflow lists them in another order than the graph ComfyUI ran).
        samplers = sorted((k for k, n in self.nodes.items() if n["class_type"] in _COMFYUI_SAMPLERS), key=_node_order)
        if not samplers:
            groups = sorted({str(n["class_type"]) for n in self.nodes.values() if "/" in str(n["class_type"])})
            inside = f"; its group nodes ({', '.join(groups)}) are not opened here" if groups else ""
            raise InputError(
                "the ComfyUI graph has no sampler node (KSampler, KSamplerAdvanced, SamplerCustom or "
                f"SamplerCustomAdvanced): nothing to restore{inside}"
            )
        first = next((k for k in samplers if not any(self._feeds(s, k) for s in samplers if s != k)), None)
        if first is None:  # each sampler is fed by another: a loop, which ComfyUI refuses to run too
            raise InputError(
                f"the ComfyUI graph's samplers feed each other's latents in a loop ({', '.join(map(self.name, samplers))}):"
                " none starts the image; ComfyUI refuses such a graph too"
            )
        prompt = self._sampler(first)
        for later in samplers:
            if later != first:
                self._second(first, later)
        for node_id, node in self.nodes.items():
            if node_id not in self.seen and node["class_type"] not in _COMFYUI_OUTPUTS:
                self.skip(node_id, "not read (no equivalent here, or not on the sampler's path)")
        return self.reader.done(prompt)

    def _feeds(self, source: str, sampler: str) -> bool:
        """Whether ``source``'s latent reaches ``sampler``'s (through upscales)."""
        visited: list[str] = []
        found = self.node(self.inputs(sampler).get("latent_image"))
        while found is not None:
            node_id, node = found
            if node_id == source:
                return True
            self._unvisited(node_id, visited, sampler)
            found = self.node(node.get("inputs", {}).get("samples"))
        return False

    def _unvisited(self, node_id: str, visited: list[str], start: str) -> None:
        """Note ``node_id`` as met on a chain up from ``start``, refusing a node met twice: the links form a cycle,
        which ComfyUI refuses to run, and which a walk without this record would follow forever. The record also
        bounds a chain's length by the graph's node count."""
        if node_id in visited:
            cycle = [*visited[visited.index(node_id) :], node_id]
            raise InputError(
                f"the ComfyUI graph's links form a cycle, met going up from {self.name(start)}: "
                f"{' -> '.join(map(self.name, cycle))}; ComfyUI refuses such a graph too"
            )
        visited.append(node_id)

    def _sampler(self, node_id: str) -> str:
        self.seen.add(node_id)
        values, settings = self.inputs(node_id), self.reader.settings
        kind = self.nodes[node_id]["class_type"]
        advanced = kind == "KSamplerAdvanced"
        if kind in ("SamplerCustom", "SamplerCustomAdvanced"):
            model, positive, negative_link = self._custom(node_id)
        else:
            settings["seed"] = int(values.get("noise_seed" if advanced else "seed", 0))
            settings["steps"] = int(values.get("steps", 20))
            settings["guidance"] = float(values.get("cfg", 8.0))
            self.reader.scheduler(str(values.get("sampler_name", "euler")), str(values.get("scheduler", "normal")),
                                  f"{kind} (node {node_id})")  # fmt: skip
            if not advanced and float(values.get("denoise", 1.0)) < 1.0:
                self._denoise(node_id, values["denoise"])
            model, positive, negative_link = values.get("model"), values.get("positive"), values.get("negative")
        if self.node(model) is None:  # a link to a muted or absent node, which ComfyUI refuses to run
            self.skip(node_id, "no model reaches it (its loader muted or absent): the default base model is used")
        self._models(model, "base")
        prompt = self._conditioning(positive, "prompt")
        negative = self._conditioning(negative_link, "negative prompt") if negative_link is not None else ""
        if negative:
            settings["negative_prompt"] = negative
        # A negative zeroed on purpose (ConditioningZeroOut) is what SDXL's pipelines use where no negative is given.
        self.prompts = (prompt, negative)
        self.links = {"model": model, "positive": positive, "negative": negative_link}
        if prompt is None:
            prompt = ""
        latent = self.node(values.get("latent_image"))
        if latent is not None and latent[1]["class_type"] == "EmptyLatentImage":
            self.seen.add(latent[0])
            size = latent[1].get("inputs", {})
            settings["size"] = (int(size.get("width", 1024)), int(size.get("height", 1024)))
            if int(size.get("batch_size", 1)) > 1:
                settings["num_images"] = int(size["batch_size"])
        return self._regions(prompt)

    def _regions(self, prompt: str) -> str:
        """The first sampler's prompt with its regions (ComfyUI's ConditioningSetMask / SetArea chains combined), as
        ``Region`` conditions; the base prompt is the chain without an area or mask."""
        from .png_guidance import COMFYUI_REGION_NODES, comfyui_regions

        size = self.reader.settings.get("size", (1024, 1024))
        found = comfyui_regions(lambda link: self._walk(link, _conditioning_upstream), self.node,
                                self.links.get("positive"), size, self.skip, self.seen.add)  # fmt: skip
        negative = comfyui_regions(lambda link: self._walk(link, _conditioning_upstream), self.node,
                                   self.links.get("negative"), size, lambda *_: None, self.seen.add)  # fmt: skip
        if negative is not None:
            self.reader.skip("negative prompt", "its regions are not read (a region's own negative prompt is): the "
                             "first text of its chain is the negative prompt")  # fmt: skip
        if found is None:
            return prompt
        base, regions = found
        # The walk of the prompt's first chain said its region nodes were not read: they are, now.
        regional = tuple(f"{node['class_type']} (node {node_id}): changes the prompt in a way not read here"
                         for node_id, node in self.nodes.items()
                         if node["class_type"] in (*COMFYUI_REGION_NODES, "ConditioningCombine"))  # fmt: skip
        self.reader.unmapped = [line for line in self.reader.unmapped if not line.startswith(regional)]
        self.reader.conditions.extend(regions)
        return base or ""

    def _second(self, first: str, node_id: str) -> None:
        self.seen.add(node_id)
        values, settings = self.inputs(node_id), self.reader.settings
        latent = self.node(values.get("latent_image"))
        if latent is not None and latent[0] == first and self.nodes[node_id]["class_type"] == "KSamplerAdvanced":
            start, steps = int(values.get("start_at_step", 0)), int(values.get("steps", settings.get("steps", 20)))
            if steps < 1:
                raise InputError(f"{self.name(node_id)} has steps {steps}: a sampler runs at least 1")
            settings["refiner_switch"] = start / steps
            self._models(values.get("model"), "refiner")
            self._refiner_prompts(node_id, values)
            self._refiner_sampling(first, node_id)
            return
        upscaled = self.node(latent[1].get("inputs", {}).get("samples")) if latent is not None else None
        if (
            latent is not None
            and latent[1]["class_type"] in ("LatentUpscaleBy", "LatentUpscale")
            and (upscaled is None or upscaled[0] != first)
        ):
            self.skip(node_id, f"a second sampler whose latent is upscaled from another chain than {self.name(first)}'s "
                      f"(from {self.name(upscaled[0]) if upscaled else 'no node'}); not read as a hires fix")  # fmt: skip
            return
        if latent is not None and latent[1]["class_type"] in ("LatentUpscaleBy", "LatentUpscale"):
            self.seen.add(latent[0])
            upscale = latent[1].get("inputs", {})
            scale = upscale.get("scale_by") or self._upscale_scale(latent[0], upscale)
            if scale is None:
                self.skip(node_id, f"a second sampler after {self.name(latent[0])}, which is not read as a hires fix; "
                          "its settings are not restored")  # fmt: skip
                return
            settings["hires_scale"] = float(scale)
            settings["upscaler"] = COMFYUI_LATENT_UPSCALES.get(str(upscale.get("upscale_method")), "latent")
            settings["hires_steps"] = int(values.get("steps", settings.get("steps", 20)))
            settings["hires_strength"] = float(values.get("denoise", 0.5))
            self._hires_inputs(first, node_id)
            self._same_sampling(first, node_id, _HIRES_OWN)
            return
        if latent is not None and latent[1]["class_type"] == "VAEEncode" and self._pixel_hires(first, latent[0]):
            settings["hires_steps"] = int(values.get("steps", settings.get("steps", 20)))
            settings["hires_strength"] = float(values.get("denoise", 0.5))
            self._hires_inputs(first, node_id)
            self._same_sampling(first, node_id, _HIRES_OWN)
            return
        self.skip(node_id, "a second sampler that is neither a refiner nor a hires fix of the first's image; not read")

    def _pixel_hires(self, first: str, encode: str) -> bool:
        """A hires fix in pixels: the first sampler's image decoded, enlarged by an upscaler model
        (``ImageUpscaleWithModel``) and/or resized (``ImageScale``, ``ImageScaleBy``), encoded again. Its scale and
        upscaler restored where the chain is that; ``False`` (nothing read) where it is another."""
        chain: dict[str, tuple[str, Mapping[str, Any]]] = {}
        found = self.node(self.inputs(encode).get("pixels"))
        for kind in ("ImageScale", "ImageScaleBy", "ImageUpscaleWithModel", "VAEDecode"):
            if found is not None and found[1]["class_type"] == kind:
                chain[kind] = found
                found = self.node(found[1].get("inputs", {}).get("samples" if kind == "VAEDecode" else "image"))
        decode = chain.get("VAEDecode")
        decoded = self.node(decode[1].get("inputs", {}).get("samples")) if decode is not None else None
        resized = {"ImageScale", "ImageScaleBy", "ImageUpscaleWithModel"} & chain.keys()
        if decoded is None or decoded[0] != first or not resized:
            return False
        resize = chain.get("ImageScale") or chain.get("ImageScaleBy")
        if resize is None:
            self.skip(chain["ImageUpscaleWithModel"][0], "an upscaler model's own factor is not known here: no hires "
                      "scale read")  # fmt: skip
            return False
        values = resize[1].get("inputs", {})
        scale = (
            values.get("scale_by")
            if resize[1]["class_type"] == "ImageScaleBy"
            else self._upscale_scale(resize[0], values)
        )
        if scale is None:
            return False
        self.seen.update({encode, *(node_id for node_id, _ in chain.values())})
        settings = self.reader.settings
        settings["hires_scale"] = float(scale)
        upscaler = chain.get("ImageUpscaleWithModel")
        loader = self.node(upscaler[1].get("inputs", {}).get("upscale_model")) if upscaler else None
        if loader is not None:
            self.seen.add(loader[0])
            settings["upscaler"] = str(loader[1].get("inputs", {}).get("model_name"))
        else:
            settings["upscaler"] = "lanczos"
        if str(values.get("upscale_method", "lanczos")) != "lanczos":
            self.skip(resize[0], f"its resize method {values['upscale_method']}: Lanczos resizes here")
        return True

    def _denoise(self, node_id: str, denoise: Any) -> None:
        self.skip(node_id, f"denoise {denoise}: an img2img image is not in the PNG; give --init-image and --strength "
                  f"{denoise}")  # fmt: skip

    def _input(self, link: Any) -> tuple[str, str, Mapping[str, Any]] | None:
        """The node a link comes from (id, class_type, inputs), marked read."""
        found = self.node(link)
        if found is None:
            return None
        self.seen.add(found[0])
        return found[0], str(found[1]["class_type"]), found[1].get("inputs", {})

    def _custom(self, node_id: str) -> tuple[Any, Any, Any]:
        """A custom sampler (``SamplerCustom``, ``SamplerCustomAdvanced``): its seed, guidance, sampler and schedule,
        read from the nodes it is built of; returns its (model, positive, negative) links (negative ``None``: no
        negative prompt at all, as ``BasicGuider`` runs)."""
        values, settings = self.inputs(node_id), self.reader.settings
        model = positive = negative = None
        if self.nodes[node_id]["class_type"] == "SamplerCustom":
            model, positive, negative = values.get("model"), values.get("positive"), values.get("negative")
            settings["guidance"] = float(values.get("cfg", 8.0))
            if values.get("add_noise", True) in (False, "disable"):
                self.skip(node_id, "add_noise off: it denoises a latent it is given, which is not in the PNG")
            else:
                settings["seed"] = int(values.get("noise_seed", 0))
        else:
            noise = self._input(values.get("noise"))
            if noise is not None and noise[1] == "RandomNoise":
                settings["seed"] = int(noise[2].get("noise_seed", 0))
            elif noise is not None:
                self.skip(noise[0], "no initial noise, or noise of its own: it denoises a latent not in the PNG")
            guider = self._input(values.get("guider"))
            if guider is not None and guider[1] == "CFGGuider":
                model, positive, negative = (guider[2].get(k) for k in ("model", "positive", "negative"))
                settings["guidance"] = float(guider[2].get("cfg", 8.0))
            elif guider is not None and guider[1] == "BasicGuider":
                # One model call per step on the prompt alone: what guidance 1 runs here (no negative prompt).
                model, positive = guider[2].get("model"), guider[2].get("conditioning")
                settings["guidance"] = 1.0
            elif guider is not None:
                self.skip(guider[0], "a guider not read here (CFGGuider and BasicGuider are): its model and prompts "
                          "are not restored")  # fmt: skip
        sampler = self._input(values.get("sampler"))
        name = "euler"
        if sampler is not None and sampler[1] == "KSamplerSelect":
            name = str(sampler[2].get("sampler_name", "euler"))
        elif sampler is not None and sampler[1] in _SAMPLER_NODES:
            name, defaults = _SAMPLER_NODES[sampler[1]]
            if sampler[2].get("noise_device", "gpu") == "gpu" and "noise_device" in defaults:
                name += "_gpu"
            changed = {
                k: v for k, v in sampler[2].items() if k in defaults and k != "noise_device" and v != defaults[k]
            }
            if changed:
                self.skip(sampler[0], f"{', '.join(f'{k} {v}' for k, v in changed.items())}: {name} runs with its "
                          "defaults here")  # fmt: skip
        elif sampler is not None:
            self.skip(sampler[0], "a sampler node not read here: euler is used")
        self._sigmas(values.get("sigmas"), name)
        return model, positive, negative

    def _sigmas(self, link: Any, sampler: str) -> None:
        """The steps and schedule of a custom sampler's sigmas node."""
        settings = self.reader.settings
        found = self._input(link)
        if found is None:
            self.reader.scheduler(sampler, "normal", f"sampler {sampler}", tool="ComfyUI custom")
            return
        node_id, kind, values = found
        where = f"{kind} (node {node_id})"
        settings["steps"] = int(values.get("steps", 20))
        schedule = _SIGMA_NODES.get(kind)
        if kind == "BasicScheduler":
            schedule = str(values.get("scheduler", "normal"))
        elif kind == "SDTurboScheduler":
            # ComfyUI's SDTurboScheduler: timesteps 999, 899, ... from 10 - int(10 * denoise), one per step.
            start = 10 - int(10 * float(values.get("denoise", 1.0)))
            steps = settings["steps"]
            if start == 0 and steps == 1:
                schedule = "simple"  # one step from timestep 999, as "simple" (trailing) places it
            else:
                settings["timesteps"] = tuple(999 - 100 * i for i in range(start, min(start + steps, 10)))
                schedule = "normal"
        elif kind == "AlignYourStepsScheduler" and str(values.get("model_type", "SDXL")) != "SDXL":
            self.skip(node_id, f"Align Your Steps for {values.get('model_type')} models, not SDXL: SDXL's is used")
        elif schedule is None:
            self.skip(node_id, "sigmas from a node not read here: its steps with the sampler's normal schedule")
            schedule = "normal"
        defaults = _SIGMA_DEFAULTS.get(kind, {})
        changed = {k: v for k, v in values.items() if k in defaults and float(v) != defaults[k]}
        if changed:
            self.skip(node_id, f"{', '.join(f'{k} {v}' for k, v in changed.items())}: the {schedule} schedule runs "
                      "over SDXL's own sigma range here")  # fmt: skip
        if kind != "SDTurboScheduler" and float(values.get("denoise", 1.0)) < 1.0:
            self._denoise(node_id, values["denoise"])
        self.reader.scheduler(sampler, schedule, where, tool="ComfyUI custom")

    def _refiner_prompts(self, node_id: str, values: Mapping[str, Any]) -> None:
        """The refiner's own prompts, kept where they differ from the base's."""
        settings = self.reader.settings
        for key, link_key, what, base in (
            ("refiner_prompt", "positive", "refiner prompt", self.prompts[0]),
            ("refiner_negative_prompt", "negative", "refiner negative prompt", self.prompts[1]),
        ):
            link = values.get(link_key)
            if link is None or link == self.links.get(link_key):
                continue
            text = self._conditioning(link, what)
            if text is None and base is not None:
                self.skip(node_id, f"its {what} is zeroed on purpose (ConditioningZeroOut): the base's is used")
            elif text is not None and text != (base or ""):
                settings[key] = text

    def _refiner_sampling(self, first: str, node_id: str) -> None:
        """A refiner sampler's own seed, guidance and sampler: listed where they differ from the first's, which the
        refiner runs with here."""
        adds_noise = self.inputs(node_id).get("add_noise") == "enable"  # else its seed draws nothing
        self._same_sampling(
            first, node_id, ("noise_seed", "cfg", "sampler_name", "scheduler")[0 if adds_noise else 1 :]
        )
        if adds_noise and int(self.inputs(node_id).get("start_at_step", 0)) > 0:
            self.skip(node_id, "add_noise enable: it adds fresh noise where the base stopped; not read")

    def _same_sampling(self, first: str, node_id: str, keys: tuple[str, ...]) -> None:
        """A later sampler's own settings (``keys``), listed where they differ from the first sampler's, which the
        refiner and the hires fix run with here."""
        mine, theirs = self.inputs(node_id), self.inputs(first)
        for key in keys:
            seeds = ("seed", "noise_seed")
            other = theirs.get(next((k for k in seeds if k in theirs), key) if key in seeds else key)
            if key in mine and other is not None and mine[key] != other:
                ours, theirs_shown = (f"{v:g}" if isinstance(v, float) else str(v) for v in (mine[key], other))
                self.skip(node_id, f"its {key} {ours} differs from the first sampler's {theirs_shown}, which is used")

    def _hires_inputs(self, first: str, node_id: str) -> None:
        """A hires sampler's model and prompts: the first sampler's here; listed where they are other ones."""
        values = self.inputs(node_id)
        for key, what in (("model", "model"), ("positive", "prompt"), ("negative", "negative prompt")):
            link = values.get(key)
            if link is None or link == self.links.get(key):
                continue
            if key == "model":
                self.skip(node_id, f"its model ({self._merged(link)}) differs from the first sampler's, which is used")
                continue
            text = self._conditioning(link, f"hires {what}")
            if text != self.prompts[key == "negative"]:
                self.skip(node_id, f"its {what} {text!r} differs from the first sampler's, which is used")

    def _upscale_scale(self, node_id: str, upscale: Mapping[str, Any]) -> float | None:
        """``LatentUpscale``'s width and height as one scale of the first size; listed where they are not one."""
        width, height = self.reader.settings.get("size", (1024, 1024))
        to_w, to_h = int(upscale.get("width", 0)), int(upscale.get("height", 0))
        # ComfyUI keeps the aspect where one side is 0.
        scales = [s for s in (to_w / width if to_w else None, to_h / height if to_h else None) if s is not None]
        if not scales or (len(scales) == 2 and abs(to_h - round(height * scales[0])) > 8):
            self.skip(node_id, f"{to_w}x{to_h} from {width}x{height}: not one scale of the image; no hires fix read")
            return None
        if str(upscale.get("crop", "disabled")) != "disabled":
            self.skip(node_id, f"crop {upscale['crop']}: the hires fix here keeps the whole image")
        return scales[0]

    def _walk(self, link: Any, upstream: Callable[[str, Mapping[str, Any], int], Any]) -> Iterator[_Step]:
        """The nodes up a chain from ``link``, each marked read; ``upstream(class_type, inputs, output)`` gives the
        link the chain goes on by (``output``: which of the node's outputs the chain came through)."""
        visited: list[str] = []
        start = self.node(link)
        while (found := self.node(link)) is not None:
            node_id, node = found
            self._unvisited(node_id, visited, start[0] if start else node_id)
            self.seen.add(node_id)
            values = node.get("inputs", {})
            yield node_id, node["class_type"], values
            link = upstream(node["class_type"], values, int(link[1]) if len(link) > 1 else 0)

    def _models(self, link: Any, role: str) -> None:
        from functools import partial

        from .png_guidance import COMFYUI_GUIDANCE_NODES, read_comfyui_patch

        for node_id, kind, values in self._walk(link, lambda kind, values, output: values.get("model")):
            if kind in _CHECKPOINT_LOADERS:
                self.reader.model(role, str(values.get("ckpt_name")))
                return
            if "model1" in values and "model2" in values:  # ModelMergeSimple and its kin
                merged = " and ".join(self._merged(values.get(k)) for k in ("model1", "model2"))
                ratio = f" (ratio {values['ratio']})" if "ratio" in values else ""
                self.skip(node_id, f"merges {merged}{ratio}: a merge made as it runs has no equivalent here, and the "
                          f"default {role} model is used: save the merge as a file (ComfyUI's CheckpointSave) and give "
                          f"it with --{role}")  # fmt: skip
                return
            if kind in ("LoraLoader", "LoraLoaderModelOnly"):
                scale = float(values.get("strength_model", 1.0))
                self.reader.conditions.append(_lora(str(values.get("lora_name")), scale))
                clip = values.get("strength_clip")
                if clip is not None and float(clip) != scale:
                    self.skip(node_id, f"strength_clip {clip} differs from strength_model: {scale:g} is used for both")
            elif kind in COMFYUI_GUIDANCE_NODES:
                condition = read_comfyui_patch(kind, values, role, self.reader.settings, partial(self.skip, node_id))
                if condition is not None:
                    self.reader.conditions.append(condition)
            else:
                self.skip(node_id, _MODEL_PATCHES.get(kind, "changes the model in a way not read here"))

    def _merged(self, link: Any) -> str:
        """The checkpoint (and the LoRAs on the way) one input of a merge comes from, its nodes marked read."""
        parts: list[str] = []
        for _node_id, kind, values in self._walk(link, lambda kind, values, output: values.get("model")):
            if kind in _CHECKPOINT_LOADERS:
                parts.insert(0, str(values.get("ckpt_name")))
            elif kind in ("LoraLoader", "LoraLoaderModelOnly"):
                parts.append(f"LoRA {values.get('lora_name')} at {values.get('strength_model')}")
            else:
                parts.append(kind)
        return " with ".join(parts) or "nothing"

    def _conditioning(self, link: Any, what: str) -> str | None:
        """The text a conditioning chain starts from; ``None`` where the chain zeroes it on purpose
        (``ConditioningZeroOut``)."""
        zeroed = None
        for node_id, kind, values in self._walk(link, _conditioning_upstream):
            if kind == "ConditioningZeroOut":
                zeroed = node_id
                continue
            if zeroed is not None and kind in ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner"):
                self._clip(values.get("clip"))
                if "negative" not in what:  # a zeroed negative is SDXL's own when none is given: restored as such
                    self.skip(zeroed, f"the {what} is zeroed on purpose (its text {_shown(values)} has no effect): a "
                              "zeroed prompt has no equivalent here; give a prompt")  # fmt: skip
                return None
            if kind == "CLIPTextEncode":
                self._clip(values.get("clip"))
                return str(values.get("text", ""))
            if kind == "CLIPTextEncodeSDXL":
                self._clip(values.get("clip"))
                if values.get("text_l") not in (None, values.get("text_g")):
                    self.skip(node_id, f"its text_l differs from text_g: the {what} is text_g, for both encoders")
                return str(values.get("text_g", ""))
            if kind == "CLIPTextEncodeSDXLRefiner":
                self._clip(values.get("clip"))
                if "ascore" in values:
                    key = "aesthetic_score" if "negative" not in what else "negative_aesthetic_score"
                    self.reader.settings[key] = float(values["ascore"])
                return str(values.get("text", ""))
            if kind in ("ControlNetApply", "ControlNetApplyAdvanced"):
                net = self.node(values.get("control_net"))
                name = net[1].get("inputs", {}).get("control_net_name") if net else None
                if net is not None:
                    self.seen.add(net[0])
                self._image(values.get("image"))
                if "negative" not in what:  # an advanced node carries both prompts: said once
                    self.skip(node_id, f"ControlNet {name} at strength {values.get('strength')}: {CONTROL_ADVICE}")
            else:
                self.skip(node_id, f"changes the {what} in a way not read here; the text before it is used")
        if zeroed is not None:
            return None
        return ""

    def _clip(self, link: Any) -> None:
        for node_id, kind, values in self._walk(link, lambda kind, values, output: values.get("clip")):
            if kind in _CHECKPOINT_LOADERS:
                return
            if kind == "CLIPSetLastLayer":  # hidden_states[n] of both encoders (-2: SDXL's own, restored as such)
                layer = int(values.get("stop_at_clip_layer", -1))
                if not 1 <= -layer <= 12:  # past CLIP-L's 12 layers ComfyUI reads its normed last: no clip_skip here
                    self.skip(node_id, f"stop_at_clip_layer {layer} reaches past CLIP-L's 12 layers; not applied")
                else:
                    self.reader.settings["clip_skip"] = -layer
            elif kind not in ("LoraLoader", *_CHECKPOINT_LOADERS):  # LoRAs: read on the model chain
                self.skip(node_id, "gives text encoders of its own (not the checkpoint's), which are not read here")
                return

    def _image(self, link: Any) -> None:
        found = self.node(link)
        if found is not None:
            self.seen.add(found[0])


def _node_order(node_id: str) -> tuple[int, ...]:
    """A node id's place: ComfyUI's ids are numbers, or numbers joined by ":" inside group nodes."""
    return tuple(int(part) if part.isdigit() else -1 for part in node_id.split(":"))


def _shown(values: Mapping[str, Any]) -> str:
    text = str(values.get("text", values.get("text_g", "")))
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _conditioning_upstream(kind: str, values: Mapping[str, Any], output: int) -> Any:
    if kind == "ControlNetApplyAdvanced":  # outputs (positive, negative), each from its own input
        return values.get("negative" if output == 1 else "positive")
    return values.get("conditioning") or values.get("conditioning_1")


# What each known model-patching node family needs that a PNG lacks.
_MODEL_PATCHES = {
    "IPAdapter": "its reference image is not in the PNG; give it with --style or --reference",
    "IPAdapterAdvanced": "its reference image is not in the PNG; give it with --style or --reference",
    "IPAdapterUnifiedLoader": "its reference image is not in the PNG; give it with --style or --reference",
    "ApplyInstantID": "its face photo is not in the PNG; give it with --face and --identity instantid",
    "ApplyPulid": "its face photo is not in the PNG; give it with --face and --identity pulid",
    "ApplyPulidAdvanced": "its face photo is not in the PNG; give it with --face and --identity pulid",
    "PhotoMakerEncode": "its face photo is not in the PNG; give it with --face and --identity photomaker",
    "UNETLoader": "a UNet-only checkpoint: not read (name its model in a job file's models.unet)",
}


def missing_loras(imported: Imported, resolver: Resolver, png: str) -> dict[str, str]:
    """LoRA name -> message, for each LoRA the PNG ``png`` names that is neither a file nor found by ``resolver`` (in
    the model folders): the command line refuses to run with them (exit 4) and the page shows the same words as it
    restores the PNG, so both front-ends treat an absent LoRA alike.

    Example:
        >>> print(*missing_loras(read_a1111("a fox <lora:add-detail-xl:0.6>\\nSteps: 4"), Resolver(), "fox.png").values())
        LoRA add-detail-xl (weight 0.6), named by fox.png, is not on this machine: give its file (--lora FILE:0.6; on the page, under LoRAs) or the install that holds it (--models-dir DIR)
    """  # noqa: E501
    messages = {}
    for condition in imported.conditions:
        name, scale = str(getattr(condition, "source", "")), getattr(condition, "scale", 1.0)
        if condition.kind != "lora" or name in messages:
            continue
        # Every name is looked for as a file, in --dry-run too: A1111, ComfyUI and the others name files of their
        # install, never hub ids, so a name that reads like one ("styles/detail") is a file's too.
        found = str(resolver.named("loras", name))
        if Path(found).expanduser().exists():
            continue
        messages[name] = (
            f"LoRA {name} (weight {scale:g}), named by {png}, is not on this machine: give its file "
            f"(--lora FILE:{scale:g}; on the page, under LoRAs) or the install that holds it (--models-dir DIR)"
        )
    return messages
