"""``sdxl-control serve``: the A1111 web API (and OpenAI's images API) on this machine's models, or the tiny ones,
for the clients written for A1111: Open WebUI, SillyTavern, webuiapi scripts, editors' plugins."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER, DRAFT_DECODER
from ..base.errors import InvalidRequestError
from . import options
from .options import count, number

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver
    from ..serve.app import ServeConfig

__all__ = ["add_parser", "run", "parse_auth", "serve", "log_job"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the A1111 web API and OpenAI's images API (Open WebUI, SillyTavern, webuiapi...)",
        parents=[common],
    )
    serve.add_argument("--tiny", action="store_true", help="serve the built-in tiny models (offline demo, tests)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument(
        "--listen",
        action="store_true",
        help="listen on every interface (0.0.0.0), as A1111's --listen; needs --api-auth, or --insecure",
    )
    serve.add_argument("--port", type=count, default=7861, help="port (default 7861, A1111's API-only port)")
    serve.add_argument(
        "--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP Basic credentials every route asks for (as A1111's)"
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow --listen without --api-auth (anyone who reaches it may use it)"
    )
    serve.add_argument(
        "--cors-allow-origins", metavar="ORIGIN[,ORIGIN]", help="origins whose pages may call the API (default none)"
    )
    serve.add_argument("--base", help=f"the model served first (default {DEFAULT_BASE})")
    serve.add_argument("--refiner", help=f"the refiner for refiner_checkpoint requests (default {DEFAULT_REFINER})")
    serve.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    serve.add_argument("--queue-size", type=count, default=8, help="jobs that may wait; more are refused with 503")
    serve.add_argument("--max-side", type=count, default=4096, help="the largest image side a request may ask or send")
    serve.add_argument("--max-steps", type=count, default=200, help="the most steps a request may ask")
    serve.add_argument("--max-images", type=count, default=16, help="the most images one request may ask")
    serve.add_argument(
        "--max-connections",
        type=count,
        default=64,
        help="connections served at once (progress polls included); more are answered 503 by uvicorn",
    )
    serve.add_argument(
        "--max-body-mb", type=count, default=64, help="the largest request body, in MiB (base64 images included)"
    )
    serve.add_argument(
        "--preview-decoder",
        default=DRAFT_DECODER,
        metavar="MODEL",
        help="the live previews' tiny autoencoder (progress's current_image)",
    )
    ray = serve.add_argument_group("Ray Serve (--ray): the same API over several devices or machines")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: one model replica per GPU")
    ray.add_argument(
        "--ray-address", metavar="ADDRESS", help="--ray: the cluster to join (auto); default a local runtime"
    )
    ray.add_argument("--min-replicas", type=count, help="--ray: model replicas kept running (default 1)")
    ray.add_argument("--max-replicas", type=count, help="--ray: model replicas at most (default: one per GPU)")
    ray.add_argument(
        "--target-ongoing-requests",
        type=number,
        help="--ray: jobs running or waiting per replica that autoscaling aims at (default 1: more add a replica)",
    )
    ray.add_argument("--gpus-per-replica", type=number, help="--ray: GPUs each replica takes (default 1 with GPUs)")


def parse_auth(text: str | None) -> dict[str, str] | None:
    """``"u:p,u2:p2"`` as {user: password} (A1111's --api-auth); None for none."""
    if not text:
        return None
    out: dict[str, str] = {}
    for item in text.split(","):
        user, colon, password = item.strip().partition(":")
        if not colon or not user or not password:
            raise InvalidRequestError(f"--api-auth: {item.strip()!r} is not USER:PASSWORD")
        out[user] = password
    return out


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    from ..serve.app import Limits, ServeConfig

    options.library_output(getattr(args, "verbose", False))
    auth = parse_auth(args.api_auth)
    host = "0.0.0.0" if args.listen else args.host
    if host not in LOOPBACK and auth is None and not args.insecure:
        raise InvalidRequestError(
            f"{'--listen' if args.listen else '--host ' + host}: listening on {host} without --api-auth would let "
            "anyone who reaches this machine use it: give --api-auth USER:PASS, or --insecure if that is what you want"
        )
    config = ServeConfig(
        resolver=resolver,
        base=args.base,
        refiner=args.refiner,
        device=args.device,
        queue_size=args.queue_size,
        auth=auth,
        cors_origins=tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()),
        limits=Limits(
            max_body_bytes=args.max_body_mb * 2**20,
            max_side=args.max_side,
            max_steps=args.max_steps,
            max_images=args.max_images,
        ),
        preview_decoder=args.preview_decoder,
        on_job=log_job,
    )
    ray_flags = ("ray_address", "min_replicas", "max_replicas", "target_ongoing_requests", "gpus_per_replica")
    given: dict[str, Any] = {name: getattr(args, name) for name in ray_flags if getattr(args, name, None) is not None}
    if getattr(args, "ray", False):
        from ..serve.ray_serve import RayOptions, serve_on_ray

        low = args.min_replicas or 1
        ray = RayOptions(
            address=args.ray_address,
            min_replicas=low,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests or 1.0,
            gpus_per_replica=args.gpus_per_replica,
            host=host,
            port=args.port,
        )
        return serve_on_ray(config, ray)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InvalidRequestError(f"{flags}: only with --ray (serve as a Ray Serve application)")
    return serve(config, host, args.port, args.max_connections)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def log_job(ticket: Any, outcome: Any) -> None:
    """The server's line for each job, beside uvicorn's access log: ``job 3 txt2img: 4 images 1024x1024, 30 steps,
    12.3 s``, or refused / cancelled / interrupted / failed: why."""
    from ..serve.service import describe

    _job_log().info(describe(ticket, outcome))


def _job_log() -> logging.Logger:
    log = logging.getLogger("sdxl_control.serve.jobs")
    if not log.handlers:  # uvicorn's look ("INFO:     ..."), on the terminal whatever the root logger's level
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def serve(config: ServeConfig, host: str, port: int, max_connections: int | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; 0 once it has stopped.

    A stop signal makes uvicorn stop accepting connections and wait for the open requests; the job service is shut
    down at once (new jobs refused, queued ones cancelled, the running one stopped at its next step), so every
    waiting client is answered (503 with Retry-After) and the wait is short. Then the app's lifespan ends the worker.
    A second Ctrl-C forces the exit (uvicorn)."""
    import threading

    import uvicorn

    from ..serve.app import create_app

    app = create_app(config)
    service = app.state.server.service
    # Refuse new jobs, drop the queued ones and stop the running one, without waiting (close() where a service of
    # this interface has no shutdown()).
    stop = getattr(service, "shutdown", None) or (lambda: service.close(0))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # In a signal handler on the event loop's thread, which may hold the service's lock: a thread takes it.
            threading.Thread(target=stop, name="sdxl-control-shutdown", daemon=True).start()

    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=120,
        # Each open request may hold a body of up to --max-body-mb while it is read: a bound on how many there are.
        limit_concurrency=max_connections,
    )
    server = Server(settings)
    # uvicorn raises the signal again once it has shut down (for the handler it found); a SIGTERM handled gracefully
    # is a clean stop, so that handler ends the process with 0 (and a SIGTERM before uvicorn starts does the same).
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close(timeout=60)
    return 0


def _exit_cleanly(sig: int, frame: Any) -> None:
    raise SystemExit(0)
