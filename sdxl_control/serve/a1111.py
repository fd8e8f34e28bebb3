"""The A1111 web API (``/sdapi/v1/...``, A1111 1.10's routes and shapes) as a front-end: each request is translated
into one :class:`~sdxl_control.jobs.spec.JobSpec` and run by the server's one job service.

A request is read as A1111 reads it: every field is optional with A1111's default, and a field this server does not
know (SillyTavern sends its own ``url`` and ``auth``) is ignored as A1111 ignores it — but listed by name in the
answer's ``info`` (``sdxl_control_not_done``), with every field whose value asks for what is not done here; its value
is never echoed. What would change the image in a way that cannot be honoured quietly — an unknown sampler, model,
LoRA or upscaler, a path as a model name — is refused with a 422 naming the field.

Example:
    >>> spec, notes = request_spec("txt2img", {"prompt": "a fox", "steps": 4, "seed": 3, "sampler_name": "Euler a"}, {})
    >>> spec.prompt, spec.settings["steps"], spec.settings["scheduler"], spec.settings["seed"]
    ('a fox', 4, 'euler_a_linspace', 3)
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Request

from ..base.errors import InvalidRequestError
from ..jobs.spec import JobSpec
from .app import Limits

if TYPE_CHECKING:
    from PIL import Image

    from .app import ServerState
    from .catalogue import Catalogue, Listed
    from .service import Outcome

__all__ = ["router", "request_spec", "read_job", "read_request", "read_img2img", "A1111Job"]

# A1111's draw for seed -1 (modules/processing.py get_fixed_seed): random.randrange(4294967294).
SEED_RANGE = 4294967294
# The key of `info` that lists what a request asked and was not done (each with why).
NOT_DONE = "sdxl_control_not_done"

# A1111 1.10's request fields (StableDiffusionProcessing, its Txt2Img/Img2Img subclasses and the API's own fields):
# known, so not listed as unknown; those read are read below, the others checked against their neutral values.
COMMON_FIELDS = (
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale",
    "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta",
    "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
    "firstpass_image", "comments", "force_task_id", "script_name", "script_args", "send_images", "save_images",
    "alwayson_scripts", "infotext",
)  # fmt: skip
TXT2IMG_FIELDS = (
    "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt",
)  # fmt: skip
IMG2IMG_FIELDS = (
    "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur", "mask_round",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "latent_mask", "include_init_images",
)  # fmt: skip
# Fields whose values leave the image as this server makes it: None, A1111's defaults, and what webuiapi and
# SillyTavern send by default. Any other value is listed as not done, with why.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "styles": ([],), "subseed_strength": (0, 0.0), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "restore_faces": (False,), "tiling": (False,), "eta": (1, 1.0), "s_min_uncond": (0, 0.0), "s_churn": (0, 0.0),
    "s_tmax": (0, 0.0, float("inf")), "s_tmin": (0, 0.0), "s_noise": (1, 1.0), "firstpass_image": ("",),
    "infotext": ("",), "save_images": (False,), "disable_extra_networks": (False,),
    "initial_noise_multiplier": (1, 1.0), "latent_mask": ("",),
    "firstphase_width": (0,), "firstphase_height": (0,), "hr_sampler_name": ("", "Use same sampler"),
    "hr_scheduler": ("", "Use same scheduler"),
}  # fmt: skip
WHY_NOT = {
    "styles": "saved styles are not kept on this server; put their text in the prompt",
    "subseed_strength": "variation seeds are not drawn here (every image runs its own seed, seed + i)",
    "seed_resize_from_h": "A1111's seed resize is not done", "seed_resize_from_w": "A1111's seed resize is not done",
    "restore_faces": "no face restoration model here; the face detailer (ADetailer's fields) repaints faces",
    "tiling": "tiling is not done", "eta": "the samplers run with eta 1 (A1111's default)",
    "s_min_uncond": "A1111's negative guidance minimum sigma is not done",
    "s_churn": "k-diffusion's churn is not done", "s_tmax": "k-diffusion's churn is not done",
    "s_tmin": "k-diffusion's churn is not done", "s_noise": "the samplers' noise is not scaled",
    "firstpass_image": "a given first pass is not read",
    "save_images": "images are not saved on the server: they are in the answer",
    "disable_extra_networks": "extra networks in the prompt are read anyway",
    "initial_noise_multiplier": "the initial noise is not scaled", "latent_mask": "a latent mask is not read",
    "firstphase_width": "the legacy first-phase size is not read: give width, height and hr_scale",
    "firstphase_height": "the legacy first-phase size is not read: give width, height and hr_scale",
    "hr_sampler_name": "the hires pass runs the first pass's sampler",
    "hr_scheduler": "the hires pass runs the first pass's schedule",
}  # fmt: skip

# Our schedulers of the samplers A1111 gives an eta (those whose k-diffusion function takes one: Forge dfdcbab6
# modules/sd_samplers_common.py initialize); the others ignore it, as A1111's do.
ETA_SCHEDULERS = ("euler_a_", "dpmpp_sde_", "dpmpp_2m_sde_")
# override_settings at A1111 1.10's defaults (modules/shared_options.py), which this server's jobs already follow:
# KoboldAI Lite sends them with every request. Any other value is listed as not applied.
NEUTRAL_OVERRIDES: dict[str, tuple[Any, ...]] = {
    "eta_noise_seed_delta": (0,), "ddim_discretize": ("uniform",), "img2img_fix_steps": (False,),
    "sd_hypernetwork": ("None",), "inpainting_mask_weight": (1,), "initial_noise_multiplier": (1,),
    "comma_padding_backtrack": (20,),
}  # fmt: skip


@dataclass(frozen=True)
class A1111Job:
    """An A1111 request read: the job's ``spec``, what is not done (``notes``), and what ``info`` reports that the
    spec does not carry (the model's title, the sampler's label, the options in force)."""

    spec: JobSpec
    notes: list[str]
    kind: str
    model: Listed | None = None
    sampler: str = "Euler"
    clip_skip: int = 1
    vae: str = "Automatic"
    styles: list[str] = field(default_factory=list)
    batch_size: int = 1
    subseed: int = -1
    subseed_strength: float = 0.0
    denoising_strength: float | None = None


def draw_seed(value: Any) -> int:
    """A request's seed as A1111 reads it: '' or None or -1 draws one; a number in a string is read."""
    if value in (None, ""):
        value = -1
    try:
        seed = int(value)
    except (TypeError, ValueError):
        seed = -1
    return random.randrange(SEED_RANGE) if seed == -1 else seed


