"""Settings brought back from PNGs of Fooocus, InvokeAI and SwarmUI: each reads its JSON into a request as
:mod:`.png_import` reads A1111's and ComfyUI's, and every key it does not map is listed with its value, never dropped.

The keys read are the ones these tools write (Fooocus: ``modules/meta_parser.py``, its ``parameters`` JSON with
``fooocus_scheme``; InvokeAI 3 and later: the ``invokeai_metadata`` chunk; SwarmUI: ``sui_image_params`` in the
``parameters`` chunk); tests/data/real_pngs holds PNGs these tools made.

Example:
    >>> imported = read_swarmui({"sui_image_params": {"prompt": "a fox", "seed": 3, "steps": 20, "width": 1024,
    ...                                                 "height": 768, "swarm_version": "0.9.3"}})
    >>> imported.prompt, imported.settings["size"], imported.unmapped[0]
    ('a fox', (1024, 768), 'swarm_version: 0.9.3: not read (no equivalent here)')
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from ..base.errors import InputError
from .png_import import Imported, SettingsReader, _lora

__all__ = ["read_fooocus", "read_invokeai", "read_ruinedfooocus", "read_swarmui"]

# Keys that only say who made the image and when.
_NOT_CHECKED = "not checked"
_NO_EQUIVALENT = "not read (no equivalent here)"


class _Keys:
    """A JSON object's keys as they are read: ``get`` marks a key taken; :meth:`rest` lists the others with their
    values, so a key no reader knows is named, never dropped."""

    def __init__(self, data: Mapping[str, Any], reader: SettingsReader, where: str = "") -> None:
        self.data, self.reader, self.where = data, reader, where
        self.taken: set[str] = set()

    def get(self, key: str) -> Any:
        self.taken.add(key)
        return self.data.get(key)

    def skip(self, key: str, why: str) -> None:
        self.taken.add(key)
        if key in self.data:
            self.reader.skip(f"{self.where}{key}: {_shown(self.data[key])}", why)

    def number(self, key: str, kind: type = float) -> Any:
        value = self.get(key)
        if value is None or value == "":
            return None
        try:
            if kind is int and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                return int(value)  # exactly: a 64-bit seed is beyond a float's 53 bits
            return kind(value) if kind is not int or isinstance(value, int) else int(float(value))
        except (TypeError, ValueError):
            self.reader.skip(f"{self.where}{key}: {_shown(value)}", "not a number")
            return None

    def setting(self, key: str, name: str, kind: type = float) -> None:
        """The number at ``key``, where there is one, as the request's setting ``name``."""
        if (value := self.number(key, kind)) is not None:
            self.reader.settings[name] = value

    def size(self, width: str = "width", height: str = "height") -> None:
        """The request's size from the numbers at ``width`` and ``height``, where both are."""
        w, h = self.number(width, int), self.number(height, int)
        if w is not None and h is not None:
            self.reader.settings["size"] = (w, h)

    def rest(self, why: Mapping[str, str] | None = None) -> None:
        for key, value in self.data.items():
            if key not in self.taken:
                self.reader.skip(f"{self.where}{key}: {_shown(value)}", (why or {}).get(key, _NO_EQUIVALENT))


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _seed(keys: _Keys, key: str = "seed") -> None:
    seed = keys.number(key, int)
    if seed is None:
        return
    if seed < 0:
        keys.reader.skip(f"{key}: {seed}", "a random seed: give --seed")
    else:
        keys.reader.settings["seed"] = seed


def _pair(text: Any) -> tuple[Any, ...] | None:
    """A tuple Fooocus writes as its Python text (``"(768, 1280)"``), or ``None`` where it is not one."""
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, tuple) else None


