"""``sdxl-control serve`` as a process and its guards (issue 37, part 4): it binds 127.0.0.1 unless told otherwise,
``--listen`` needs ``--api-auth`` or ``--insecure``, HTTP Basic auth on every route (401 with ``WWW-Authenticate``)
and no auth at all without it (whatever ``Authorization`` header a client sends), CORS only for the origins given,
and SIGTERM during a job: the job stops at its next step, its client is answered, the process exits 0.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdxl_control.cli import main
from sdxl_control.serve.service import Ticket, describe
from tests.serving import free_port, running_server, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PROGRESS = "/sdapi/v1/progress"
PREFLIGHT = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("flags", [["--listen"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5"]])
def test_listening_beyond_this_machine_needs_api_auth_or_insecure(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--tiny", *flags]) == 2
    error = capsys.readouterr().err
    assert "--api-auth" in error and "--insecure" in error


@pytest.mark.parametrize(
    ("flags", "host", "auth", "origins"),
    [
        ([], "127.0.0.1", None, ()),
        (["--listen", "--insecure"], "0.0.0.0", None, ()),
        (["--listen", "--api-auth", "me:pw,you:a:b"], "0.0.0.0", {"me": "pw", "you": "a:b"}, ()),
        (
            ["--cors-allow-origins", "http://a.example, http://b.example"],
            "127.0.0.1",
            None,
            ("http://a.example", "http://b.example"),
        ),
    ],
)
def test_the_flags_make_the_config(
    flags: list[str], host: str, auth: Any, origins: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdxl_control.cli.serve as serve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "serve", lambda config, host, port, most: seen.update(config=config, host=host) or 0)
    assert main(["serve", "--tiny", "--max-body-mb", "3", *flags]) == 0
    assert seen["host"] == host
    assert seen["config"].auth == auth and seen["config"].cors_origins == origins
    assert seen["config"].limits.max_body_bytes == 3 * 2**20


@pytest.mark.parametrize("value", ["nocolon", ":pw", "me:"])
def test_a_malformed_api_auth_is_refused_naming_it(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--tiny", "--api-auth", value]) == 2
    assert "--api-auth" in capsys.readouterr().err


def test_with_api_auth_every_route_asks_for_the_credentials() -> None:
    """401 with ``WWW-Authenticate: Basic`` (A1111's --api-auth) for no, wrong, empty or garbled credentials, on the
    API, its OpenAPI schema and an unknown path alike; the right ones (from the webuiapi client too) pass."""
    import webuiapi

    with running_server(tiny_config(auth={"me": "secret"})) as (url, _app):
        for path in (PROGRESS, "/openapi.json", "/docs", "/no/such/route"):
            for header in (None, basic("me", "wrong"), basic("you", "secret"), "Basic", "Basic !!!", "Bearer x", ""):
                headers = {} if header is None else {"Authorization": header}
                answer = httpx.get(url + path, headers=headers, timeout=10)
                assert answer.status_code == 401, (path, header)
                assert answer.headers["www-authenticate"] == "Basic"
        assert httpx.post(url + "/sdapi/v1/interrupt", timeout=10).status_code == 401
        # Without --cors-allow-origins no preflight is answered before auth: an OPTIONS is a request like any other.
        assert httpx.options(url + "/sdapi/v1/txt2img", headers=PREFLIGHT, timeout=10).status_code == 401
        assert (
            httpx.get(url + PROGRESS, headers={"Authorization": basic("me", "secret")}, timeout=10).status_code == 200
        )
        port = int(url.rsplit(":", 1)[1])
        assert webuiapi.WebUIApi(port=port, username="me", password="secret").get_progress()["progress"] == 0
        refused = webuiapi.WebUIApi(port=port, username="me", password="nope").get_progress()
        assert refused["detail"] == "Incorrect username or password"  # what webuiapi hands its caller


def test_without_api_auth_any_authorization_header_is_ignored() -> None:
    """Open WebUI sends ``authorization: ''`` when no auth is set, SillyTavern ``Basic `` with nothing after it (on
    the wire ``Basic``: fetch trims a header value, and h11 refuses a trailing space) or ``Basic <b64("undefined")>``,
    the openai client ``Bearer <key>`` (notes/issue37_research_clients.md: open-webui backend/open_webui/routers/images.py
    get_automatic1111_api_auth; SillyTavern src/util.js getBasicAuthHeader @ 1ac6780e)."""
    with running_server(tiny_config()) as (url, _app):
        for header in ("", "Basic", "Basic dW5kZWZpbmVk", "Bearer sk-anything", basic("a", "b")):
            answer = httpx.get(url + PROGRESS, headers={"Authorization": header}, timeout=10)
            assert answer.status_code == 200, header


def test_cors_is_off_unless_origins_are_given() -> None:
    with running_server(tiny_config()) as (url, _app):
        preflight = httpx.options(url + "/sdapi/v1/txt2img", headers=PREFLIGHT, timeout=10)
        assert "access-control-allow-origin" not in preflight.headers
        assert preflight.status_code >= 400
        simple = httpx.get(url + PROGRESS, headers={"Origin": "http://app.example"}, timeout=10)
        assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_allows_the_origins_given_and_a_preflight_needs_no_credentials() -> None:
    """A browser's preflight carries no credentials: it is answered by the CORS rules, before auth; the request it
    clears still needs them, and its 401 carries the CORS headers so the page can read it."""
    config = tiny_config(auth={"me": "secret"}, cors_origins=("http://app.example",))
    with running_server(config) as (url, _app):
        preflight = httpx.options(
            url + "/sdapi/v1/txt2img", headers={**PREFLIGHT, "Access-Control-Request-Headers": "authorization"}
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(url + "/sdapi/v1/txt2img", headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        refused = httpx.get(url + PROGRESS, headers={"Origin": "http://app.example"}, timeout=10)
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "http://app.example"
        allowed = httpx.get(
            url + PROGRESS, headers={"Origin": "http://app.example", "Authorization": basic("me", "secret")}
        )
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"


def test_the_log_line_says_how_each_job_ended() -> None:
    from types import SimpleNamespace as NS

    from sdxl_control.serve.service import JobCancelledError, Outcome

    request = NS(num_images=1, size=(64, 64), steps=2, hires_scale=1.5, hires_steps=None)
    ticket = Ticket(9, NS(request=request), "img2img")
    done = describe(ticket, Outcome(result=NS(images=[1]), seconds=0.25))
    assert done == "job 9 img2img: 1 image 64x64, 2 steps + 2 hires steps, 0.2 s"
    assert describe(ticket, Outcome(None, interrupted=True, seconds=1.0)).startswith("job 9 img2img: interrupted")
    cancelled = describe(ticket, JobCancelledError("job 9 was stopped: its client went away", "client"))
    assert cancelled == "job 9 img2img: cancelled (job 9 was stopped: its client went away)"
    assert describe(ticket, RuntimeError("boom")) == "job 9 img2img: failed: RuntimeError: boom"


def test_sigterm_during_a_job_stops_it_answers_its_clients_and_exits_0(tmp_path: Path) -> None:
    """``sdxl-control serve --tiny`` as a process: SIGTERM while one job runs and another waits. The running job
    stops at its next step and the waiting one is dropped; both clients are answered 503 with Retry-After (openai
    retries it; a client of a server that is gone then sees its connection refused); the process exits 0 after
    uvicorn's graceful shutdown, and its log has a line per job and uvicorn's access log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sdxl_control", "serve", "--tiny", "--device", "cpu", "--port", str(port)]
    command += ["--max-steps", "1000"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(url + PROGRESS, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        answers: list[Any] = []

        def client(seed: int) -> None:
            body = {"prompt": "a fox", "steps": 1000, "width": 64, "height": 64, "seed": seed}
            try:
                answers.append(httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=300))
            except httpx.TransportError as exc:  # a closed connection is an answer too (documented)
                answers.append(exc)

        clients = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2)]
        clients[0].start()
        deadline = time.monotonic() + 120
        while httpx.get(url + PROGRESS, timeout=10).json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        clients[1].start()
        while httpx.get(url + PROGRESS, timeout=10).json()["state"]["job_count"] < 2:
            assert time.monotonic() < deadline, "the second job did not queue"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0, log.read_text()
        for thread in clients:
            thread.join(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    text = log.read_text()
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, httpx.Response), f"{answer!r}\n{text}"
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
        assert "shutting down" in answer.json()["detail"]
    assert "job 1 txt2img: cancelled" in text and "job 2 txt2img: cancelled" in text, text
    assert '"POST /sdapi/v1/txt2img HTTP/1.1" 503' in text  # uvicorn's access log
    assert "Finished server process" in text


def test_with_api_auth_a_websocket_is_closed_before_it_opens() -> None:
    """No route speaks WebSocket today; one added later is behind the same credentials."""
    from fastapi import WebSocket
    from fastapi.testclient import TestClient
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    from sdxl_control.serve.app import create_app
    from sdxl_control.serve.service import JobService

    class Idle:
        def close(self) -> None:
            pass

    app = create_app(tiny_config(auth={"me": "secret"}), JobService(Idle(), queue_size=1))  # type: ignore[arg-type]

    async def echo(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("open")
        await socket.close()

    app.router.routes.append(WebSocketRoute("/echo", echo))  # Starlette's: no annotation for FastAPI to resolve

    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/echo") as socket:
            socket.receive_text()
        assert closed.value.code == 1008
        with client.websocket_connect("/echo", headers={"Authorization": basic("me", "secret")}) as socket:
            assert socket.receive_text() == "open"
