"""``sdxl-control serve`` under load and faults, on loopback with the tiny models (issue 37, part 4): concurrent
clients are each answered once (200, or 503 with Retry-After when the queue is full), a client that leaves cancels its
job (out of the queue, or stopped at its next step, the models as before), bad input is refused with a 4xx naming the
field and the server keeps serving, and no path a request names reaches the file system.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from sdxl_control.serve.app import Limits, decode_image
from sdxl_control.serve.service import JobCancelledError, Outcome, ServerBusyError
from tests.serving import running_server, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a"}
LONG = {**SMALL, "steps": 1000}  # running when the test acts (~0.01-1 s a step on the tiny models); it is stopped


class Jobs:
    """What the service said of each job's end (its ``on_job``), by ticket id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ended: dict[int, Outcome | BaseException] = {}
        self.reported: Counter[int] = Counter()

    def __call__(self, ticket: Any, outcome: Outcome | BaseException) -> None:
        with self.lock:
            self.ended[ticket.id] = outcome
            self.reported[ticket.id] += 1

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ended) < count:
            assert time.monotonic() < deadline, f"only {len(self.ended)} of {count} jobs ended"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server() -> Any:
    jobs = Jobs()
    with running_server(
        tiny_config(queue_size=2, on_job=jobs, limits=Limits(max_body_bytes=8 * 2**20, max_steps=1000))
    ) as (url, app):
        yield url, app.state.server, jobs


def txt2img(url: str, body: dict[str, Any], timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=timeout)


def wait_until(condition: Any, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running(url: str) -> bool:
    state = httpx.get(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=10).json()
    return state["state"]["sampling_step"] > 0


def png(image_b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(image_b64))).tobytes()


def test_concurrent_clients_are_each_answered_once_and_memory_stays_flat(server: Any) -> None:
    """20 clients x 3 requests at once, twice: every request is answered 200 with its own seed's image or refused
    with 503 and a Retry-After; no answer is lost or given twice (the seeds answered are the seeds sent, each once;
    the service reports each ticket once); the process's memory after the second round is near the first's."""
    url, state, jobs = server

    def one_round(offset: int) -> list[tuple[int, int, Any]]:
        answers: list[tuple[int, int, Any]] = []
        lock = threading.Lock()

        def client(number: int) -> None:
            with httpx.Client(timeout=300) as http:
                for request in range(3):
                    seed = offset + number * 10 + request
                    answer = http.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "seed": seed})
                    detail = json.loads(answer.json()["info"]) if answer.status_code == 200 else answer.headers
                    with lock:
                        answers.append((seed, answer.status_code, detail))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        return answers

    before = len(jobs.ended)
    first = one_round(1000)
    rss_after_first = psutil.Process().memory_info().rss
    second = one_round(2000)
    rss_after_second = psutil.Process().memory_info().rss
    for answers in (first, second):
        assert len(answers) == 60, "a request was lost"
        assert {status for _, status, _ in answers} <= {200, 503}
        done = [(seed, info) for seed, status, info in answers if status == 200]
        refused = [headers for _, status, headers in answers if status == 503]
        assert done and refused, "the queue of 2 should both serve and refuse 20 clients at once"
        assert all(info["all_seeds"] == [seed] for seed, info in done)  # each answer is its own request's
        assert all(int(headers["retry-after"]) >= 1 for headers in refused)
    wait_until(lambda: state.service.queued() == 0, what="the queue to empty")
    jobs.wait_for(before + 120)
    assert set(jobs.reported.values()) == {1}  # no ticket answered twice
    ended = list(jobs.ended.values())[before:]
    assert sum(isinstance(o, Outcome) for o in ended) == sum(s == 200 for _, s, _ in first + second)
    assert sum(isinstance(o, ServerBusyError) for o in ended) == sum(s == 503 for _, s, _ in first + second)
    counts = Counter(status for _, status, _ in first + second)
    print(  # noqa: T201
        f"{counts[200]} answered 200, {counts[503]} refused 503 of 120; RSS after round 1: "
        f"{rss_after_first / 2**20:.0f} MiB, after round 2: {rss_after_second / 2**20:.0f} MiB"
    )
    # Generous: the first round loaded the models and warmed the allocator; a leak of the 60 requests' images and
    # tensors would show as tens of MB more each round.
    assert rss_after_second - rss_after_first < 150 * 2**20, (rss_after_first, rss_after_second)