def _number(payload: Mapping[str, Any], key: str, default: Any, kind: type = int) -> Any:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidRequestError(f"{key}: expected a number, got {value!r}")
    try:
        return kind(value) if kind is float else int(float(value))
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{key}: expected a number, got {value!r}") from None


def _default_catalogue() -> Catalogue:
    from ..weights.model_folders import ModelFolders
    from .catalogue import Catalogue

    return Catalogue(ModelFolders())


def read_request(
    payload: Mapping[str, Any],
    options: Mapping[str, Any],
    limits: Limits | None = None,
    *,
    kind: str = "txt2img",
    catalogue: Catalogue | None = None,
    checkpoint: Listed | None = None,
    init_image: Image.Image | None = None,
) -> A1111Job:
    """An A1111 ``txt2img`` or ``img2img`` request (``kind``) as a job, under the server's ``options`` (those a
    client set), its ``limits`` and its ``catalogue`` of models (``checkpoint``: the one jobs run on now);
    ``init_image``: img2img's image (the extensions' units use it where they give none)."""
    from ..base.defaults import DEFAULT_BASE
    from ..base.samplers import SCHEDULER_TABLE, tool_scheduler
    from ..jobs.png_import import SettingsReader, extra_networks
    from .a1111_info import LATENT_UPSCALE_MODES, not_neutral, sampler_alias
    from .extensions import alwayson_scripts

    limits = limits or Limits()
    catalogue = catalogue or _default_catalogue()
    checkpoint = checkpoint or catalogue.default()
    known = (*COMMON_FIELDS, *(TXT2IMG_FIELDS if kind == "txt2img" else IMG2IMG_FIELDS))
    notes: list[str] = []
    if payload.get("infotext"):
        payload = _with_infotext(payload, notes, catalogue)
    # enable_hr false asks nothing of img2img (KoboldAI Lite sends it to both routes): not listed as unread
    unknown = [str(k) for k in payload if k not in known and not (k == "enable_hr" and payload[k] is False)]
    if unknown:  # as A1111 ignores them; named (never their values: SillyTavern's `auth` holds a password)
        notes.append(f"fields not read by this server (A1111 ignores them too): {', '.join(unknown)}")
    for key in not_neutral(payload, NEUTRAL):
        if WHY_NOT.get(key) and key != "eta":  # eta: read with the sampler, below
            notes.append(f"{key}: {WHY_NOT[key]}")
    settings: dict[str, Any] = {}
    models: dict[str, Any] = {}

    prompt_value = payload.get("prompt") or ""
    if isinstance(prompt_value, list):  # A1111's processing takes a list of prompts; one job runs one
        if len(prompt_value) > 1:
            notes.append("prompt: a list of prompts runs its first for every image")
        prompt_value = prompt_value[0] if prompt_value else ""
    reader = SettingsReader("A1111")
    prompt = extra_networks(str(prompt_value), reader)
    for part in reader.unmapped:
        notes.append(f"prompt {part}")
    conditions = []
    for lora in reader.conditions:  # <lora:name:w>: only the LoRAs the server lists
        name = str(getattr(lora, "source", ""))
        listed = catalogue.find("loras", name, f"prompt <lora:{name}:...>")
        found: dict[str, Any] = {"source": listed.source}
        conditions.append(dataclasses.replace(lora, **found))
    if payload.get("negative_prompt"):
        settings["negative_prompt"] = str(payload["negative_prompt"])

    steps = _number(payload, "steps", 50)
    limits.check_steps(steps)
    settings["steps"] = steps
    settings["guidance"] = _number(payload, "cfg_scale", 7.0, float)
    width, height = _number(payload, "width", 512), _number(payload, "height", 512)
    limits.check_size(width, height, "width x height")
    settings["size"] = (width, height)
    batch_size, n_iter = _number(payload, "batch_size", 1), _number(payload, "n_iter", 1)
    limits.check_images(batch_size * n_iter)
    settings["num_images"] = batch_size * n_iter
    settings["seed"] = draw_seed(payload.get("seed", -1))
    subseed_strength = _number(payload, "subseed_strength", 0.0, float)

    # The model: the server's (POST /options), this request's override, its refiner.
    overrides = payload.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise InvalidRequestError(f"override_settings: expected an object, got {type(overrides).__name__}")
    model = checkpoint
    if overrides.get("sd_model_checkpoint"):
        model = catalogue.find("checkpoints", str(overrides["sd_model_checkpoint"]),
                               "override_settings.sd_model_checkpoint")  # fmt: skip
    if model.source != DEFAULT_BASE:  # the published base is every job's own default
        models["base"] = model.source
    clip_skip = int(options.get("CLIP_stop_at_last_layers") or 1)
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = _number(overrides, "CLIP_stop_at_last_layers", 1)
    if clip_skip > 1:  # jobs.png_import._clip_skip: A1111 1.10 reads SDXL's penultimate layers whatever it says
        notes.append(f"CLIP_stop_at_last_layers {clip_skip}: not applied, as A1111 reads SDXL's penultimate layers "
                     "whatever it says")  # fmt: skip
    vae = str(overrides.get("sd_vae") or options.get("sd_vae") or "Automatic")
    if vae not in ("Automatic", "None"):
        where = "override_settings.sd_vae" if overrides.get("sd_vae") else "options sd_vae"
        settings["vae"] = catalogue.find("vae", vae, where).source
    for key in overrides:
        if overrides[key] in NEUTRAL_OVERRIDES.get(key, ()):  # A1111's default: nothing to apply
            continue
        if key not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"):
            notes.append(f"override_settings.{key}: not applied (this server applies sd_model_checkpoint, sd_vae "
                         "and CLIP_stop_at_last_layers)")  # fmt: skip
    refiner = payload.get("refiner_checkpoint")
    if refiner not in (None, "", "None"):
        listed = catalogue.find("checkpoints", str(refiner), "refiner_checkpoint")
        switch = payload.get("refiner_switch_at")
        if switch is None:
            notes.append("refiner_checkpoint without refiner_switch_at: no refiner runs (as in A1111)")
        else:
            switch = _number(payload, "refiner_switch_at", 0.8, float)
            if not 0 < switch < 1:
                raise InvalidRequestError(f"refiner_switch_at: a fraction of the steps, 0..1, got {switch}")
            models["refiner"] = listed.source
            settings["refiner_switch"] = switch

    # The sampler: A1111's label (or its old combined "DPM++ 2M Karras", or an alias it lists) and schedule type.
    sampler = str(payload.get("sampler_name") or payload.get("sampler_index") or "Euler")
    schedule = str(payload.get("scheduler") or "Automatic")
    scheduler_name, why = tool_scheduler("A1111", sampler_alias(sampler), schedule, [steps])
    if scheduler_name is None:
        raise InvalidRequestError(
            f"sampler_name {sampler!r} with scheduler {schedule!r}: {why} (GET /sdapi/v1/samplers and /schedulers "
            "list what runs here)"
        )
    eta = _number(payload, "eta", 1.0, float)
    if eta != 1 and scheduler_name.startswith(ETA_SCHEDULERS):
        plain = "euler_" + scheduler_name.removeprefix("euler_a_")
        if eta == 0 and scheduler_name.startswith("euler_a_") and plain in SCHEDULER_TABLE:
            # k-diffusion's get_ancestral_step(eta=0) is (sigma_next, 0): Euler a adds no noise, its steps are Euler's
            scheduler_name = plain
            notes.append("eta 0: Euler a adds no noise with eta 0, so it runs as Euler (the same steps as A1111's)")
        else:
            notes.append(f"eta: {WHY_NOT['eta']}")
    settings["scheduler"] = scheduler_name

    if payload.get("script_name"):
        raise InvalidRequestError(f"script_name: Script {payload['script_name']!r} not found (this server runs none)")
    denoising: float | None = None
    if kind == "txt2img":
        denoising = _hires(payload, settings, catalogue, limits, notes, LATENT_UPSCALE_MODES, checkpoint=model)
    scripted = alwayson_scripts(
        payload.get("alwayson_scripts") or {}, limits, catalogue=catalogue, size=settings["size"],
        init_image=init_image, img2img=kind == "img2img",
    )  # fmt: skip
    notes.extend(scripted.notes)
    settings.update(scripted.settings)
    spec = JobSpec(prompt, settings=settings, conditions=(*conditions, *scripted.conditions), models=models)
    return A1111Job(
        spec, notes, kind, model, sampler=sampler, clip_skip=clip_skip, vae=vae,
        styles=list(payload.get("styles") or []), batch_size=batch_size,
        subseed=_number(payload, "subseed", -1), subseed_strength=subseed_strength, denoising_strength=denoising,
    )  # fmt: skip


