"""OpenAI's images API (``POST /v1/images/generations``, ``POST /v1/images/edits``, and ``GET /v1/models``) as a
front-end: each request is translated into one :class:`~sdxl_control.jobs.spec.JobSpec` and run by the server's one
job service, as the A1111 routes run theirs. The shapes are those of the ``openai`` package's own types
(``openai/types/image_generate_params.py``, ``image_edit_params.py``, ``images_response.py``) and of what Open WebUI
sends (``backend/open_webui/routers/images.py``).

What this server decides where OpenAI's API names its own models and services:

- ``model``: a checkpoint the server lists (``GET /v1/models``, A1111's ``sd-models`` titles) runs that checkpoint;
  OpenAI's own names (``dall-e-2``, ``gpt-image-1`` ...), ``""`` or none run the server's current checkpoint (the one
  an A1111 client chose), said in the answer's ``sdxl_control.model``; any other name is refused, naming ``model``.
- ``response_format``: ``b64_json`` (the default). ``url`` is refused: the server keeps no files to link to, and a
  ``data:`` URL is no URL a client fetches (Open WebUI GETs a ``url`` after an SSRF check that refuses loopback).
- edits: the first image is the one edited (the ``mask``, OpenAI's RGBA PNG whose fully transparent pixels are
  repainted, applies to it, as OpenAI's docs say); further images are IP-Adapter references (the ``reference``
  input slot). No mask: the whole image is redrawn (img2img).
- the fields that ask for what this server cannot do (``style``, ``quality``, ``moderation`` ...) are listed in the
  answer's ``sdxl_control.not_done``; those whose result would differ from what was asked (a transparent background,
  gif or svg output, streaming) are refused, naming the field. An unknown field is refused, as OpenAI refuses it.
- sdxl-control's own fields, under A1111's names, for what OpenAI's API has no field for (Open WebUI's "OpenAI API
  params" setting and the ``openai`` package's ``extra_body`` send them): ``negative_prompt``, ``steps``,
  ``cfg_scale``, ``seed``, ``sampler_name``, ``scheduler``, and for edits ``denoising_strength``.

Errors on these routes answer in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), so the
``openai`` package raises its typed errors (``BadRequestError`` ...) with the message and ``param``.

Example:
    >>> spec, notes = generation_spec({"prompt": "a fox", "size": "64x64", "steps": 2, "style": "vivid"}, Limits())
    >>> spec.settings["size"], spec.settings["steps"], notes
    ((64, 64), 2, ["style 'vivid': this server has no styles; describe the style in the prompt"])
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ..base.errors import InvalidRequestError, SdxlControlError
from ..jobs.spec import JobSpec
from .app import Limits
from .service import JobCancelledError, ServerBusyError

if TYPE_CHECKING:
    from PIL import Image

    from .app import ServerState
    from .catalogue import Listed

# Our request settings as OpenAI's clients name them, for the limits' messages (steps and the sampler are our own
# extra fields under A1111's names).
OPENAI_FIELDS = {"size": "size", "num_images": "n", "steps": "steps", "init_image": "image", "mask": "mask"}

__all__ = ["router", "generation_spec", "edit_spec", "OpenAIError", "openai_mask"]

log = logging.getLogger(__name__)

# OpenAI's own model names (openai/types/image_model.py and the deprecated ones): they run the current checkpoint.
OPENAI_MODEL = re.compile(r"^(dall-e|gpt-image|chatgpt-image)", re.IGNORECASE)
# The fields of OpenAI's request types (image_generate_params.py, image_edit_params.py, openai 3.63.0).
GENERATE_FIELDS = frozenset(
    {"prompt", "background", "complexity", "frame_count", "frame_duration_ms", "model", "moderation", "n",
     "output_compression", "output_format", "partial_images", "quality", "response_format", "safety_identifier",
     "size", "style", "svg", "user", "stream"}
)  # fmt: skip
EDIT_FIELDS = GENERATE_FIELDS - {"style", "moderation"} | {"image", "image[]", "input_fidelity", "markup", "mask"}
# sdxl-control's own fields, under the names A1111 gives them.
OWN_FIELDS = frozenset({"negative_prompt", "steps", "cfg_scale", "seed", "sampler_name", "scheduler"})
EDIT_OWN_FIELDS = OWN_FIELDS | {"denoising_strength"}
# OpenAI's limit on the images one edit takes (image_edit_params.py: "You can provide up to 16 images").
MAX_EDIT_IMAGES = 16
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``status``, the message, the ``param`` (field) it is about, its ``code``
    and ``type``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _invalid(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param, code)


def _as_openai_error(exc: BaseException) -> OpenAIError:
    """Any error a route raised, as OpenAI would answer it. OpenAI answers a bad request with 400 (the A1111 routes
    answer 422, as A1111 does); the openai package retries 5xx, so a job stopped for good says so
    (``x-should-retry: false``)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from ..base.errors import InputError, ModelNotFoundError

    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ServerBusyError):
        return OpenAIError(503, str(exc), None, "server_busy", "server_error", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, JobCancelledError):
        return OpenAIError(499 if "client" in str(exc) else 503, str(exc), None, "cancelled", "server_error")
    if isinstance(exc, ModelNotFoundError):
        return OpenAIError(404, str(exc), "model", "model_not_found")
    if isinstance(exc, (InvalidRequestError, InputError)):  # what the request asked
        return OpenAIError(400, str(exc), _param_named(str(exc)), "invalid_value")
    if isinstance(exc, SdxlControlError):
        return OpenAIError(500, str(exc), None, None, "server_error")
    if isinstance(exc, RequestValidationError):
        return OpenAIError(400, str(exc), None, "invalid_request")
    if isinstance(exc, HTTPException):
        return OpenAIError(exc.status_code, str(exc.detail), None, None, headers=getattr(exc, "headers", None))
    log.exception("openai route failed")
    return OpenAIError(500, f"the server failed: {type(exc).__name__}: {exc}", None, None, "server_error")


