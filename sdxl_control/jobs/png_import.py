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
    ('a fox', 'euler_a', (1024, 768))
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

from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER, SCHEDULERS
from ..base.errors import InputError
from ..protocol.conditions import Condition
from ..protocol.schedule import scheduler_name
from ..records.infotext import A1111_UPSCALERS as WRITTEN_UPSCALERS
from .resolvers import Resolver
from .spec import JobSpec

__all__ = ["Imported", "read_a1111", "read_comfyui", "read_image_settings", "missing_loras"]

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
# A schedule type (A1111's "Schedule type", ComfyUI's KSampler "scheduler") -> the suffix of our scheduler name.
SCHEDULE_SUFFIXES = {"automatic": "", "normal": "", "karras": "_karras", "sgm uniform": "_trailing",
                     "sgm_uniform": "_trailing", "simple": "_trailing"}  # fmt: skip
# A1111's settings line: ``Key: value`` items, a value quoted when it holds a comma.
# A node on a chain of a ComfyUI graph: (node id, class_type, inputs).
_Step = tuple[str, str, Mapping[str, Any]]
# A key is at most 80 characters (A1111's longest are ~30, "ADetailer denoising strength"): unbounded, a long line
# with no colon costs the regex quadratic time (80 kB: half a minute), and a PNG's text reaches 1 MiB.
_ITEM = re.compile(r'\s*(\w[\w \-/]{1,80}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
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
        return dataclasses.replace(
            spec,
            prompt=spec.prompt or self.prompt,
            settings={**self.settings, **spec.settings},
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

    texts = png_texts(path)
    if RECIPE_KEY in texts:
        return read_recipe(path)
    if "parameters" in texts:
        return read_a1111(bounded_text(texts["parameters"], f"{path}: its A1111 parameters"))
    if "prompt" in texts:
        graph = json_text(texts["prompt"], f"{path}: its ComfyUI prompt")
        try:
            return read_comfyui(graph)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
    found = f" (it holds {', '.join(sorted(texts))})" if texts else ""
    only_workflow = " ComfyUI's workflow alone (no prompt graph) is not read." if "workflow" in texts else ""
    raise InputError(
        f"{path} carries no settings this can read: no sdxl-control recipe, no A1111 'parameters', no ComfyUI "
        f"'prompt'{found}.{only_workflow}"
    )


def _lora(name: str, scale: float) -> Condition:
    from ..adapters.lora import LoRA

    return LoRA(name, scale=scale)


class _Reader:
    """Collects settings and the parts that did not map while a PNG's metadata is read."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.settings: dict[str, Any] = {}
        self.conditions: list[Condition] = []
        self.models: dict[str, str | None] = {}
        self.unmapped: list[str] = []

    def skip(self, part: str, why: str) -> None:
        self.unmapped.append(f"{part}: {why}")

    def model(self, role: str, name: str) -> None:
        stem = Path(name.strip()).stem if Path(name.strip()).suffix in (".safetensors", ".ckpt") else name.strip()
        self.models[role] = PUBLISHED_CHECKPOINTS.get(stem, name.strip())

    def scheduler(self, sampler: str, schedule: str | None, where: str) -> None:
        base = scheduler_name(sampler)
        if base not in SCHEDULERS:
            self.skip(where, f"sampler {sampler!r} has no equivalent here; the default sampler is used")
            return
        suffix = SCHEDULE_SUFFIXES.get((schedule or "automatic").strip().casefold())
        name = base + (suffix or "")
        if suffix is None or name not in SCHEDULERS:
            self.skip(where, f"{sampler!r} with the {schedule!r} schedule has no equivalent; {base!r} is used")
            name = base
        self.settings["scheduler"] = name

    def done(self, prompt: str) -> Imported:
        self.unmapped.append(NOISE_NOTE.format(tool=self.tool))
        return Imported(self.tool, prompt, self.settings, tuple(self.conditions), self.models, tuple(self.unmapped))


def read_a1111(text: str) -> Imported:
    """The request an A1111 ``parameters`` text describes (see the module)."""
    lines = text.strip().split("\n")
    items: dict[str, str] = {}
    if len(_ITEM.findall(lines[-1])) >= 3:
        for key, value in _ITEM.findall(lines.pop()):
            items[key] = _unquoted(value)
    elif (start := _settings_start(lines)) is not None:
        # A quoted value with line breaks in it (some extensions write them raw): the settings are the lines from the
        # last that starts with "Steps:" on, not a negative prompt that swallows them.
        for key, value in _ITEM.findall("\n".join(lines[start:])):
            items[key] = _unquoted(value)
        del lines[start:]
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.strip().startswith("Negative prompt:"):
            negative_lines = [line.strip()[len("Negative prompt:") :].strip()]
        elif negative_lines is not None:
            negative_lines.append(line.strip())
        else:
            prompt_lines.append(line.strip())
    reader = _Reader("A1111")
    prompt = _extra_networks("\n".join(prompt_lines), reader)
    if negative_lines is not None:
        reader.settings["negative_prompt"] = "\n".join(negative_lines)
    _a1111_items(items, reader)
    return reader.done(prompt)


def _settings_start(lines: list[str]) -> int | None:
    """The line where a settings block of several lines starts: the last line beginning with ``Steps:`` (A1111 writes
    it first), when the lines from it on read as settings; ``None`` where there is none."""
    for start in range(len(lines) - 1, 0, -1):
        if lines[start].startswith("Steps: "):
            return start if len(_ITEM.findall("\n".join(lines[start:]))) >= 3 else None
    return None


def _unquoted(value: str) -> str:
    """A settings value as A1111 reads it: a quoted one is JSON, kept as written where it is not valid JSON."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def _extra_networks(prompt: str, reader: _Reader) -> str:
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


def _a1111_items(items: dict[str, str], reader: _Reader) -> None:
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
        reader.scheduler(sampler, get("Schedule type"), f"Sampler: {sampler}")
    if (model := get("Model")) is not None:
        reader.model("base", model)
    if (refiner := get("Refiner")) is not None:
        reader.model("refiner", re.sub(r"\s*\[[0-9a-f]+\]$", "", refiner))
        settings["refiner_switch"] = number("Refiner switch at") or 0.8
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
    if (pad := get("Pad conds")) is not None and pad.strip().casefold() == "true":
        settings["pad_conds"] = True  # A1111's "Pad prompt/negative prompt" (off: separate UNet calls)
    timelines = get("Old prompt editing timelines")
    if timelines is not None and timelines.strip().casefold() == "true":
        reader.skip("Old prompt editing timelines: True", "prompt editing is read with A1111's timelines since 1.6")
    if (skip := get("Clip skip")) is not None and skip.strip() != "1":
        reader.skip(f"Clip skip: {skip}", "SDXL reads the penultimate layers as trained; not applied")
    adetailer = [k for k in items if k.startswith("ADetailer")]
    if adetailer:
        settings["detailer"] = True
        taken.update(adetailer)
        details = [k for k in adetailer if k not in ("ADetailer model", "ADetailer version")]
        if details:
            reader.skip(", ".join(f"{k}: {items[k]}" for k in details), "ADetailer's defaults are used")
    for key, value in items.items():
        if key in taken:
            continue
        if key.startswith("ControlNet"):
            reader.skip(f"{key} ({value})", CONTROL_ADVICE)
        elif key in ("Model hash", "Lora hashes", "TI hashes", "VAE hash", "Version", "Refiner switch at"):
            reader.skip(f"{key}: {value}", "not checked")
        else:
            reader.skip(f"{key}: {value}", "no equivalent here")


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
        self.reader = _Reader("ComfyUI")
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
        samplers = [k for k, n in self.nodes.items() if n["class_type"] in ("KSampler", "KSamplerAdvanced")]
        if not samplers:
            raise InputError("the ComfyUI graph has no KSampler node: nothing to restore")
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
        advanced = self.nodes[node_id]["class_type"] == "KSamplerAdvanced"
        settings["seed"] = int(values.get("noise_seed" if advanced else "seed", 0))
        settings["steps"] = int(values.get("steps", 20))
        settings["guidance"] = float(values.get("cfg", 8.0))
        self.reader.scheduler(str(values.get("sampler_name", "euler")), str(values.get("scheduler", "normal")),
                              f"KSampler (node {node_id})")  # fmt: skip
        if not advanced and float(values.get("denoise", 1.0)) < 1.0:
            self.skip(node_id, f"denoise {values['denoise']}: an img2img image is not in the PNG; give --init-image "
                      f"and --strength {values['denoise']}")  # fmt: skip
        self._models(values.get("model"), "base")
        prompt = self._conditioning(values.get("positive"), "prompt")
        negative = self._conditioning(values.get("negative"), "negative prompt")
        if negative:
            settings["negative_prompt"] = negative
        latent = self.node(values.get("latent_image"))
        if latent is not None and latent[1]["class_type"] == "EmptyLatentImage":
            self.seen.add(latent[0])
            size = latent[1].get("inputs", {})
            settings["size"] = (int(size.get("width", 1024)), int(size.get("height", 1024)))
            if int(size.get("batch_size", 1)) > 1:
                settings["num_images"] = int(size["batch_size"])
        return prompt

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
            self._conditioning(values.get("positive"), "refiner prompt")
            self._conditioning(values.get("negative"), "refiner negative prompt")
            return
        if latent is not None and latent[1]["class_type"] in ("LatentUpscaleBy", "LatentUpscale"):
            self.seen.add(latent[0])
            upscale = latent[1].get("inputs", {})
            width = settings.get("size", (1024, 1024))[0]
            scale = upscale.get("scale_by") or int(upscale.get("width", width)) / width
            settings["hires_scale"] = float(scale)
            settings["upscaler"] = COMFYUI_LATENT_UPSCALES.get(str(upscale.get("upscale_method")), "latent")
            settings["hires_steps"] = int(values.get("steps", settings.get("steps", 20)))
            settings["hires_strength"] = float(values.get("denoise", 0.5))
            return
        self.skip(node_id, "a second sampler that is neither a refiner nor a latent hires fix; not read")

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
        for node_id, kind, values in self._walk(link, lambda kind, values, output: values.get("model")):
            if kind in ("CheckpointLoaderSimple", "CheckpointLoader"):
                self.reader.model(role, str(values.get("ckpt_name")))
                return
            if kind in ("LoraLoader", "LoraLoaderModelOnly"):
                scale = float(values.get("strength_model", 1.0))
                self.reader.conditions.append(_lora(str(values.get("lora_name")), scale))
                clip = values.get("strength_clip")
                if clip is not None and float(clip) != scale:
                    self.skip(node_id, f"strength_clip {clip} differs from strength_model: {scale:g} is used for both")
            else:
                self.skip(node_id, _MODEL_PATCHES.get(kind, "changes the model in a way not read here"))

    def _conditioning(self, link: Any, what: str) -> str:
        for node_id, kind, values in self._walk(link, _conditioning_upstream):
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
        return ""

    def _clip(self, link: Any) -> None:
        for node_id, kind, values in self._walk(link, lambda kind, values, output: values.get("clip")):
            if kind in ("CheckpointLoaderSimple", "CheckpointLoader"):
                return
            if kind == "CLIPSetLastLayer" and int(values.get("stop_at_clip_layer", -1)) != -1:
                self.skip(node_id, "SDXL reads the penultimate layers as trained; the clip skip is not applied")

    def _image(self, link: Any) -> None:
        found = self.node(link)
        if found is not None:
            self.seen.add(found[0])


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
    from ..base.files import looks_like_hub_id

    messages = {}
    for condition in imported.conditions:
        name, scale = str(getattr(condition, "source", "")), getattr(condition, "scale", 1.0)
        if condition.kind != "lora" or name in messages:
            continue
        found = str(resolver.named("loras", name))
        if Path(found).expanduser().exists() or looks_like_hub_id(found):
            continue
        messages[name] = (
            f"LoRA {name} (weight {scale:g}), named by {png}, is not on this machine: give its file "
            f"(--lora FILE:{scale:g}; on the page, under LoRAs) or the install that holds it (--models-dir DIR)"
        )
    return messages