# A1111's infotext keys -> its request fields (modules/infotext_utils.py paste fields), as 1.9+ reads a request's
# ``infotext``: a field the request gives itself wins.
INFOTEXT_FIELDS = {
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height",
    "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale", "Hires upscaler": "hr_upscaler",
    "Hires steps": "hr_second_pass_steps", "Refiner": "refiner_checkpoint", "Refiner switch at": "refiner_switch_at",
    "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
}  # fmt: skip


def _with_infotext(payload: Mapping[str, Any], notes: list[str], catalogue: Catalogue) -> dict[str, Any]:
    """``payload`` with the fields its ``infotext`` (an A1111 parameters text) gives where the payload gives none,
    as A1111 1.9+ reads it; its checkpoint (if listed) and clip skip go to ``override_settings`` as A1111 puts them
    there."""
    from .a1111_info import parse_parameters

    text = payload["infotext"]
    if not isinstance(text, str):
        raise InvalidRequestError(f"infotext: expected an A1111 parameters text, got {type(text).__name__}")
    read = parse_parameters(text)
    given = {key: read[name] for name, key in INFOTEXT_FIELDS.items() if name in read}
    if "hr_scale" in given:
        given["enable_hr"] = True
    overrides = dict(payload.get("override_settings") or {})
    if "Model" in read and "sd_model_checkpoint" not in overrides:
        try:  # a model this server does not list: the server's runs (A1111 drops an unknown one silently)
            overrides["sd_model_checkpoint"] = catalogue.find("checkpoints", read["Model"], "infotext Model").title
        except InvalidRequestError:
            notes.append(f"infotext Model {read['Model']!r}: not a model this server lists; its own runs")
    if read.get("Clip skip", "1") != "1":
        overrides.setdefault("CLIP_stop_at_last_layers", read["Clip skip"])
    if overrides:
        given["override_settings"] = overrides
    taken = {*INFOTEXT_FIELDS, "Model", "Clip skip", "Size", "Version", "Model hash"}
    skipped = [k for k in read if k not in taken]
    if skipped:
        notes.append(f"infotext: not read: {', '.join(skipped)}")
    return {**given, **{k: v for k, v in payload.items() if k != "infotext"}}