def _param_named(message: str) -> str | None:
    """The field an error raised below the routes names first (``size must be ...``, ``num_images must ...``), in
    OpenAI's names where they differ."""
    first = re.match(r"[a-z_]+", message)
    word = first.group(0) if first else ""
    ours = {"num_images": "n", "size": "size", "steps": "steps", "seed": "seed", "strength": "denoising_strength",
            "guidance": "cfg_scale", "mask": "mask", "prompt": "prompt", "negative_prompt": "negative_prompt"}  # fmt: skip
    return ours.get(word)


class _OpenAIRoute(APIRoute):
    """A route whose every error, whatever raised it (the body's parsing, the request, the job), is answered in
    OpenAI's error shape; the app's handlers keep A1111's shape for the A1111 routes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error is answered, in OpenAI's shape
                return _as_openai_error(exc).response()

        return answer


def _integer(body: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise _invalid(key, f"expected a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _invalid(key, f"expected a whole number, got {value!r}") from None
    if not number.is_integer():
        raise _invalid(key, f"expected a whole number, got {value!r}")
    return int(number)


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _invalid(key, f"expected a number, got {value!r}") from None


def _choice(body: Mapping[str, Any], key: str, allowed: Sequence[str]) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise _invalid(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
    return str(value)


def parse_size(value: Any, limits: Limits) -> tuple[int, int] | None:
    """OpenAI's ``size`` ("1024x1024"; "auto" or none: None, the server's or the image's own size), within the
    server's limits and in whole multiples of 8, as the model's latents need."""
    if value is None or value == "" or value == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(value))
    if match is None:
        raise _invalid("size", f"{value!r} is not WIDTHxHEIGHT (e.g. '1024x1024') or 'auto'")
    width, height = int(match.group(1)), int(match.group(2))
    try:
        limits.check_size(width, height, f"size {value!r}")
    except InvalidRequestError as exc:
        raise OpenAIError(400, str(exc), "size", "invalid_value") from None
    if width % 8 or height % 8:
        raise _invalid("size", f"{width}x{height}: width and height must be whole multiples of 8 (e.g. '1024x1024')")
    return width, height


def _refusals_and_notes(body: Mapping[str, Any], allowed: frozenset[str], own: frozenset[str]) -> list[str]:
    """Refuses the fields this server cannot honour with the result asked for; the notes for those it ignores."""
    unknown = [key for key in body if key not in allowed and key not in own]
    if unknown:
        raise OpenAIError(
            400,
            f"Unknown parameter: {unknown[0]!r} (this server takes OpenAI's images fields and {', '.join(sorted(own))})",
            unknown[0],
            "unknown_parameter",
        )
    if body.get("stream") not in (None, False, "false", "False"):
        raise _invalid("stream", "this server answers whole images only; leave stream out (or false)")
    if body.get("response_format") == "url":
        raise _invalid(
            "response_format",
            "'url' is not served: this server keeps no files to link to; ask for 'b64_json' (the default)",
        )
    _choice(body, "response_format", ("b64_json", "url"))
    background = _choice(body, "background", ("transparent", "opaque", "auto"))
    if background == "transparent":
        raise _invalid("background", "'transparent' is not made by this server (SDXL makes opaque images); use "
                       "'opaque' or 'auto'")  # fmt: skip
    output_format = _choice(body, "output_format", ("png", "webp", "jpeg", "gif", "svg"))
    if output_format in ("gif", "svg"):
        raise _invalid("output_format", f"{output_format!r} is not made by this server; use png, jpeg or webp")
    compression = _integer(body, "output_compression")
    if compression is not None and not 0 <= compression <= 100:
        raise _invalid("output_compression", f"{compression} is outside 0..100")
    for key in ("markup", "svg"):
        if body.get(key) not in (None, ""):
            raise _invalid(key, "not supported by this server")
    notes = []
    if body.get("style") not in (None, ""):
        notes.append(f"style {body['style']!r}: this server has no styles; describe the style in the prompt")
    if body.get("quality") not in (None, "", "auto"):
        notes.append(f"quality {body['quality']!r}: not read; steps (this server's own field) sets the effort")
    for key in ("moderation", "complexity", "input_fidelity", "partial_images", "frame_count", "frame_duration_ms"):
        if body.get(key) not in (None, ""):
            notes.append(f"{key} {body[key]!r}: not read by this server")
    return notes


def _settings(body: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The request settings a generation or an edit asks for: the images (``n``), the size, and sdxl-control's own
    fields."""
    from ..base.samplers import tool_scheduler

    settings: dict[str, Any] = {}
    n = _integer(body, "n", 1)
    assert n is not None
    try:
        limits.check_images(n, "n")
    except InvalidRequestError as exc:
        raise OpenAIError(400, str(exc), "n", "invalid_value") from None
    settings["num_images"] = n
    size = parse_size(body.get("size"), limits)
    if size is not None:
        settings["size"] = size
    steps = _integer(body, "steps")
    if steps is not None:
        try:
            limits.check_steps(steps)
        except InvalidRequestError as exc:
            raise OpenAIError(400, str(exc), "steps", "invalid_value") from None
        settings["steps"] = steps
    if (guidance := _number(body, "cfg_scale")) is not None:
        settings["guidance"] = guidance
    seed = _integer(body, "seed")
    if seed is not None and seed != -1:  # -1: drawn, as A1111 reads it
        settings["seed"] = seed
    if body.get("negative_prompt"):
        settings["negative_prompt"] = str(body["negative_prompt"])
    sampler = body.get("sampler_name")
    if sampler:
        name, why = tool_scheduler("A1111", str(sampler), str(body.get("scheduler") or "Automatic"), [steps or 30])
        if name is None:
            raise _invalid("sampler_name", f"{sampler!r}: {why}")
        settings["scheduler"] = name
    elif body.get("scheduler"):
        raise _invalid("scheduler", "an A1111 schedule type goes with a sampler_name")
    return settings


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("prompt", "a text describing the image is required", "missing_required_parameter")
    return prompt


