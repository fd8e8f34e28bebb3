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
import io
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.defaults import DRAFT_DECODER
from ..base.errors import InvalidRequestError, SdxlControlError
from .catalogue import Catalogue, Listed
from .service import JobCancelledError, JobService, Outcome, ServerBusyError

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from PIL import Image

    from ..jobs.resolvers import Resolver
    from ..jobs.spec import JobSpec

__all__ = ["ServeConfig", "Limits", "ServerState", "create_app", "decode_image", "encode_png"]

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


class ServerState:
    """What the routes share: the config, the job service, the options clients set (the model among them)."""

    def __init__(self, config: ServeConfig, service: JobService) -> None:
        self.config = config
        self.service = service
        self.limits = config.limits
        # The A1111 options a client set (POST /sdapi/v1/options), over A1111's defaults; the model chosen by title.
        self.options: dict[str, Any] = {}
        self.catalogue = Catalogue(self.resolver.folders, base=config.base, refiner=config.refiner)
        self.checkpoint: Listed = self.catalogue.default()  # the model jobs run on until a client chooses another

    @property
    def resolver(self) -> Resolver:
        from ..jobs.resolvers import HubResolver

        return self.config.resolver or HubResolver()

    async def run(self, request: Request, spec: JobSpec, label: str) -> tuple[Outcome, Any]:
        """Resolve ``spec`` (errors: 422 naming the input), queue it (full: 503), and wait for its outcome while the
        client stays; a client that goes away cancels its job. Returns the outcome and the resolved job."""
        from starlette.concurrency import run_in_threadpool

        from ..jobs.spec import resolve

        job = await run_in_threadpool(resolve, spec, self.resolver)
        ticket = self.service.submit(job, label)
        waiting = asyncio.wrap_future(ticket.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    return waiting.result(), job
                if await request.is_disconnected():
                    ticket.cancel()
                    log.info("job %d: its client went away; cancelled", ticket.id)
                    raise JobCancelledError("the client went away")
        except asyncio.CancelledError:
            ticket.cancel()
            raise


def decode_image(value: Any, what: str, limits: Limits) -> Image.Image:
    """An image sent as base64, raw or as a ``data:image/...;base64,`` URL (A1111 takes both); a URL or a path is
    refused, never fetched or opened. Errors name ``what`` (the field)."""
    from PIL import Image, ImageOps

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


def create_app(config: ServeConfig, service: JobService | None = None) -> FastAPI:
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
        )
    state = ServerState(config, service)
    app = FastAPI(title="sdxl-control", description="The A1111 web API and OpenAI's images API on sdxl-control")
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
        return error(499 if "client" in str(exc) else 503, exc)

    @app.exception_handler(SdxlControlError)
    async def invalid(request: Request, exc: SdxlControlError) -> Any:
        from ..base.errors import InputError, ModelNotFoundError

        status = 422 if isinstance(exc, (InvalidRequestError, ValueError, InputError)) else 500
        if isinstance(exc, ModelNotFoundError):
            status = 404
        return error(status, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error(exc.status_code, exc, str(exc.detail), headers=getattr(exc, "headers", None))

    _guard(app, config)
    app.include_router(a1111.router(state))
    app.include_router(openai_images.router(state))
    app.include_router(extensions.router(state))
    return app


def _guard(app: FastAPI, config: ServeConfig) -> None:
    """Auth (HTTP Basic, as A1111's --api-auth, on every route), CORS (only the origins given) and the body bound,
    as middleware so no route can forget them."""
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
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        expected = credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    class Guard:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            if credentials and scope.get("method") != "OPTIONS" and not authorised(scope):
                await refuse(401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})(scope, receive, send)
                return
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await refuse(413, f"the request body is over the server's {limit} bytes")(scope, receive, send)
                return
            seen = 0

            async def bounded() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, bounded, send)
            except _BodyTooLarge:
                await refuse(413, f"the request body is over the server's {limit} bytes")(scope, receive, send)

    app.add_middleware(Guard)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )


class _BodyTooLarge(Exception):
    pass