def _hires(
    payload: Mapping[str, Any],
    settings: dict[str, Any],
    catalogue: Catalogue,
    limits: Limits,
    notes: list[str],
    latent_modes: Mapping[str, str],
    *,
    checkpoint: Listed,
) -> float | None:
    """A1111's hires fix fields as the request's ``hires_*`` settings; the second pass's strength, if it runs."""
    if not payload.get("enable_hr"):
        return None
    width, height = settings["size"]
    scale = _number(payload, "hr_scale", 2.0, float)
    resize_x, resize_y = _number(payload, "hr_resize_x", 0), _number(payload, "hr_resize_y", 0)
    if resize_x or resize_y:  # A1111's calculate_target_resolution: a missing side follows the aspect
        scale = resize_x / width if resize_x else resize_y / height
        if resize_x and resize_y and abs(resize_y / height - scale) > 1e-6:
            notes.append(f"hr_resize_x/hr_resize_y {resize_x}x{resize_y}: another aspect than {width}x{height} is "
                         "not cropped to as A1111 does; scaled by the width's factor")  # fmt: skip
    if not 1 <= scale <= 4:
        raise InvalidRequestError(f"hr_scale: the hires fix enlarges 1..4 times here, got {scale:g}")
    limits.check_size(round(width * scale), round(height * scale), "the hires size (hr_scale x width, height)")
    settings["hires_scale"] = scale
    strength = _number(payload, "denoising_strength", 0.75, float)
    settings["hires_strength"] = strength
    if second := _number(payload, "hr_second_pass_steps", 0):
        limits.check_steps(second, "hr_second_pass_steps")
        settings["hires_steps"] = second
    upscaler = payload.get("hr_upscaler") or "Latent"  # A1111's latent_upscale_default_mode
    if upscaler in latent_modes:
        settings["upscaler"] = latent_modes[upscaler]
    elif upscaler == "Latent (antialiased)":  # offered by clients that list A1111's six modes (the Photoshop plugin)
        settings["upscaler"] = latent_modes["Latent"]
        notes.append("hr_upscaler 'Latent (antialiased)': run as 'Latent' (an enlargement's antialiased bilinear is "
                     "bilinear, to float rounding)")  # fmt: skip
    elif str(upscaler).startswith("Latent ("):
        raise InvalidRequestError(f"hr_upscaler: {upscaler!r} is not run here; the latent modes here are "
                                  f"{', '.join(latent_modes)} and 'Latent (antialiased)' (GET "
                                  "/sdapi/v1/latent-upscale-modes), or an upscaler /sdapi/v1/upscalers lists")  # fmt: skip
    elif str(upscaler).casefold() in ("none", "lanczos"):
        settings["upscaler"] = "lanczos"
    else:
        settings["upscaler"] = catalogue.find("upscale_models", str(upscaler), "hr_upscaler").source
    hr_checkpoint = payload.get("hr_checkpoint_name")
    if hr_checkpoint not in (None, "", "Use same checkpoint") and hr_checkpoint not in (
        checkpoint.title,
        checkpoint.name,
    ):
        notes.append(f"hr_checkpoint_name {hr_checkpoint!r}: the hires pass runs the first pass's model")
    for key in ("hr_prompt", "hr_negative_prompt"):
        own = payload.get(key)
        if own and own != payload.get(key.replace("hr_", "")):
            notes.append(f"{key}: the hires pass reads the first pass's prompts")
    return strength