def test_a_client_that_leaves_cancels_its_job_and_the_next_runs_on_the_same_models(server: Any) -> None:
    """A queued job whose client times out leaves the queue at once; a running job whose client process is killed
    stops at its next step; an interrupted job answers; the next job's image is byte-identical to the same request's
    before (the stopped jobs left the models as they were)."""
    url, state, jobs = server
    reference = txt2img(url, {**SMALL, "seed": 7})
    assert reference.status_code == 200

    # A long job runs; a second client waits in the queue, gives up after a second and closes its connection.
    holder: list[httpx.Response] = []
    first = threading.Thread(target=lambda: holder.append(txt2img(url, {**LONG, "seed": 1})))
    first.start()
    wait_until(lambda: running(url), what="the long job to run")
    now = httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()  # answered while the job runs
    assert 0 < now["progress"] < 1 and now["state"]["job_count"] == 1 and now["current_image"]
    with pytest.raises(httpx.TimeoutException):
        txt2img(url, {**SMALL, "seed": 2}, timeout=1.5)
    wait_until(lambda: state.service.queued() == 1, timeout=30, what="the queued job to be dropped")
    assert running(url)  # the long job still runs

    # Interrupt (A1111's): the running job stops at its next step and its client is answered.
    assert httpx.post(f"{url}/sdapi/v1/interrupt", timeout=10).json() == {}
    first.join(60)
    assert holder and holder[0].status_code == 200

    # A client process killed while its job runs: the job stops at its next step.
    script = (
        "import httpx,sys; httpx.post(sys.argv[1] + '/sdapi/v1/txt2img', json=" + repr({**LONG, "seed": 3}) + ","
        " timeout=600)"
    )
    client = subprocess.Popen([sys.executable, "-c", script, url])
    try:
        wait_until(lambda: running(url), what="the killed client's job to run")
        count = len(jobs.ended)
        client.kill()
    finally:
        client.wait(30)
    wait_until(lambda: state.service.queued() == 0, timeout=60, what="the killed client's job to stop")
    jobs.wait_for(count + 1)
    stopped = list(jobs.ended.values())[-1]
    assert isinstance(stopped, JobCancelledError) and stopped.reason == "client"

    cancelled = [o for o in jobs.ended.values() if isinstance(o, JobCancelledError)]
    assert len(cancelled) >= 2 and all(o.reason == "client" for o in cancelled)
    again = txt2img(url, {**SMALL, "seed": 7})
    assert again.status_code == 200
    assert png(again.json()["images"][0]) == png(reference.json()["images"][0])


@pytest.mark.parametrize(
    ("change", "status", "named"),
    [
        ({"width": 20000}, 422, "width x height: 20000x64"),
        ({"steps": 10**6}, 422, "steps: 1000000"),
        ({"batch_size": 8, "n_iter": 8}, 422, "batch_size x n_iter: 64"),
        ({"sampler_name": "Nope"}, 422, "sampler_name 'Nope'"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_the_server_keeps_serving(
    server: Any, change: dict[str, Any], status: int, named: str
) -> None:
    url, _state, _jobs = server
    answer = txt2img(url, {**SMALL, **change}, timeout=120)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["detail"]
    assert txt2img(url, {**SMALL, "seed": 1}).status_code == 200


@pytest.mark.parametrize(
    ("route", "change", "named"),
    [
        ("img2img", {"init_images": ["data:image/png;base64,!!!notbase64"]}, "init_images[0]"),
        ("img2img", {"init_images": ["aGVsbG8="]}, "init_images[0]: not a readable image"),  # "hello"
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "sd_model_checkpoint"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "no-such-model"}}, "sd_model_checkpoint"),
        ("txt2img", {"refiner_checkpoint": "../models/x.safetensors", "refiner_switch_at": 0.5}, "refiner_checkpoint"),
    ],
)
def test_bad_images_and_model_names_are_refused_through_the_routes(
    server: Any, route: str, change: dict[str, Any], named: str
) -> None:
    """Through the A1111 routes as clients call them: a broken image and a model name the server does not list (a
    path among them) are a 4xx naming the field; the server goes on serving."""
    url, _state, _jobs = server
    answer = httpx.post(f"{url}/sdapi/v1/{route}", json={**SMALL, **change}, timeout=120)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["detail"]
    assert txt2img(url, {**SMALL, "seed": 1}).status_code == 200


