"""``sdxl-control serve``: one FastAPI app that speaks the A1111 web API (``/sdapi/v1/...``, the ControlNet
extension's ``/controlnet/...``) and OpenAI's images API (``/v1/images/...``), so the clients written for those drive
sdxl-control. Every route only translates its client's request into a :class:`~sdxl_control.jobs.spec.JobSpec`,
resolves it and hands it to the one :class:`~sdxl_control.serve.service.JobService` (one worker on one
:class:`~sdxl_control.jobs.runner.Runner`); none knows a condition family's details.

What the server guards, whatever the client (see :class:`ServeConfig`): HTTP Basic auth when credentials are given,
CORS only for the origins given, a bounded body, bounded image sides, steps and batch, and models chosen only by the
names the server lists (no path in a request reaches the file system).

Example:
    >>> from sdxl_control.jobs.resolvers import TinyResolver
    >>> app = create_app(ServeConfig(resolver=TinyResolver()))                     # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=7861)               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.defaults import DRAFT_DECODER
from ..base.errors import InvalidRequestError, SdxlControlError
from .catalogue import Catalogue, Listed
from .service import JobCancelledError, Jobs, JobService, Outcome, ServerBusyError, Ticket

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from PIL import Image

    from ..jobs.resolvers import Resolver
    from ..jobs.spec import JobSpec

__all__ = ["ServeConfig", "Limits", "ServerState", "create_app", "decode_image", "read_image_bytes", "encode_png"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the body's bytes, an image side (given or asked for) and its pixels, steps,
    images per request (``batch_size`` × ``n_iter``, OpenAI's ``n``).

    Example:
        >>> Limits().max_side
        4096
    """

    max_body_bytes: int = 64 * 2**20
    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    max_steps: int = 200
    max_images: int = 16

    def check_size(self, width: int, height: int, what: str) -> None:
        if width < 8 or height < 8 or width > self.max_side or height > self.max_side:
            raise InvalidRequestError(
                f"{what}: {width}x{height} is outside 8..{self.max_side} a side (the server's --max-side)"
            )
        if width * height > self.max_pixels:
            raise InvalidRequestError(f"{what}: {width}x{height} is over the server's {self.max_pixels} pixels")

    def check_steps(self, steps: int, what: str = "steps") -> None:
        if not 1 <= steps <= self.max_steps:
            raise InvalidRequestError(f"{what}: {steps} is outside 1..{self.max_steps} (the server's --max-steps)")

    def check_images(self, count: int, what: str = "batch_size x n_iter") -> None:
        if not 1 <= count <= self.max_images:
            raise InvalidRequestError(f"{what}: {count} images is outside 1..{self.max_images} (--max-images)")

    def check_settings(self, settings: Mapping[str, Any], fields: Mapping[str, str] | None = None) -> None:
        """The request settings a front-end made of a client's request, before anything resolves (``--tiny``
        shrinks a size as it resolves, so the size asked is checked here): size, steps, hires steps and scale,
        number of images. ``fields`` names each setting as the client sent it (default: A1111's fields)."""
        names = {**A1111_FIELDS, **(fields or {})}
        size = settings.get("size")
        if size is not None:
            width, height = _ints(size, names["size"])
            self.check_size(width, height, names["size"])
            scale = settings.get("hires_scale")
            if scale is not None:
                scale = _number(scale, names["hires_scale"])
                self.check_size(
                    round(width * scale), round(height * scale), f"{names['size']} x {names['hires_scale']}"
                )
        for key in ("steps", "hires_steps"):
            if settings.get(key) is not None:
                self.check_steps(_ints(settings[key], names[key])[0], names[key])
        if settings.get("num_images") is not None:
            self.check_images(_ints(settings["num_images"], names["num_images"])[0], names["num_images"])

    def check_request(self, request: Any, fields: Mapping[str, str] | None = None) -> None:
        """The resolved request (a :class:`~sdxl_control.passes.request.GenerationRequest`): what a preset, a recipe
        or an image made of the settings is held to the same limits; an init image's own size too."""
        names = {**A1111_FIELDS, **(fields or {})}
        settings = {
            "size": request.size,
            "steps": request.steps,
            "hires_steps": request.hires_steps,
            "hires_scale": request.hires_scale,
            "num_images": request.num_images,
        }
        self.check_settings(settings, names)
        init = getattr(request, "init_image", None)
        if init is not None and hasattr(init, "size"):
            width, height = init.size
            self.check_size(int(width), int(height), names["init_image"])


# How the A1111 API names the settings the limits hold (the OpenAI route passes its own: size, n).
A1111_FIELDS = {
    "size": "width x height",
    "steps": "steps",
    "hires_steps": "hr_second_pass_steps",
    "hires_scale": "hr_scale",
    "num_images": "batch_size x n_iter",
    "init_image": "init_images",
}