def request_spec(
    kind: str,
    payload: Mapping[str, Any],
    options: Mapping[str, Any],
    limits: Limits | None = None,
    *,
    catalogue: Catalogue | None = None,
    checkpoint: Listed | None = None,
) -> tuple[JobSpec, list[str]]:
    """The job an A1111 ``txt2img`` or ``img2img`` request (``kind``) asks for, and what it asks that is not done
    (each with why), under the server's ``options`` (those a client set: the model...)."""
    job = read_job(kind, payload, options, limits, catalogue=catalogue, checkpoint=checkpoint)
    return job.spec, job.notes


def read_job(
    kind: str,
    payload: Mapping[str, Any],
    options: Mapping[str, Any],
    limits: Limits | None = None,
    *,
    catalogue: Catalogue | None = None,
    checkpoint: Listed | None = None,
) -> A1111Job:
    """An A1111 ``txt2img`` (:func:`read_request`) or ``img2img`` (:func:`read_img2img`) request as a job."""
    if kind == "img2img":
        return read_img2img(payload, options, limits, catalogue=catalogue, checkpoint=checkpoint)
    return read_request(payload, options, limits, kind=kind, catalogue=catalogue, checkpoint=checkpoint)


def read_img2img(
    payload: Mapping[str, Any],
    options: Mapping[str, Any],
    limits: Limits | None = None,
    *,
    catalogue: Catalogue | None = None,
    checkpoint: Listed | None = None,
) -> A1111Job:
    """An A1111 img2img request as a job: its first init image (base64 or a data URL), ``denoising_strength`` as
    the strength, a ``mask`` (inverted with ``inpainting_mask_invert``) with ``mask_blur``, and "Only masked"
    (``inpaint_full_res``) as a crop around the mask with ``inpaint_full_res_padding``."""
    from fastapi import HTTPException
    from PIL import ImageOps

    from .app import decode_image

    limits = limits or Limits()
    images = payload.get("init_images")
    if not images:
        raise HTTPException(404, "Init image not found (init_images: give one base64 image)")  # A1111's answer
    if not isinstance(images, list):
        raise InvalidRequestError(f"init_images: expected a list of base64 images, got {type(images).__name__}")
    init = decode_image(images[0], "init_images[0]", limits)
    job = read_request(
        payload, options, limits, kind="img2img", catalogue=catalogue, checkpoint=checkpoint, init_image=init
    )
    notes, settings = job.notes, dict(job.spec.settings)
    if len(images) > 1:
        notes.append(f"init_images: {len(images)} given; every image starts from the first")
    settings["init_image"] = init
    strength = _number(payload, "denoising_strength", 0.75, float)
    if not 0 <= strength <= 1:
        raise InvalidRequestError(f"denoising_strength: 0..1, got {strength}")
    settings["strength"] = strength
    width, height = settings["size"]
    resize_mode = _number(payload, "resize_mode", 0)
    if resize_mode != 1 and abs(init.width / init.height - width / height) > 0.01:
        notes.append(f"resize_mode {resize_mode}: an init image of another aspect than {width}x{height} is cropped "
                     "about its centre and resized (A1111's 'Crop and resize', resize_mode 1)")  # fmt: skip
    if payload.get("mask"):
        mask = decode_image(payload["mask"], "mask", limits)
        if payload.get("inpainting_mask_invert"):
            mask = ImageOps.invert(mask.convert("L"))
        settings["mask"] = mask
        blur = payload.get("mask_blur")
        if blur is None:
            blur_x, blur_y = _number(payload, "mask_blur_x", 4), _number(payload, "mask_blur_y", 4)
            if blur_x != blur_y:
                notes.append(f"mask_blur_x {blur_x}, mask_blur_y {blur_y}: one radius, the larger, feathers the mask")
            blur = max(blur_x, blur_y)
        settings["mask_blur"] = _number({"mask_blur": blur}, "mask_blur", 4)
        fill = _number(payload, "inpainting_fill", 0)
        if fill != 1:
            labels = {0: "fill", 2: "latent noise", 3: "latent nothing"}
            notes.append(f"inpainting_fill {fill} ({labels.get(fill, '?')}): the masked area starts from the "
                         "original image (A1111's 'original', 1)")  # fmt: skip
        if payload.get("inpaint_full_res", True):  # A1111's "Only masked": the mask's area, repainted at the size
            settings["padding_mask_crop"] = _number(payload, "inpaint_full_res_padding", 0)
        else:  # "Whole picture": A1111 pastes the original back outside the feathered mask (its overlay images)
            settings["paste_back"] = True
    spec = dataclasses.replace(job.spec, settings=settings)
    return dataclasses.replace(job, spec=spec, notes=notes, denoising_strength=strength)


