"""A real ``sdxl-control serve`` app on loopback for the tests that drive it with real clients (webuiapi, openai,
httpx): uvicorn in a thread on a free port, stopped and its job service closed when the block ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdxl_control.jobs.resolvers import TinyResolver
from sdxl_control.serve.app import ServeConfig, create_app

OTHER = "other_tiny.safetensors"  # a second checkpoint's title (its file name in models/Stable-diffusion)


class TwoCheckpoints(TinyResolver):
    """The tiny stand-ins, with an install's second checkpoint (:data:`OTHER`) as the tiny models of seed 1
    (TinyResolver alone runs every checkpoint as the tiny base of seed 0), so a model switch shows in the pixels.
    Here, not in a test module, so that a Ray replica given a config with it can import it."""

    def stages(self, base, refiner, unet, tiny_seed=None):  # type: ignore[no-untyped-def]
        if str(base).endswith(OTHER):
            tiny_seed = 1
        return super().stages(base, refiner, unet, tiny_seed)


def tiny_config(**changes: Any) -> ServeConfig:
    """The tiny models on the CPU, no progress bar, colour previews (no TAESD on this machine)."""
    settings: dict[str, Any] = {
        "resolver": TinyResolver(),
        "device": "cpu",
        "progress_bar": False,
        "preview_decoder": None,
        "preview_every": 1,
    }
    return ServeConfig(**{**settings, **changes})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(config: ServeConfig | None = None) -> Iterator[tuple[str, Any]]:
    """(base URL, the app) of a server on 127.0.0.1 running ``config`` (default: :func:`tiny_config`)."""
    import uvicorn

    app = create_app(config or tiny_config())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.server.service.close(timeout=60)
