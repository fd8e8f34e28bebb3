"""The A1111 web API (``/sdapi/v1/...``, A1111 1.10's routes and shapes) as a front-end: each request is translated
into one :class:`~sdxl_control.jobs.spec.JobSpec` and run by the server's one job service.

Example:
    >>> spec, notes = txt2img_spec({"prompt": "a fox", "steps": 4, "seed": 3, "sampler_name": "Euler a"}, {})
    >>> spec.prompt, spec.settings["steps"], spec.settings["scheduler"], spec.settings["seed"]
    ('a fox', 4, 'euler_a_linspace', 3)
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Request

from ..base.errors import InvalidRequestError
from ..jobs.spec import JobSpec
from .app import Limits

if TYPE_CHECKING:
    from .app import ServerState

__all__ = ["router", "txt2img_spec"]

# A1111's draw for seed -1 (modules/processing.py get_fixed_seed): random.randrange(4294967294).
SEED_RANGE = 4294967294


def draw_seed(value: Any) -> int:
    """A request's seed as A1111 reads it: '' or None or -1 draws one; a number in a string is read."""
    if value in (None, ""):
        value = -1
    try:
        seed = int(value)
    except (TypeError, ValueError):
        seed = -1
    return random.randrange(SEED_RANGE) if seed == -1 else seed


def txt2img_spec(
    payload: Mapping[str, Any], options: Mapping[str, Any], limits: Limits | None = None
) -> tuple[JobSpec, list[str]]:
    """The job an A1111 txt2img request asks for, and what it asks that is not done (each with why), under the
    server's ``options`` (those a client set: the model...)."""
    from ..base.samplers import tool_scheduler
    from .extensions import alwayson_scripts

    limits = limits or Limits()
    notes: list[str] = []
    settings: dict[str, Any] = {}
    prompt = str(payload.get("prompt") or "")
    if payload.get("negative_prompt"):
        settings["negative_prompt"] = str(payload["negative_prompt"])
    steps = int(payload.get("steps") or 50)
    settings["steps"] = steps
    settings["guidance"] = float(payload.get("cfg_scale", 7.0))
    settings["size"] = (int(payload.get("width") or 512), int(payload.get("height") or 512))
    settings["num_images"] = int(payload.get("batch_size") or 1) * int(payload.get("n_iter") or 1)
    settings["seed"] = draw_seed(payload.get("seed", -1))
    sampler = payload.get("sampler_name") or payload.get("sampler_index")
    if sampler:
        name, why = tool_scheduler("A1111", str(sampler), payload.get("scheduler") or "Automatic", [steps])
        if name is None:
            raise InvalidRequestError(f"sampler_name {sampler!r}: {why}")
        settings["scheduler"] = name
    scripted = alwayson_scripts(payload.get("alwayson_scripts") or {}, limits, size=settings["size"])
    notes.extend(scripted.notes)
    settings.update(scripted.settings)
    return JobSpec(prompt, settings=settings, conditions=scripted.conditions), notes


def router(state: ServerState) -> APIRouter:
    """The ``/sdapi/v1`` routes on the server's ``state``."""
    from .app import encode_png

    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(request: Request, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        spec, notes = txt2img_spec(payload, state.options, state.limits)
        outcome, job = await state.run(request, spec, "txt2img")
        images = outcome.result.images if outcome.result is not None else []
        infotexts = [image.info.get("parameters", "") for image in images]
        info = {
            "prompt": spec.prompt,
            "seed": job.request.seed,
            "all_seeds": [image.recipe["seed"] for image in images],
            "infotexts": infotexts,
            "sdxl_control_not_done": notes,
        }
        return {
            "images": [encode_png(image) for image in images],
            "parameters": dict(payload),
            "info": json.dumps(info),
        }

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        now = state.service.progress()
        image = None
        if now.current_image is not None and not skip_current_image:
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

    return api