def info_json(job: A1111Job, run: Any, images: list[Image.Image], infotexts: list[str], notes: list[str]) -> str:
    """A1111's ``info`` (``Processed.js()``): a JSON string of what was made, with the notes of what was not."""
    from ..base.version import VERSION
    from ..records.infotext import sampler_label
    from .a1111_info import parse_parameters

    request = run.request
    recipes = [getattr(image, "recipe", None) for image in images]
    seeds = [r["seed"] for r in recipes if r] or list(request.seeds)
    sampler: str = job.sampler
    schedule: str | None = "Automatic"
    if recipes and recipes[0]:
        scheduler = recipes[0].get("scheduler", {})
        sampler, schedule = sampler_label(scheduler.get("class", ""), scheduler.get("config", {}))
    core = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash", "Version", "Prompt",
            "Negative prompt", "Size-1", "Size-2", "Clip skip")  # fmt: skip
    extra = {k: v for k, v in parse_parameters(infotexts[0]).items() if k not in core} if infotexts[0] else {}
    if schedule and "Schedule type" not in extra:
        extra["Schedule type"] = schedule
    count = len(seeds)
    negative = request.negative_prompt or ""
    info = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": seeds[0] if seeds else None,
        "all_seeds": seeds,
        "subseed": job.subseed,
        "all_subseeds": [job.subseed] * count,
        "subseed_strength": job.subseed_strength,
        "width": request.size[0],
        "height": request.size[1],
        "sampler_name": sampler,
        "cfg_scale": request.guidance,
        "steps": request.steps,
        "batch_size": job.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.model.name if job.model is not None else None,
        "sd_model_hash": None,
        "sd_vae_name": None if job.vae in ("Automatic", "None") else job.vae,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": job.denoising_strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": job.styles,
        "job_timestamp": _timestamp(),
        "clip_skip": job.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": f"sdxl-control {VERSION}",
        NOT_DONE: notes,
    }
    return json.dumps(info, default=lambda _: None)