def read_fooocus(data: Mapping[str, Any]) -> Imported:
    """The request a Fooocus ``parameters`` JSON (its ``fooocus`` scheme) describes.

    Fooocus encodes each part of its full prompt (the prompt with its styles applied, then the Fooocus V2 expansion)
    on its own and joins the encodings: the parts are restored joined by ``BREAK``, which reads them as chunks of their
    own. Its own effects (sharpness, ADM guidance, adaptive CFG, the styles themselves) have no equivalent here and are
    listed."""
    reader = SettingsReader("Fooocus")
    keys = _Keys(data, reader)
    full = keys.get("full_prompt")
    prompt = str(keys.get("prompt") or "")
    if isinstance(full, list) and full:
        prompt = " BREAK ".join(str(p) for p in full)
        keys.skip("prompt", "Fooocus's full prompt (its styles and expansion applied) is restored instead")
        keys.skip("prompt_expansion", "part of Fooocus's full prompt, restored")
        keys.skip("styles", "applied in Fooocus's full prompt, restored")
    negative_full = keys.get("full_negative_prompt")
    negative = keys.get("negative_prompt")
    if isinstance(negative_full, list) and negative_full:
        reader.settings["negative_prompt"] = " BREAK ".join(str(p) for p in negative_full)
        keys.skip("negative_prompt", "Fooocus's full negative prompt (its styles applied) is restored instead")
    elif negative:
        reader.settings["negative_prompt"] = str(negative)
    keys.setting("steps", "steps", int)
    keys.setting("guidance_scale", "guidance")
    _seed(keys)
    resolution = _pair(keys.get("resolution"))
    if resolution is not None and len(resolution) == 2 and all(isinstance(v, int) for v in resolution):
        reader.settings["size"] = (int(resolution[0]), int(resolution[1]))  # Fooocus writes (width, height)
    elif "resolution" in data:
        reader.skip(f"resolution: {_shown(data['resolution'])}", "not a size (width, height)")
    if (sampler := keys.get("sampler")) is not None:
        schedule = str(keys.get("scheduler") or "normal")
        reader.scheduler(str(sampler), schedule, f"sampler: {sampler}, scheduler: {schedule}")
    if base := keys.get("base_model"):
        reader.model("base", str(base))
    refiner = keys.get("refiner_model")
    if refiner and str(refiner) != "None":
        reader.model("refiner", str(refiner))
        if (switch := keys.number("refiner_switch")) is not None:
            reader.settings["refiner_switch"] = switch
    else:
        keys.skip("refiner_switch", "no refiner was used")
    loras = keys.get("loras")
    for entry in loras if isinstance(loras, list) else ():
        if isinstance(entry, list) and len(entry) >= 2:
            reader.conditions.append(_lora(str(entry[0]), float(entry[1])))
        else:
            reader.skip(f"loras: {_shown(entry)}", "not a [name, weight, hash] entry")
    if not isinstance(loras, list):
        # Older Fooocus writes "lora_combined_N": "name : weight" instead of the list.
        for key in sorted(k for k in data if k.startswith("lora_combined_")):
            name, _, weight = str(keys.get(key)).rpartition(" : ")
            try:
                reader.conditions.append(_lora(name.strip(), float(weight)))
            except ValueError:
                reader.skip(f"{key}: {data[key]}", "not 'name : weight'")
    else:
        keys.taken.update(k for k in data if k.startswith("lora_combined_"))
    if str(data.get("vae", "Default (model)")) == "Default (model)":
        keys.taken.add("vae")
    keys.rest(
        {
            "base_model_hash": _NOT_CHECKED, "refiner_model_hash": _NOT_CHECKED, "version": _NOT_CHECKED,
            "created_by": _NOT_CHECKED, "metadata_scheme": _NOT_CHECKED,
            "vae": "give the VAE with --vae",
            "sharpness": "Fooocus's sharpness has no equivalent here",
            "adm_guidance": "Fooocus's ADM guidance has no equivalent here",
            "adaptive_cfg": "Fooocus's adaptive CFG has no equivalent here",
            "performance": "the steps it set are restored",
        }
    )  # fmt: skip
    return reader.done(prompt)


# InvokeAI's scheduler names -> ComfyUI's for the same sampler (its ``_k`` names add the Karras schedule); others are
# passed on as written and listed where they have no equivalent.
# InvokeAI's schedulers (its SCHEDULER_MAP, invoke-ai/InvokeAI invokeai/backend/stable_diffusion/schedulers/
# schedulers.py) are diffusers' classes on the model's own scheduler config, "_k" adding use_karras_sigmas: ours of
# the same class, with that option. Those not here (ddpm, deis, pndm, dpmpp_2s, dpmpp_3m, er_sde) are listed.
_INVOKEAI_SAMPLERS = {
    "euler": "euler", "euler_a": "euler_a", "heun": "heun", "lms": "lms", "kdpm_2": "dpm2", "kdpm_2_a": "dpm2_a",
    "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_sde": "dpmpp_sde", "unipc": "unipc",
    "ddim": "ddim", "lcm": "lcm", "tcd": "tcd",
}  # fmt: skip