def generation_spec(body: Mapping[str, Any], limits: Limits) -> tuple[JobSpec, list[str]]:
    """The job an OpenAI ``images.generate`` body asks for (the model left to the caller: see :func:`choose_model`),
    and what it asks that is not done."""
    notes = _refusals_and_notes(body, GENERATE_FIELDS, OWN_FIELDS)
    return JobSpec(_prompt(body), settings=_settings(body, limits)), notes


def openai_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's ``mask`` as this toolkit's: OpenAI's is a PNG whose fully transparent pixels (alpha 0) mark where the
    image is edited (image_edit_params.py); ours is white where the image is repainted, black where it is kept."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise _invalid(
            "mask",
            f"a {mask.mode} image has no transparency; OpenAI's mask is a PNG with an alpha channel whose fully "
            "transparent pixels are repainted",
        )
    if mask.size != size:
        raise _invalid("mask", f"{mask.size[0]}x{mask.size[1]} is not the image's size {size[0]}x{size[1]}")
    return mask.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)


def edit_spec(
    body: Mapping[str, Any], images: Sequence[Image.Image], mask: Image.Image | None, limits: Limits
) -> tuple[JobSpec, list[str]]:
    """The job an OpenAI ``images.edit`` asks for: the first of ``images`` redrawn (where ``mask`` is transparent
    only, if given), the others as IP-Adapter references; and what it asks that is not done."""
    notes = _refusals_and_notes(body, EDIT_FIELDS, EDIT_OWN_FIELDS)
    prompt = _prompt(body)
    if not images:
        raise _invalid("image", "an image to edit is required (a file part named image, or image[])",
                       "missing_required_parameter")  # fmt: skip
    if len(images) > MAX_EDIT_IMAGES:
        raise _invalid("image", f"{len(images)} images: at most {MAX_EDIT_IMAGES} (OpenAI's limit)")
    settings = _settings(body, limits)
    first = images[0].convert("RGB")
    settings["init_image"] = first
    if mask is not None:
        settings["mask"] = openai_mask(mask, first.size)
    strength = _number(body, "denoising_strength")
    if strength is not None:
        settings["strength"] = strength
    inputs: dict[str, list[Any]] = {}
    if len(images) > 1:
        inputs["reference"] = [image.convert("RGB") for image in images[1:]]
    return JobSpec(prompt, settings=settings, inputs=inputs), notes