def test_an_unforeseen_error_is_answered_in_a1111s_shape_and_the_server_goes_on() -> None:
    """A1111's api_middleware answers any other exception 500 with {error, detail, body, errors}; so does this."""
    from fastapi.testclient import TestClient

    from sdxl_control.serve.app import create_app
    from sdxl_control.serve.service import JobService

    class Idle:
        def close(self) -> None:
            pass

    service = JobService(Idle(), queue_size=1)  # type: ignore[arg-type]
    app = create_app(tiny_config(), service)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a value no check foresaw")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/boom")
        assert answer.status_code == 500
        assert answer.json() == {
            "error": "RuntimeError",
            "detail": "a value no check foresaw",
            "body": "",
            "errors": "a value no check foresaw",
        }
        assert client.get("/sdapi/v1/progress").status_code == 200
    assert service.closed  # the app's lifespan closed its service


def test_the_limits_hold_hires_fix_steps_and_scale(server: Any) -> None:
    """The check of the request's settings, which every route's job goes through (ServerState.run): a hires fix's
    steps and its final size are held too."""
    _url, state, _jobs = server
    with pytest.raises(Exception, match="hr_second_pass_steps: 5000"):
        state.limits.check_settings({"size": (64, 64), "steps": 2, "hires_steps": 5000})
    with pytest.raises(Exception, match=r"width x height x hr_scale: 6400x6400"):
        state.limits.check_settings({"size": (64, 64), "hires_scale": 100})
    with pytest.raises(Exception, match="n: 17 images"):
        state.limits.check_settings({"num_images": 17}, {"num_images": "n"})
    state.limits.check_settings({"size": (64, 64), "steps": 2, "hires_steps": 2, "hires_scale": 2, "num_images": 2})


def test_a_body_over_the_bound_is_refused_with_413_declared_or_chunked(server: Any) -> None:
    url, _state, _jobs = server
    big = b"x" * (100 * 2**20)
    declared = httpx.post(f"{url}/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "request body" in declared.json()["detail"]

    def chunks() -> Any:  # no Content-Length: the bound holds on the bytes as they come
        for _ in range(100):
            yield b"x" * 2**20

    chunked = httpx.post(f"{url}/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "request body" in chunked.json()["detail"]
    assert txt2img(url, {**SMALL, "seed": 1}).status_code == 200


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("data:image/png;base64,!!!notbase64", "init_images: not (valid base64|a readable image)"),
        ("aGVsbG8gd29ybGQ=", "init_images: not a readable image"),
        ("http://127.0.0.1/x.png", "init_images: image URLs are not fetched"),
        ("/etc/passwd", "init_images: not (valid base64|a readable image)"),
        ("data:text/plain,hello", "init_images: a data URL must be"),
        (None, "init_images: expected a base64 image"),
    ],
)
def test_a_broken_image_is_refused_naming_the_field(value: Any, named: str) -> None:
    with pytest.raises(Exception, match=named):
        decode_image(value, "init_images", Limits())


def test_an_image_side_over_the_bound_is_refused_before_it_is_decoded() -> None:
    buffer = io.BytesIO()
    Image.new("L", (5000, 8)).save(buffer, format="PNG")
    sent = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(Exception, match="init_images: 5000x8 is outside 8..4096"):
        decode_image(sent, "init_images", Limits())
    assert decode_image(sent, "init_images", Limits(max_side=5000)).size == (5000, 8)