def _ints(value: Any, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{what}: {value!r} is not a whole number") from None


def _number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{what}: {value!r} is not a number") from None


@dataclass(frozen=True)
class ServeConfig:
    """How ``sdxl-control serve`` serves: the model ``resolver`` (the tiny stand-ins under ``--tiny``), the default
    ``base`` and ``refiner`` (None: the published SDXL ones), the ``device``, the queue's length, HTTP Basic
    credentials (``auth``: user -> password; none: no auth), the CORS origins allowed, the request :class:`Limits`,
    and the live previews' step interval and decoder.

    Example:
        >>> ServeConfig(resolver=None, auth={"me": "secret"}).queue_size
        8
    """

    resolver: Resolver | None
    base: str | None = None
    refiner: str | None = None
    device: str | None = None
    queue_size: int = 8
    auth: Mapping[str, str] | None = None
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    preview_every: int = 5
    preview_decoder: str | None = DRAFT_DECODER
    progress_bar: bool = True
    # Told of each job's end (the server's log line, see serve.service.describe); None: nothing is said.
    on_job: Callable[[Ticket, Outcome | BaseException], None] | None = None


class ServerState:
    """What the routes share: the config, the job service, the options clients set (the model among them)."""

    def __init__(self, config: ServeConfig, service: Jobs) -> None:
        self.config = config
        self.service = service
        self.limits = config.limits
        # The A1111 options a client set (POST /sdapi/v1/options), over A1111's defaults; the model chosen by title.
        self.options: dict[str, Any] = {}
        self.catalogue = Catalogue(self.resolver.folders, base=config.base, refiner=config.refiner)
        self.checkpoint: Listed = self.catalogue.default()  # the model jobs run on until a client chooses another
        self._resolving = threading.Lock()

    @property
    def resolver(self) -> Resolver:
        from ..jobs.resolvers import HubResolver

        return self.config.resolver or HubResolver()

    async def run(
        self, request: Request, spec: JobSpec, label: str, *, fields: Mapping[str, str] | None = None
    ) -> tuple[Outcome, Any]:
        """Check ``spec`` against the server's limits and its listed models, resolve it (errors: 422 naming the
        input), queue it (full: 503), and wait for its outcome while the client stays; a client that goes away
        cancels its job (dropped from the queue, or stopped at its next step). Every route runs its jobs here, so
        none can skip a check. ``fields`` names the settings as the route's clients send them (default A1111's).
        Returns the outcome and the resolved job."""
        from starlette.concurrency import run_in_threadpool

        from ..jobs.spec import resolve

        self.limits.check_settings(spec.settings, fields)
        self.check_models(spec)
        job = await run_in_threadpool(self._resolve, resolve, spec)
        self.limits.check_request(job.request, fields)
        ticket = self.service.submit(job, label)
        waiting = asyncio.ensure_future(asyncio.wrap_future(ticket.future))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    return waiting.result(), job
                # Starlette reads http.disconnect without waiting; uvicorn sends it once the socket closes.
                if await request.is_disconnected():
                    ticket.cancel()  # (its reason defaults to "client"; a service of this interface may take none)
                    log.info("job %d: its client went away; cancelled", ticket.id)
                    raise JobCancelledError("the client went away", "client")
        except asyncio.CancelledError:  # the server cancelled this request (a forced shutdown)
            ticket.cancel()
            raise
        finally:
            if not waiting.done():
                waiting.cancel()
            elif not waiting.cancelled():
                waiting.exception()  # read, so asyncio does not report it as never retrieved

    def _resolve(self, resolve: Callable[..., Any], spec: JobSpec) -> Any:
        # One at a time: a resolver is not made for threads (the tiny one writes its models on first use, the hub
        # one reads embeddings and folders), and resolving is short next to the job it queues.
        with self._resolving:
            return resolve(spec, self.resolver)

    def check_models(self, spec: JobSpec) -> None:
        """Every model ``spec`` would load is one this server lists (:class:`~sdxl_control.serve.catalogue.Catalogue`):
        a checkpoint by its listed source or name; a VAE, upscaler or decoder, and a condition's model, never a path
        (or hub id, for the settings) the server did not list. So no path a client sends reaches the file system."""
        for key in ("base", "refiner", "unet"):
            value = spec.models.get(key)
            if value is not None and not self._listed(value, "checkpoints", "unet", "diffusion_models"):
                raise InvalidRequestError(
                    f"{key}: {value!r} is not a model this server lists; choose one of GET /sdapi/v1/sd-models by "
                    "its title"
                )
        for key, kind in (("vae", "vae"), ("decoder", "vae_approx"), ("upscaler", "upscale_models")):
            value = spec.settings.get(key)
            if isinstance(value, str) and _names_a_model_file(value, hub_ids=True) and not self._listed(value, kind):
                raise InvalidRequestError(f"{key}: {value!r} is not a {kind} model this server lists")
        for condition in spec.conditions:
            self._check_condition(condition)
        for key in ("init_image", "mask"):
            if isinstance(spec.settings.get(key), (str, os.PathLike)):
                raise InvalidRequestError(f"{key}: a server reads images from the request, never files it names")
        for name, values in spec.inputs.items():
            if any(isinstance(v, (str, os.PathLike)) for v in values):
                raise InvalidRequestError(f"{name}: a server reads images from the request, never files it names")
        for key, value in (("preset", spec.preset), ("face_pack", spec.face_pack)):
            if isinstance(value, str) and _names_a_model_file(value, hub_ids=True):
                raise InvalidRequestError(f"{key}: {value!r} names a file; a server takes only names")
        for key in ("base", "refiner"):
            value = (spec.recipe or {}).get(key)
            if isinstance(value, str) and not self._listed(value, "checkpoints"):
                raise InvalidRequestError(f"the recipe's {key}: {value!r} is not a model this server lists")

    def _check_condition(self, condition: Any) -> None:
        """A condition's fields that name files (its ``path_fields``: images, masks, faces, models) hold no path
        the server did not list: its models are listed ones (or the family's defaults), its images are images."""
        import dataclasses

        defaults = {f.name: f.default for f in dataclasses.fields(condition)}
        models = getattr(condition, "model_fields", {})
        where = getattr(condition, "kind", type(condition).__name__)
        for name in getattr(condition, "path_fields", ()):
            for value in _strings(getattr(condition, name, None)):
                if value == defaults.get(name) or not _names_a_model_file(value, hub_ids=False):
                    continue
                if name in models and self._listed(value, models[name]):
                    continue
                what = f"a {models[name]} model this server lists" if name in models else "an image sent in the request"
                raise InvalidRequestError(f"{where}.{name}: {value!r} is not {what}; a server opens no path it is sent")

    def _listed(self, value: Any, *kinds: str) -> bool:
        text = str(value)
        for kind in kinds:
            for entry in self.catalogue.listed(kind):
                names = {entry.source, entry.title, entry.name, *((str(entry.file),) if entry.file else ())}
                if text in names:
                    return True
        return False


def _strings(value: Any) -> Iterator[str]:
    """The strings (and paths) in a field's value, in its lists and mappings too."""
    if isinstance(value, (str, os.PathLike)):
        yield os.fspath(value) if not isinstance(value, str) else value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _names_a_model_file(text: str, *, hub_ids: bool) -> bool:
    """Whether a model name a request carries could reach the file system (a path) or, with ``hub_ids``, the hub."""
    from ..base.files import looks_like_hub_id, looks_local

    return looks_local(text) or os.path.isabs(text) or (hub_ids and looks_like_hub_id(text))


def decode_image(value: Any, what: str, limits: Limits) -> Image.Image:
    """An image sent as base64, raw or as a ``data:image/...;base64,`` URL (A1111 takes both); a URL or a path is
    refused, never fetched or opened. Errors name ``what`` (the field)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{what}: expected a base64 image, got {type(value).__name__}")
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise InvalidRequestError(f"{what}: image URLs are not fetched by this server; send the image as base64")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or ";base64" not in header:
            raise InvalidRequestError(f"{what}: a data URL must be data:image/...;base64,<data>")
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{what}: not valid base64 ({exc})") from None
    return read_image_bytes(data, what, limits)


def read_image_bytes(data: bytes, what: str, limits: Limits) -> Image.Image:
    """An image file's bytes (a base64 image decoded, a multipart upload) read within ``limits``: its sides checked
    from the header before its pixels are decoded, its EXIF orientation applied. Errors name ``what``."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            limits.check_size(*opened.size, what)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except SdxlControlError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"{what}: not a readable image ({exc})") from None
    return image


def encode_png(image: Image.Image, texts: Mapping[str, str] | None = None) -> str:
    """``image`` as base64 PNG (no data: prefix, as A1111 answers), with ``texts`` as PNG text chunks; an image
    that carries its recipe (a generated one) carries it and its A1111 ``parameters`` text, as its saved file does."""
    from PIL import PngImagePlugin

    from ..records.recipe import RecipeImage

    info = image.pnginfo() if isinstance(image, RecipeImage) else PngImagePlugin.PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(config: ServeConfig, service: Jobs | None = None) -> FastAPI:
    """The app, its routes on ``service`` (default: a new one on a new Runner for ``config.device``)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..jobs.runner import Runner
    from . import a1111, extensions, openai_images

    if service is None:
        service = JobService(
            Runner(device=config.device),
            queue_size=config.queue_size,
            preview_every=config.preview_every,
            preview_decoder=config.preview_decoder,
            progress_bar=config.progress_bar,
            on_job=config.on_job,
        )
    state = ServerState(config, service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn's graceful shutdown: the open requests have been answered; the worker ends (a job still running,
        # from a client that left, stops at its next step) and the models are let go.
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(service.close, 60)

    app = FastAPI(
        title="sdxl-control",
        description="The A1111 web API and OpenAI's images API on sdxl-control",
        lifespan=lifespan,
    )
    app.state.server = state

    def error(status: int, exc: BaseException, detail: str = "", headers: dict[str, str] | None = None) -> Any:
        # A1111's shape (modules/api/api.py handle_exception): clients print "detail" or "errors".
        body = {"error": type(exc).__name__, "detail": detail or str(exc), "body": "", "errors": str(exc)}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ServerBusyError)
    async def busy(request: Request, exc: ServerBusyError) -> Any:
        return error(503, exc, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(JobCancelledError)
    async def cancelled(request: Request, exc: JobCancelledError) -> Any:
        # 499 (nginx's "client closed request") goes to nobody: its client left. A job stopped because the server
        # stops is answered 503 with Retry-After, which clients (openai) retry.
        if exc.reason == "client":
            return error(499, exc)
        return error(503, exc, headers={"Retry-After": str(max(1, round(service.seconds_per_job)))})

    @app.exception_handler(SdxlControlError)
    async def invalid(request: Request, exc: SdxlControlError) -> Any:
        from ..base.errors import InputError, ModelNotFoundError

        status = 422 if isinstance(exc, (InvalidRequestError, ValueError, InputError)) else 500
        if isinstance(exc, ModelNotFoundError):
            status = 404
        return error(status, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        # A1111's answer to any other error (a bug, or a value no check foresaw): 500 in its shape, which clients
        # print; Starlette raises it again after this answer, so uvicorn logs the traceback; the server goes on.
        return error(500, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error(exc.status_code, exc, str(exc.detail), headers=getattr(exc, "headers", None))

    _guard(app, config)
    app.include_router(a1111.router(state))
    app.include_router(a1111.queue_router(state))
    app.include_router(openai_images.router(state))
    app.include_router(extensions.router(state))
    return app


def _guard(app: FastAPI, config: ServeConfig) -> None:
    """Auth (HTTP Basic, as A1111's --api-auth, on every route and method), the body bound, and CORS (only the
    origins given), as ASGI middleware so no route can forget them.

    The body is read here, whole, before the app sees it: a body over the bound (declared, or chunked without a
    length) is refused with 413 as soon as its bytes pass the bound, instead of a route's parser failing on a cut
    body. With auth off, an ``Authorization`` header is ignored, whatever it holds (Open WebUI sends an empty one,
    SillyTavern ``Basic `` with nothing after it). CORS wraps the guard, so a browser's preflight (which never
    carries credentials) is answered by the CORS rules alone, and a 401 still carries the CORS headers."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    limit = config.limits.max_body_bytes
    credentials = dict(config.auth or {})

    def refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": "HTTPException", "detail": detail, "body": "", "errors": f"{status}: {detail}"}
        return JSONResponse(body, status_code=status, headers=headers)

    def authorised(scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            # OpenAI's clients (Open WebUI's OpenAI engine among them) send only "Bearer <API key>": a key of
            # USER:PASSWORD is taken as those credentials.
            user, colon, password = encoded.strip().partition(":")
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return False
            user, colon, password = decoded.partition(":")
        else:
            return False
        expected = credentials.get(user)
        # compare_digest on bytes: the time taken does not tell how much of the password was right.
        return bool(colon) and expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    too_large = f"the request body is over the server's {limit} bytes (its --max-body-mb)"

    class Guard:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "websocket" and credentials and not authorised(scope):
                await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
                return
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            if credentials and not authorised(scope):
                await refuse(401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})(scope, receive, send)
                return
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                await refuse(413, too_large, {"Connection": "close"})(scope, receive, send)
                return
            chunks: list[bytes] = []
            seen = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before its body came: nobody to answer
                body = message.get("body", b"")
                seen += len(body)
                if seen > limit:
                    await refuse(413, too_large, {"Connection": "close"})(scope, receive, send)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay() -> Message:
                # The body once, then the client's own messages: a route waiting on a job sees http.disconnect.
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)

    app.add_middleware(Guard)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
            # A page the user allowed (KoboldAI Lite's hosted one) calling this machine: Chrome's preflight asks
            # for private-network access, which Starlette refuses unless allowed.
            allow_private_network=True,
        )