def choose_model(state: ServerState, name: Any) -> tuple[Listed, str | None]:
    """The checkpoint ``model`` names, and a note when it is not the one named: a listed title or name runs that
    checkpoint; OpenAI's own names, ``""`` or none run the server's current checkpoint."""
    text = "" if name is None else str(name).strip()
    if text in ("", "None"):
        return state.checkpoint, None
    try:
        return state.catalogue.find("checkpoints", text, "model"), None
    except InvalidRequestError as exc:
        if OPENAI_MODEL.match(text):
            current = state.checkpoint
            return current, f"model {text!r}: OpenAI's model; ran the server's current checkpoint {current.title!r}"
        raise OpenAIError(400, str(exc), "model", "model_not_found") from None


def _encode(image: Image.Image, output_format: str, compression: int | None) -> str:
    """``image`` as base64 in the format asked: a PNG carries its recipe and A1111 ``parameters`` text, as the A1111
    routes' PNGs do; JPEG and WebP at ``output_compression`` (OpenAI's "compression level", 100 the default: best)."""
    from .app import encode_png

    if output_format == "png":
        return encode_png(image)
    buffer = io.BytesIO()
    quality = 100 if compression is None else compression
    image.convert("RGB").save(buffer, format=FORMATS[output_format][0], quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _answer(
    state: ServerState, request: Request, body: Mapping[str, Any], spec: JobSpec, notes: list[str], label: str
) -> dict[str, Any]:
    """Runs ``spec`` on the model ``body`` names and answers OpenAI's ``ImagesResponse``."""
    import dataclasses

    listed, note = choose_model(state, body.get("model"))
    if note:
        notes.append(note)
        log.info("%s: %s", label, note)
    spec = dataclasses.replace(spec, models={**spec.models, "base": listed.source})
    outcome, job = await state.run(request, spec, label, fields=OPENAI_FIELDS)
    images = list(outcome.result.images) if outcome.result is not None else []
    if not images:
        why = "interrupted" if outcome.interrupted else "skipped" if outcome.skipped else "stopped"
        raise OpenAIError(503, f"the job was {why} before it made an image", None, why, "server_error",
                          {"x-should-retry": "false"})  # fmt: skip
    output_format = str(body.get("output_format") or "png")
    compression = _integer(body, "output_compression")
    width, height = images[0].size
    return {
        "created": int(time.time()),
        "data": [{"b64_json": _encode(image, output_format, compression)} for image in images],
        "background": "opaque",
        "output_format": output_format,
        "size": f"{width}x{height}",
        **({"safety_identifier": body["safety_identifier"]} if body.get("safety_identifier") else {}),
        # Beside OpenAI's fields (its client keeps unknown ones): what ran, and what was asked but not done.
        "sdxl_control": {
            "model": listed.title,
            "seeds": [image.recipe["seed"] for image in images if hasattr(image, "recipe")],
            "not_done": notes,
        },
    }


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"the body is not JSON ({exc})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object with a prompt", None, "invalid_json")
    return body