@pytest.mark.parametrize(
    ("models", "settings", "named"),
    [
        ({"base": "/etc/passwd"}, {}, "base: '/etc/passwd' is not a model this server lists"),
        ({"base": "../../secret.safetensors"}, {}, "base: '../../secret.safetensors'"),
        ({"refiner": "someone/their-model"}, {}, "refiner: 'someone/their-model'"),
        ({"base": "no_such_model"}, {}, "base: 'no_such_model'"),
        ({}, {"vae": "/tmp/x.safetensors"}, "vae: '/tmp/x.safetensors'"),
        ({}, {"upscaler": "someone/an-upscaler"}, "upscaler: 'someone/an-upscaler'"),
    ],
)
def test_a_model_the_server_does_not_list_is_refused_before_anything_loads(
    server: Any, models: dict[str, str], settings: dict[str, Any], named: str
) -> None:
    """ServerState.run, which every route's job goes through, takes only the models the catalogue lists: a path, a
    hub id or an unknown name as a model is a 422 naming the field, and nothing is resolved or queued."""
    from fastapi import Request

    from sdxl_control.jobs.spec import JobSpec

    url, state, jobs = server
    app = httpx.get(f"{url}/openapi.json", timeout=10)  # the server is up and serving
    assert app.status_code == 200
    count = len(jobs.ended)

    async def run() -> Any:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        return await state.run(Request(scope), JobSpec("a fox", settings=settings, models=models), "txt2img")

    import asyncio

    with pytest.raises(Exception, match=named.replace(".", r"\.")):
        asyncio.run(run())
    assert len(jobs.ended) == count and state.service.queued() == 0
    listed = state.catalogue.listed("checkpoints")[0]
    state.check_models(JobSpec("a fox", models={"base": listed.source}))  # a listed one passes


# -- the job service alone, on a stand-in runner whose steps take 10 ms: the orderings, without the models' seconds --


class StepRunner:
    """Runs a job of ``job.steps`` steps, 10 ms each, reporting each step as the engine does."""

    def __init__(self) -> None:
        self.ran: list[Any] = []

    def run(self, job: Any, progress: Any = None, progress_bar: Any = None) -> Any:
        from types import SimpleNamespace as NS

        import torch

        self.ran.append(job)
        for step in range(1, job.steps + 1):
            time.sleep(0.01)
            latents = torch.zeros(1, 4, 8, 8)
            progress(
                NS(
                    step=step,
                    steps=job.steps,
                    index=step - 1,
                    total=job.steps,
                    stage=NS(label="base"),
                    denoised=latents,
                )
            )
        return NS(images=[job])


def stand_in_job(steps: int) -> Any:
    from types import SimpleNamespace as NS

    return NS(steps=steps, request=NS(num_images=1, size=(64, 64), steps=steps, hires_scale=None, hires_steps=None))


def service(queue_size: int = 1) -> tuple[Any, Jobs, StepRunner]:
    from sdxl_control.serve.service import JobService

    jobs, runner = Jobs(), StepRunner()
    made = JobService(
        runner, queue_size=queue_size, preview_every=10**6, preview_decoder=None, on_job=jobs, progress_bar=False
    )  # type: ignore[arg-type]
    return made, jobs, runner


def test_a_job_cancelled_through_its_future_leaves_its_place_and_the_worker_goes_on() -> None:
    """asyncio.wrap_future cancels the job's future when the task awaiting it is cancelled: the job leaves the queue
    at once (a new one takes its place), and the worker, which used to die on that future, runs the next."""
    jobs_service, jobs, runner = service(queue_size=1)
    running = jobs_service.submit(stand_in_job(1000))
    wait_until(lambda: jobs_service.progress().sampling_step > 0, what="the long job to run")
    queued = jobs_service.submit(stand_in_job(2))
    with pytest.raises(ServerBusyError) as refused:
        jobs_service.submit(stand_in_job(2))
    assert refused.value.retry_after >= 1
    assert queued.future.cancel()
    assert jobs_service.queued() == 1
    taker = jobs_service.submit(stand_in_job(2))  # the freed place
    jobs_service.interrupt()
    assert running.result(30).interrupted and running.result(30).result is None
    assert taker.result(30).result.images == [taker.job]
    assert all(job is not queued.job for job in runner.ran)
    jobs.wait_for(4)
    assert isinstance(jobs.ended[queued.id], JobCancelledError)
    assert isinstance(jobs.ended[3], ServerBusyError)
    jobs_service.close(10)