def _timestamp() -> str:
    import time

    return time.strftime("%Y%m%d%H%M%S")


def _answer(job: A1111Job, outcome: Outcome, run: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's TextToImageResponse/ImageToImageResponse: images as base64 PNGs carrying their infotext, the request's
    A1111 fields as ``parameters``, ``info`` as a JSON string. An interrupted or skipped job answers with its last
    live preview, as A1111 answers with the image as far as it got."""
    from .app import encode_png

    notes = list(job.notes)
    images: list[Image.Image] = list(outcome.result.images) if outcome.result is not None else []
    if outcome.result is None:
        how = "interrupted" if outcome.interrupted else "skipped"
        if outcome.preview is not None:
            images = [outcome.preview]
            notes.append(f"{how}: the answer is the job's last live preview (a draft decode), not a finished image")
        else:
            notes.append(f"{how} before its first live preview: no image")
    infotexts = [str(image.info.get("parameters", "")) for image in images] or [""]
    known = (*COMMON_FIELDS, *(TXT2IMG_FIELDS if job.kind == "txt2img" else IMG2IMG_FIELDS))
    parameters = {k: v for k, v in payload.items() if k in known}  # A1111 echoes its own fields only
    if job.kind == "img2img" and not payload.get("include_init_images"):
        parameters["init_images"], parameters["mask"] = None, None
    send = payload.get("send_images", True) is not False
    return {
        "images": [encode_png(image) for image in images] if send else [],
        "parameters": parameters,
        "info": info_json(job, run, images, infotexts if images else [""], notes),
    }


def router(state: ServerState) -> APIRouter:
    """The ``/sdapi/v1`` routes on the server's ``state``."""
    from .a1111_info import LATENT_UPSCALE_MODES, SAMPLERS, SCHEDULERS, Options, parse_parameters
    from .app import decode_image, encode_png

    api = APIRouter(prefix="/sdapi/v1")
    options = Options(state.config.preview_every)
    for key, value in options.current().items():
        state.options.setdefault(key, value)

    def read(payload: dict[str, Any], kind: str) -> A1111Job:
        return read_job(kind, payload, state.options, state.limits, catalogue=state.catalogue,
                        checkpoint=state.checkpoint)  # fmt: skip

    async def generate(request: Request, payload: dict[str, Any], kind: str) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        job = await run_in_threadpool(read, payload, kind)  # decoding images, reading the model folders
        outcome, run = await state.run(request, job.spec, kind)
        return await run_in_threadpool(_answer, job, outcome, run, payload)

    @api.post("/txt2img")
    async def txt2img(request: Request, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return await generate(request, payload, "txt2img")

    @api.post("/img2img")
    async def img2img(request: Request, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return await generate(request, payload, "img2img")

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        now = state.service.progress()
        image = None
        if now.current_image is not None and not skip_current_image and state.options.get("live_previews_enable"):
            image = encode_png(now.current_image)
        return {
            "progress": now.progress,
            "eta_relative": now.eta_relative,
            "state": {
                "skipped": now.skipped,
                "interrupted": now.interrupted,
                "job": now.job,
                "job_count": now.job_count,
                "job_timestamp": now.job_timestamp,
                "job_no": now.job_no,
                "sampling_step": now.sampling_step,
                "sampling_steps": now.sampling_steps,
            },
            "current_image": image,
            "textinfo": now.text,
        }

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        state.service.interrupt()
        return {}

    @api.post("/skip")
    def skip() -> dict[str, Any]:
        state.service.skip()
        return {}

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        return {**state.options, "sd_model_checkpoint": state.checkpoint.title}

    @api.post("/options")
    def set_options(payload: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        # Every key checked before any is set; the model is found by the names the catalogue lists (never a path).
        checked = {key: options.check(key, value) for key, value in payload.items()}
        chosen = state.checkpoint
        wanted = checked.pop("sd_model_checkpoint", None)
        if wanted is not None and wanted not in (chosen.title, chosen.name):
            chosen = state.catalogue.find("checkpoints", str(wanted), "sd_model_checkpoint")
        vae = checked.get("sd_vae")
        if vae is not None and vae not in ("Automatic", "None"):
            state.catalogue.find("vae", str(vae), "sd_vae")
        state.options.update(checked)
        # The next job loads it (through the Runner's model cache); a job already queued keeps the model it asked.
        state.checkpoint = chosen
        return None

    @api.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        config = state.config
        return {
            "api": True, "nowebui": True, "api_auth": None,  # never the credentials themselves
            "api_auth_enabled": bool(config.auth), "cors_allow_origins": ",".join(config.cors_origins) or None,
            "ckpt": state.catalogue.default().title, "device": config.device, "queue_size": config.queue_size,
            "max_side": config.limits.max_side, "max_steps": config.limits.max_steps,
            "max_images": config.limits.max_images,
        }  # fmt: skip

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return SAMPLERS

    @api.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return SCHEDULERS

    @api.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        builtin = [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in ("None", "Lanczos")
        ]
        files = [
            {"name": e.name, "model_name": e.name, "model_path": e.source, "model_url": None, "scale": 4}
            for e in state.catalogue.listed("upscale_models")
        ]
        return [*builtin, *files]

    @api.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": e.title,
                "model_name": e.name,
                "hash": None,
                "sha256": None,
                "filename": e.source,
                "config": None,
            }  # fmt: skip
            for e in state.catalogue.listed("checkpoints")
        ]

    @api.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": e.title, "filename": e.source} for e in state.catalogue.listed("vae")]

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [
            {"name": e.name, "alias": e.name, "path": e.source, "metadata": {}} for e in state.catalogue.listed("loras")
        ]

    @api.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        from ..base.errors import SdxlControlError
        from ..weights.embeddings import read_embedding

        loaded: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        for entry in state.catalogue.listed("embeddings"):
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0, "vectors": 0}
            try:
                embedding = read_embedding(entry.source, entry.name)
            except (SdxlControlError, OSError, ValueError):
                skipped[entry.name] = item
                continue
            # SDXL's two encoders' vectors side by side (768 + 1280 wide), as one embedding's width
            width = sum(int(v.shape[-1]) for v in embedding.vectors.values())
            loaded[entry.name] = {**item, "vectors": embedding.count, "shape": width}
        return {"loaded": loaded, "skipped": skipped}

    @api.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        # The alwayson scripts whose fields this server reads (see serve.extensions); webuiapi sends empty ControlNet
        # args when "controlnet m2m" is listed, which keeps its shared default dict from carrying stale units.
        names = ["controlnet", "controlnet m2m", "adetailer"]
        return {"txt2img": names, "img2img": names}

    def refresh() -> None:
        state.catalogue.refresh()  # one reading of the model folders lists every kind

    for kind in ("checkpoints", "loras", "vae", "embeddings"):
        api.add_api_route(f"/refresh-{kind}", refresh, methods=["POST"], name=f"refresh_{kind}")

    @api.post("/interrogate")
    def interrogate(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        # A1111 captions with CLIP or DeepDanbooru; no captioning model runs here, so the route answers 501 naming
        # what was asked (a client reading "caption" finds none) rather than a bare 404.
        from fastapi import HTTPException

        model = payload.get("model", "clip")
        raise HTTPException(501, f"/sdapi/v1/interrogate (model {model!r}): captioning is not offered by "
                                 "sdxl-control serve; caption images with another tool")  # fmt: skip

    @api.post("/png-info")
    def png_info(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        value = payload.get("image")
        if not value:
            return {"info": "", "items": {}, "parameters": {}}
        image = decode_image(value, "image", state.limits)
        texts = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
        info = texts.pop("parameters", "")
        items = {k: v for k, v in texts.items() if k not in ("exif", "dpi")}
        return {"info": info, "items": items, "parameters": parse_parameters(info) if info else {}}

    return api


def queue_router(state: ServerState) -> APIRouter:
    """Gradio's ``GET /queue/status`` at the host root, as A1111 1.10 (Gradio 3.41's ``Estimation``) answers it:
    some clients call it, not the API, to tell whether the server is up (Cyanic SD-Krita's ``SDAPI.init_api``)."""
    api = APIRouter()

    @api.get("/queue/status")
    def queue_status() -> dict[str, Any]:
        return {
            "msg": "estimation", "rank": None, "queue_size": state.service.queued(), "avg_event_process_time": None,
            "avg_event_concurrent_process_time": None, "rank_eta": None, "queue_eta": 0,
        }  # fmt: skip

    return api