async def _form_body(request: Request, limits: Limits) -> tuple[dict[str, Any], list[Image.Image], Image.Image | None]:
    """An edit's multipart form: its text fields, its images (parts named ``image`` and ``image[]``, in order) and its
    mask, each file read as an image (errors name the field)."""
    from starlette.datastructures import UploadFile

    from .app import read_image_bytes

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise OpenAIError(400, f"an edit is sent as multipart/form-data (got {content_type or 'no content type'!r})",
                          None, "invalid_request")  # fmt: skip
    form = await request.form(max_files=MAX_EDIT_IMAGES + 2)
    fields: dict[str, Any] = {}
    images: list[Image.Image] = []
    mask = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("image", "image[]", "mask", "markup"):
                raise OpenAIError(400, f"Unknown file parameter: {key!r}", key, "unknown_parameter")
            data = await value.read()
            what = f"{key} ({value.filename or 'no filename'})"
            # The reader of A1111's base64 images, so an upload meets the same limits and errors.
            try:
                image = read_image_bytes(data, what, limits)
            except InvalidRequestError as exc:
                raise OpenAIError(400, str(exc), "mask" if key == "mask" else "image", "invalid_image") from None
            if key == "mask":
                mask = image
            elif key == "markup":
                fields["markup"] = True
            else:
                images.append(image)
        elif key in ("image", "image[]", "mask"):
            raise _invalid("image" if key != "mask" else "mask", "expected a file part, got a text field")
        else:
            fields[key] = value
    return fields, images, mask


def router(state: ServerState) -> APIRouter:
    """The ``/v1/images`` routes and ``/v1/models`` on the server's ``state``."""
    api = APIRouter(prefix="/v1", route_class=_OpenAIRoute)

    @api.post("/images/generations")
    async def generations(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        spec, notes = generation_spec(body, state.limits)
        return await _answer(state, request, body, spec, notes, "openai generations")

    @api.post("/images/edits")
    async def edits(request: Request) -> dict[str, Any]:
        body, images, mask = await _form_body(request, state.limits)
        spec, notes = edit_spec(body, images, mask, state.limits)
        return await _answer(state, request, body, spec, notes, "openai edits")

    @api.get("/models")
    def models() -> dict[str, Any]:
        # OpenAI's model list (GET /v1/models): the checkpoints, by the titles `model` takes.
        listed = state.catalogue.listed("checkpoints")
        return {
            "object": "list",
            "data": [{"id": e.title, "object": "model", "created": 0, "owned_by": "sdxl-control"} for e in listed],
        }

    return api