def test_an_interrupt_while_idle_does_not_stop_the_next_job() -> None:
    jobs_service, _jobs, _runner = service()
    jobs_service.interrupt()
    jobs_service.skip()
    outcome = jobs_service.submit(stand_in_job(3)).result(30)
    assert outcome.result is not None and not outcome.interrupted
    jobs_service.close(10)


def test_closing_answers_the_running_and_the_queued_jobs_and_refuses_new_ones() -> None:
    jobs_service, jobs, _runner = service(queue_size=2)
    running = jobs_service.submit(stand_in_job(1000))
    wait_until(lambda: jobs_service.progress().sampling_step > 0, what="the long job to run")
    queued = jobs_service.submit(stand_in_job(2))
    started = time.monotonic()
    jobs_service.close(30)
    assert time.monotonic() - started < 10  # stopped at its next step, not after its 1000
    for ticket in (running, queued):
        with pytest.raises(JobCancelledError) as cancelled:
            ticket.result(1)
        assert cancelled.value.reason == "shutdown"
    with pytest.raises(ServerBusyError, match="shutting down"):
        jobs_service.submit(stand_in_job(2))
    assert not jobs_service._worker.is_alive()
    assert set(jobs.reported.values()) == {1}


def test_a_listed_file_passes_and_a_path_in_a_condition_or_an_image_field_does_not(tmp_path: Any) -> None:
    """The check of ServerState.run on what a route made: the files the server lists (an A1111 install's checkpoint
    and LoRA) pass as their listed source or name; a path anywhere a condition names a file (its model, its image)
    or as the init image, and a file next to the listed ones that is not listed, are refused naming the field."""
    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.jobs.spec import JobSpec
    from sdxl_control.serve.app import ServerState
    from sdxl_control.weights.model_folders import ModelFolders

    for folder, name in (("Lora", "mine.safetensors"), ("Stable-diffusion", "myxl.safetensors")):
        (tmp_path / "models" / folder).mkdir(parents=True)
        (tmp_path / "models" / folder / name).write_bytes(b"not read")
    (tmp_path / "secret.safetensors").write_bytes(b"not read")
    folders = ModelFolders.of([str(tmp_path)])
    state = ServerState(tiny_config(resolver=TinyResolver(folders=folders)), service=None)  # type: ignore[arg-type]
    lora = str(tmp_path / "models" / "Lora" / "mine.safetensors")
    state.check_models(JobSpec("a", models={"base": "myxl"}, conditions=(LoRA(lora),)))
    state.check_models(JobSpec("a", models={"base": str(tmp_path / "models/Stable-diffusion/myxl.safetensors")}))
    photo = Image.new("RGB", (64, 64))
    state.check_models(JobSpec("a", conditions=(ControlNet("diffusers/controlnet-canny-sdxl-1.0", image=photo),)))
    refused = {
        "lora.source": JobSpec("a", conditions=(LoRA(str(tmp_path / "secret.safetensors")),)),
        "controlnet.model": JobSpec("a", conditions=(ControlNet("/etc/cn.safetensors", image=photo),)),
        "controlnet.image": JobSpec(
            "a", conditions=(ControlNet("diffusers/controlnet-canny-sdxl-1.0", image="/etc/passwd"),)
        ),
        "init_image": JobSpec("a", settings={"init_image": "/etc/passwd"}),
        "base": JobSpec("a", models={"base": str(tmp_path / "secret.safetensors")}),
        "edges": JobSpec("a", inputs={"edges": ["/etc/passwd"]}),
    }
    for field, spec in refused.items():
        with pytest.raises(Exception, match=f"^{field}: ") as error:
            state.check_models(spec)
        assert type(error.value).__name__ == "InvalidRequestError"