def read_invokeai(data: Mapping[str, Any]) -> Imported:
    """The request an InvokeAI ``invokeai_metadata`` JSON (InvokeAI 3 and later) describes."""
    reader = SettingsReader("InvokeAI")
    keys = _Keys(data, reader)
    prompt = str(keys.get("positive_prompt") or "")
    if negative := keys.get("negative_prompt"):
        reader.settings["negative_prompt"] = str(negative)
    for key in ("positive_style_prompt", "negative_style_prompt"):
        # SDXL's second text encoder's own prompt; empty (InvokeAI's default) is the prompt itself.
        if keys.get(key):
            reader.skip(f"{key}: {_shown(data[key])}", "a second encoder's own prompt has no equivalent here")
    keys.size()
    _seed(keys)
    keys.setting("steps", "steps", int)
    keys.setting("cfg_scale", "guidance")
    if rescale := keys.number("cfg_rescale_multiplier"):  # CFG rescale (Lin et al.), as diffusers' guidance_rescale
        reader.settings["guidance_rescale"] = rescale
    if (scheduler := keys.get("scheduler")) is not None:
        name = str(scheduler)
        karras = name.endswith("_k")
        base = name[: -len("_k")] if karras else name
        if (ours := _INVOKEAI_SAMPLERS.get(base)) is None:
            reader.skip(
                f"scheduler: {name}", "InvokeAI's scheduler has no equivalent here; the default sampler is used"
            )
        else:
            reader.settings["scheduler"] = ours
            if karras:
                reader.settings["scheduler_options"] = {"use_karras_sigmas": True}
    model = keys.get("model")
    if isinstance(model, Mapping):
        if model_name := model.get("model_name") or model.get("name"):
            reader.model("base", str(model_name))
        if model.get("base_model", model.get("base")) not in (None, "sdxl"):
            reader.skip(f"model: {_shown(model)}", "not an SDXL model")
    mode = keys.get("generation_mode")
    if mode not in (None, "txt2img", "sdxl_txt2img"):
        keys.taken.discard("generation_mode")
    loras = keys.get("loras")
    for entry in loras if isinstance(loras, list) else ():
        lora = entry.get("lora") or entry.get("model") if isinstance(entry, Mapping) else None
        lora_name = lora.get("model_name") or lora.get("name") if isinstance(lora, Mapping) else None
        if lora_name and isinstance(entry.get("weight"), (int, float)):
            reader.conditions.append(_lora(str(lora_name), float(entry["weight"])))
        else:
            reader.skip(f"loras: {_shown(entry)}", "not a LoRA with a name and a weight")
    keys.rest(
        {
            "generation_mode": "only text-to-image is read; give its image with --init-image",
            "rand_device": "InvokeAI's noise differs from ours",
            "ipAdapters": "its reference image is not in the PNG; give it with --style or --reference",
            "controlnets": "its control image is not in the PNG; give it with --edges, --depth or --pose",
            "vae": "give the VAE with --vae", "app_version": _NOT_CHECKED,
        }
    )  # fmt: skip
    return reader.done(prompt)


def read_swarmui(data: Mapping[str, Any]) -> Imported:
    """The request SwarmUI's ``parameters`` JSON (``sui_image_params``) describes; its sampler and scheduler are
    ComfyUI's names (SwarmUI runs on ComfyUI)."""
    params = data.get("sui_image_params")
    if not isinstance(params, Mapping):
        raise InputError("SwarmUI's sui_image_params is not an object")
    reader = SettingsReader("SwarmUI")
    keys = _Keys(params, reader)
    prompt = str(keys.get("prompt") or "")
    if negative := keys.get("negativeprompt"):
        reader.settings["negative_prompt"] = str(negative)
    _seed(keys)
    keys.setting("steps", "steps", int)
    keys.setting("cfgscale", "guidance")
    extra = data.get("sui_extra_data")
    unused = (
        set(extra.get("unused_parameters") or ()) if isinstance(extra, Mapping) else set()
    )  # SwarmUI's own word for the values it did not use
    width, height = keys.number("width", int), keys.number("height", int)
    if width is not None and height is not None and not {"width", "height"} & unused:
        reader.settings["size"] = (width, height)
        keys.taken.update(("aspectratio", "sidelength"))  # the size's ratio and side, said again
    elif {"width", "height"} & unused:
        side, ratio = keys.number("sidelength", int), keys.get("aspectratio")
        if side is not None and ratio == "1:1":  # the size it ran at: its side length, square
            reader.settings["size"] = (side, side)
        else:  # another ratio: its size is not worked out here; listed
            keys.taken.difference_update(("sidelength", "aspectratio"))
        for key in ("width", "height"):
            keys.skip(key, "SwarmUI did not use it (its unused_parameters)")
    _swarm_hires(keys)
    if (sampler := keys.get("sampler")) is not None:
        schedule = str(keys.get("scheduler") or "normal")
        reader.scheduler(str(sampler), schedule, f"sampler: {sampler}, scheduler: {schedule}")
    elif (schedule := keys.get("scheduler")) is not None:
        reader.scheduler("euler", str(schedule), f"scheduler: {schedule} (SwarmUI's default sampler, euler)")
    if model := keys.get("model"):
        # SwarmUI names a model by its path in its models folder, without a suffix ("OfficialStableDiffusion/
        # sd_xl_base_1.0"): found here by its file's name, which a path without its suffix is not.
        reader.model("base", str(model).replace("\\", "/").rsplit("/", 1)[-1])
    names, weights = keys.get("loras"), keys.get("loraweights")
    if isinstance(names, list):
        weights = weights if isinstance(weights, list) and len(weights) == len(names) else [1.0] * len(names)
        for name, weight in zip(names, weights, strict=True):
            reader.conditions.append(_lora(str(name), float(weight)))
    keys.rest({"swarm_version": _NO_EQUIVALENT, "date": _NOT_CHECKED, "generation_time": _NOT_CHECKED})
    for key in ("sui_extra_data", "sui_models"):
        if data.get(key):
            reader.skip(f"{key}: {_shown(data[key])}", _NOT_CHECKED)  # dates, times, hashes
    for key in data:
        if key not in ("sui_image_params", "sui_extra_data", "sui_models"):
            reader.skip(f"{key}: {_shown(data[key])}", _NO_EQUIVALENT)
    return reader.done(prompt)


# SwarmUI's "refiner" upscale methods that are ours; "model-NAME" names an upscaler model.
_SWARM_UPSCALES = {"pixel-lanczos": "lanczos", "latent-bilinear": "latent", "latent-bicubic": "latent-bicubic",
                   "latent-nearest-exact": "latent-nearest-exact"}  # fmt: skip


def _swarm_hires(keys: _Keys) -> None:
    """SwarmUI's refiner stage run on the same model after an upscale (``refinerupscale``, method ``PostApply``):
    the hires fix — its scale, upscaler, strength (``refinercontrolpercentage``) and steps."""
    params, settings = keys.data, keys.reader.settings
    if (
        "refinerupscale" not in params
        or params.get("refinermodel")
        or params.get("refinermethod", "PostApply") != "PostApply"
    ):
        return  # a refiner model of its own, or no upscale: listed as SwarmUI's other keys are
    method = str(params.get("refinerupscalemethod", "pixel-lanczos"))
    upscaler = method[len("model-") :] if method.startswith("model-") else _SWARM_UPSCALES.get(method)
    scale, strength = keys.number("refinerupscale"), keys.number("refinercontrolpercentage")
    if upscaler is None or scale is None:
        keys.taken.difference_update(("refinerupscale", "refinercontrolpercentage"))
        return
    keys.taken.update(("refinerupscalemethod", "refinermethod"))
    settings["hires_scale"], settings["upscaler"] = scale, upscaler
    if strength is not None:
        settings["hires_strength"] = strength
    if (steps := keys.number("refinersteps", int)) is not None:
        settings["hires_steps"] = steps


def read_ruinedfooocus(data: Mapping[str, Any]) -> Imported:
    """The request a RuinedFooocus ``parameters`` JSON (``"software": "RuinedFooocus"``) describes; its sampler and
    scheduler are ComfyUI's names."""
    reader = SettingsReader("RuinedFooocus")
    keys = _Keys(data, reader)
    prompt = str(keys.get("Prompt") or "")
    if negative := keys.get("Negative"):
        reader.settings["negative_prompt"] = str(negative)
    _seed(keys)
    keys.setting("steps", "steps", int)
    keys.setting("cfg", "guidance")
    keys.size()
    if (sampler := keys.get("sampler_name")) is not None:
        schedule = str(keys.get("scheduler") or "normal")
        reader.scheduler(str(sampler), schedule, f"sampler_name: {sampler}, scheduler: {schedule}")
    if model := keys.get("base_model_name"):
        reader.model("base", str(model))
    loras = keys.get("loras")
    for entry in loras if isinstance(loras, list) else ():
        # RuinedFooocus lists [weight, name] pairs (its modules/sdxl_pipeline.py), or objects.
        pair = entry if isinstance(entry, list) and len(entry) == 2 else None
        if pair is not None and isinstance(pair[0], (int, float)):
            reader.conditions.append(_lora(str(pair[1]), float(pair[0])))
        else:
            reader.skip(f"loras: {_shown(entry)}", "not a [weight, name] pair")
    # Neutral values: from step 0, no img2img denoise, CLIP's last layer.
    for key, neutral in (("start_step", 0), ("denoise", None), ("clip_skip", 1), ("software", "RuinedFooocus")):
        if data.get(key, neutral) == neutral:
            keys.taken.add(key)
    keys.rest({"base_model_hash": _NOT_CHECKED, "start_step": "an img2img start: give --init-image",
               "denoise": "an img2img strength: give --init-image and --strength"})  # fmt: skip
    return reader.done(prompt)
