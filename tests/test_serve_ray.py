"""``sdxl-control serve --ray``: the same app as a Ray Serve application, on a local Ray runtime with two CPU model
replicas on the tiny models. Requests go through Serve's own HTTP proxy on a loopback port (txt2img, routing by the
model a request names, progress, interrupt, a full queue, autoscaling), or through a Serve handle to the model
replicas, as the ingress sends them (routing by model, a condition's image travelling to the replica).

The server lists a second checkpoint (an install's ``models/Stable-diffusion`` file, run as the tiny models of
another seed: :class:`tests.serving.TwoCheckpoints`), so that requests can name two models.

Ray and Serve start once for the module (some 20-40 s on two cores); ``-m "not ray"`` deselects the file."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")

from sdxl_control.jobs.resolvers import TinyResolver  # noqa: E402
from sdxl_control.jobs.spec import JobSpec, resolve  # noqa: E402
from tests.serving import OTHER, TwoCheckpoints, free_port, tiny_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
ray_serve = pytest.mark.ray

QUEUE = 1  # requests that may wait for a replica; more are refused
BASE = "sd_xl_base_1.0"  # the server's default checkpoint, as it lists it (the tiny models of seed 0)


@dataclass
class Cluster:
    url: str  # Serve's HTTP proxy
    handle: Any  # a Serve handle to the model replicas
    stop: threading.Event  # ends serve_on_ray
    serving: threading.Thread
    returned: list[int]


@pytest.fixture(scope="module")
def cluster(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app as ``serve --ray`` runs it (:func:`serve_on_ray`, in a thread until ``stop``) on a local Ray runtime of
    four CPUs (two for this app, two for the autoscaling test's), with exactly two model replicas (autoscaling between
    2 and 2), a queue of :data:`QUEUE`, and a models folder with the :data:`OTHER` checkpoint."""
    import ray
    from ray import serve

    from sdxl_control.serve.ray_serve import APP_NAME, MODELS, RayOptions, serve_on_ray
    from sdxl_control.testing import tiny_models
    from sdxl_control.testing.single_file import write_single_file
    from sdxl_control.weights.model_folders import ModelFolders

    install = tmp_path_factory.mktemp("ray-install")
    (install / "models" / "Stable-diffusion").mkdir(parents=True)
    write_single_file(tiny_models(seed=1).base, install / "models" / "Stable-diffusion" / OTHER)
    config = tiny_config(resolver=TwoCheckpoints(folders=ModelFolders.of([install], environment=False)))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    stop, returned = threading.Event(), []
    try:
        port = free_port()
        options = RayOptions(min_replicas=2, max_replicas=2, max_queued_requests=QUEUE, gpus_per_replica=0, port=port)
        serving = threading.Thread(
            target=lambda: returned.append(serve_on_ray(config, options, stop=stop)), daemon=True
        )
        serving.start()
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while not _answers(f"{url}/sdapi/v1/progress"):
            assert serving.is_alive() and time.monotonic() < deadline, "serve_on_ray did not start the app"
            time.sleep(0.5)
        yield Cluster(url, serve.get_deployment_handle(MODELS, APP_NAME), stop, serving, returned)
    finally:
        stop.set()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _progress_shows_steps(url: str) -> dict[str, Any]:
    """GET /progress until a running job shows its second step and a live preview (or two minutes pass)."""
    deadline = time.monotonic() + 120
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()
        if seen["state"]["sampling_step"] >= 2 and seen["current_image"]:
            break
        time.sleep(0.1)
    assert seen["state"]["sampling_step"] >= 2, seen
    return seen


def _decoded(image: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))


def _replica_processes(app: str) -> list[Any]:
    """The processes of the application ``app``'s replicas (Ray names them ``ServeReplica:<app>:<deployment>``)."""
    import psutil

    found = psutil.process_iter(["cmdline"])
    return [p for p in found if f"ServeReplica:{app}:" in " ".join(p.info["cmdline"] or [])]


def _served(handle: Any) -> list[dict[str, Any]]:
    return list(handle.broadcast("served").results(timeout_s=30))


def _job(prompt: str, seed: int = 0, steps: int = 2, **settings: Any) -> Any:
    spec = JobSpec(prompt, settings={"steps": steps, "seed": 3, "size": (64, 64), **settings})
    return resolve(spec, TinyResolver(seed=seed))


def _local(job: Any) -> Image.Image:
    """The job's image from a Runner in this process, on one thread as a one-CPU replica runs it (the thread count
    changes the last bit of a CPU sum here and there)."""
    import torch

    from sdxl_control.jobs.runner import Runner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Runner(device="cpu").run(job).images[0]
    finally:
        torch.set_num_threads(threads)


@ray_serve
def test_txt2img_through_serves_proxy_makes_the_local_runners_image(cluster: Cluster) -> None:
    """A1111's txt2img through Serve's HTTP proxy -> the ingress (the same FastAPI app as one machine's) -> a model
    replica: the answer has A1111's shape, and its image and recipe are those the same job makes on a Runner here."""
    from sdxl_control.serve.a1111 import request_spec

    url = cluster.url
    body = {"prompt": "a fox", "steps": 2, "seed": 5, "width": 64, "height": 64, "sampler_name": "Euler a"}
    answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    info = json.loads(data["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5]  # all_seeds read from the images' recipes
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.info["parameters"] == info["infotexts"][0]

    expected = _local(resolve(request_spec("txt2img", body, {})[0], TinyResolver()))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert json.loads(image.info["sdxl-control"]) == expected.recipe


@ray_serve
def test_a_conditions_image_travels_to_the_replica(cluster: Cluster) -> None:
    """A ControlNet unit's image, decoded from a request's base64 as the routes decode it, goes with the resolved
    job to a replica (pickled by Serve) and steers the image there as it does here."""
    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.serve.app import Limits, decode_image
    from sdxl_control.serve.ray_serve import RayJobService

    handle = cluster.handle
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255
    buffer = io.BytesIO()
    Image.fromarray(edges).save(buffer, format="PNG")
    image = decode_image(base64.b64encode(buffer.getvalue()).decode(), "controlnet image", Limits())
    spec = JobSpec("a tower", settings={"steps": 2, "seed": 4, "size": (64, 64)})
    job = resolve(JobSpec(spec.prompt, settings=spec.settings, conditions=(ControlNet("diffusers/controlnet-canny-sdxl-1.0", image=image),)),
                  TinyResolver())  # fmt: skip
    plain = resolve(spec, TinyResolver())

    service = RayJobService(handle)
    made = service.submit(job).result(timeout=300).result
    assert made is not None
    steered = np.asarray(made.images[0].convert("RGB"))
    assert np.array_equal(steered, np.asarray(_local(job).convert("RGB")))
    assert not np.array_equal(steered, np.asarray(_local(plain).convert("RGB")))  # the condition did something


@ray_serve
def test_jobs_go_to_the_replica_that_holds_their_model(cluster: Cluster) -> None:
    """Two models (the tiny models of seeds 0 and 1): after each has run once, each model's jobs go to the one
    replica holding it, by Serve's multiplexed routing on the base model's source; each replica's own counters
    agree (it loaded one model, and ran that model's jobs)."""
    from sdxl_control.serve.ray_serve import RayJobService

    handle = cluster.handle
    service = RayJobService(handle)
    models = {seed: _job("a fox", seed=seed) for seed in (0, 1)}
    assert models[0].base != models[1].base
    # The first of each loads it somewhere; Serve's router learns where within ~0.1 s (pushed every 0.1 s). Twice
    # round, so that a first placement made on stale news (both on one replica) has settled before the count.
    for seed in (0, 1, 0, 1):
        service.submit(models[seed]).result(timeout=300)
        time.sleep(1.0)
    before = {one["replica"]: one for one in _served(handle)}

    answered: dict[int, set[str]] = {0: set(), 1: set()}
    for seed in (0, 1, 1, 0, 0, 1):
        ticket = service.submit(models[seed])
        assert ticket.result(timeout=300).result is not None
        answered[seed].add(str(ticket.replica))
    assert len(answered[0]) == 1 and len(answered[1]) == 1, answered
    assert answered[0] != answered[1]

    after = {one["replica"]: one for one in _served(handle)}
    for seed, (replica,) in answered.items():
        base = models[seed].base
        assert after[replica]["loaded"][-1] == base  # the model it holds now
        assert after[replica]["jobs"][base] - before[replica]["jobs"].get(base, 0) == 3
        assert after[replica]["loaded"] == before[replica]["loaded"]  # nothing loaded again


@ray_serve
def test_txt2img_naming_a_model_over_http_goes_to_the_replica_that_holds_it(cluster: Cluster) -> None:
    """txt2img requests through Serve's HTTP proxy naming two listed checkpoints (A1111's
    ``override_settings.sd_model_checkpoint``, as KoboldAI Lite sends it per request; and ``POST /options``, as
    webuiapi and Open WebUI switch): the ingress resolves each name to its model and each model's requests go to the
    one replica holding it; the replicas' own counters say so, and neither loads a model again. The answers are each
    model's own (its name in ``info``, other pixels for the same seed)."""
    from sdxl_control.testing import tiny_models

    url, handle = cluster.url, cluster.handle
    source = {BASE: str(tiny_models(seed=0).base), OTHER: str(tiny_models(seed=1).base)}  # what each title runs
    body = {"prompt": "a fox", "steps": 2, "seed": 5, "width": 64, "height": 64}

    def txt2img(title: str, per_request: bool = True) -> dict[str, Any]:
        if per_request:
            sent = {**body, "override_settings": {"sd_model_checkpoint": title}}
        else:  # the server's model, switched first
            switched = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": title}, timeout=60)
            assert switched.status_code == 200, switched.text
            sent = body
        answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=sent, timeout=300)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    # Earlier tests may have left both replicas on one model: twice round, so that each model has settled on a
    # replica of its own (as in the handle's routing test) before the count.
    for title in (BASE, OTHER, BASE, OTHER):
        txt2img(title)
        time.sleep(1.0)
    before = {one["replica"]: one for one in _served(handle)}

    answers: dict[str, list[dict[str, Any]]] = {BASE: [], OTHER: []}
    for title, per_request in ((OTHER, True), (BASE, True), (BASE, False), (OTHER, False), (OTHER, True), (BASE, True)):
        answers[title].append(txt2img(title, per_request))
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": BASE}, timeout=60).status_code == 200

    after = {one["replica"]: one for one in _served(handle)}
    ran = {replica: Counter(after[replica]["jobs"]) - Counter(before[replica]["jobs"]) for replica in after}
    holders: dict[str, str] = {}
    for title, model in source.items():
        ran_it = [replica for replica, jobs in ran.items() if jobs[model]]
        assert len(ran_it) == 1 and ran[ran_it[0]][model] == 3, ran  # one replica ran all three
        holders[title] = ran_it[0]
        assert after[holders[title]]["loaded"][-1] == model
    assert holders[BASE] != holders[OTHER]
    assert all(after[replica]["loaded"] == before[replica]["loaded"] for replica in after)  # nothing loaded again

    names = {title: {json.loads(one["info"])["sd_model_name"] for one in made} for title, made in answers.items()}
    assert names == {BASE: {BASE}, OTHER: {"other_tiny"}}
    pixels = {title: {_decoded(one["images"][0]).tobytes() for one in made} for title, made in answers.items()}
    assert len(pixels[BASE]) == len(pixels[OTHER]) == 1 and pixels[BASE] != pixels[OTHER]


@ray_serve
def test_progress_and_interrupt_reach_the_replica_running_the_job(cluster: Cluster) -> None:
    """While a long job runs on a replica, GET /progress through the proxy shows its steps and live preview;
    POST /interrupt stops it on that replica (its own counter of stopped jobs says so), and the request ends."""
    url, handle = cluster.url, cluster.handle
    stopped = sum(one["stopped"] for one in _served(handle))
    body = {"prompt": "a long fox", "steps": 200, "seed": 1, "width": 64, "height": 64}
    answers: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)), daemon=True
    )
    thread.start()
    seen = _progress_shows_steps(url)
    assert seen["state"]["sampling_steps"] == 200 and seen["state"]["job_count"] == 1 and 0 < seen["progress"] < 1
    Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).load()

    assert httpx.post(f"{url}/sdapi/v1/interrupt", timeout=60).status_code == 200
    thread.join(120)
    assert answers and answers[0].status_code == 200, answers
    assert sum(one["stopped"] for one in _served(handle)) == stopped + 1
    idle = httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


@ray_serve
def test_a_full_queue_answers_503_with_retry_after_and_serving_goes_on(cluster: Cluster) -> None:
    """Six requests at once for two replicas (one job each) and a queue of one: those Serve cannot queue are
    refused with 503 and Retry-After (Ray's BackPressureError, mapped as the local server's full queue); every
    request is answered, and the server serves the next one."""
    url = cluster.url
    body = {"prompt": "a busy fox", "steps": 60, "seed": 2, "width": 64, "height": 64}
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def call() -> None:
        answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    statuses = sorted(answer.status_code for answer in answers)
    assert len(answers) == 6 and set(statuses) <= {200, 503}, [(a.status_code, a.text[:200]) for a in answers]
    refused = [answer for answer in answers if answer.status_code == 503]
    assert refused and statuses.count(200) >= 1, statuses
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1
        assert "queue is full" in answer.json()["detail"]
    again = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "steps": 2}, timeout=300)
    assert again.status_code == 200, again.text


@ray_serve
def test_a_client_that_goes_away_stops_its_job_on_the_replica(cluster: Cluster) -> None:
    """A client that closes its connection mid-job: Serve's proxy cancels the request, the replica stops the job
    (its counter of stopped jobs says so) and the ingress forgets it (progress idle again)."""
    url, handle = cluster.url, cluster.handle
    stopped = sum(one["stopped"] for one in _served(handle))
    body = json.dumps({"prompt": "a fox that leaves", "steps": 200, "seed": 1, "width": 64, "height": 64}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        head = f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert _progress_shows_steps(url)["state"]["job_count"] == 1
    deadline = time.monotonic() + 60
    while sum(one["stopped"] for one in _served(handle)) == stopped and time.monotonic() < deadline:
        time.sleep(0.25)
    assert sum(one["stopped"] for one in _served(handle)) == stopped + 1
    while (
        httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] and time.monotonic() < deadline
    ):
        time.sleep(0.25)
    assert httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0


@ray_serve
def test_a_jobs_error_on_its_replica_reaches_the_ingress_as_itself(cluster: Cluster) -> None:
    """A job that fails on its replica (its base model is not there) raises the replica's own error class and text
    at the ingress (so the app answers it as one machine's server does); the replica serves the next job."""
    import dataclasses

    from sdxl_control.base.errors import ModelNotFoundError
    from sdxl_control.serve.ray_serve import RayJobService

    service = RayJobService(cluster.handle)
    missing = dataclasses.replace(_job("a fox"), base="/nonexistent/sdxl-base")
    with pytest.raises(ModelNotFoundError, match="no model at /nonexistent/sdxl-base"):
        service.submit(missing).result(timeout=300)
    assert service.submit(_job("a fox")).result(timeout=300).result is not None
    assert service.queued() == 0


@ray_serve
def test_model_replicas_scale_up_with_the_queue_and_back_down_when_idle(cluster: Cluster) -> None:
    """A second application (:func:`application`) on the same runtime, with model replicas between 1 and 2 and Ray's
    autoscaling pace made short (its delays, metrics interval and look-back window; the CLI keeps Ray's). Three
    clients send slow txt2img requests through Serve's HTTP proxy without pause: with one replica, one job runs and
    two wait, above the target of one per replica, so Serve adds the second replica (serve.status() reports two
    running, scaled by the autoscaler), which then takes jobs of its own (its counters say so); every request is
    answered 200. Idle again, Serve removes one (back to ``min_replicas``)."""
    from ray import serve

    from sdxl_control.serve.ray_serve import MODELS, RayOptions, application

    name, prefix = "sdxl-control-scaling", "/scaling"
    options = RayOptions(min_replicas=1, max_replicas=2, max_queued_requests=8, gpus_per_replica=0,
                         upscale_delay_s=0.5, downscale_delay_s=2.0, metrics_interval_s=0.5, look_back_period_s=2.0)  # fmt: skip
    assert options.autoscaling(gpus_in_cluster=0)["max_replicas"] == 2
    serve.run(application(tiny_config(), options), name=name, route_prefix=prefix)
    handle = serve.get_deployment_handle(MODELS, name)

    def models() -> Any:
        return serve.status().applications[name].deployments[MODELS]

    def running() -> int:
        return int(models().replica_states.get("RUNNING", 0))

    try:
        assert running() == 1
        stop, answers, lock = threading.Event(), [], threading.Lock()
        body = {"prompt": "a queue of foxes", "steps": 40, "seed": 2, "width": 64, "height": 64}

        def client() -> None:
            while not stop.is_set():
                answer = httpx.post(f"{cluster.url}{prefix}/sdapi/v1/txt2img", json=body, timeout=300)
                with lock:
                    answers.append(answer.status_code)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for thread in clients:
            thread.start()
        try:
            deadline, served = time.monotonic() + 180, []
            while time.monotonic() < deadline:  # two replicas running, each having run a job
                if running() == 2:
                    served = _served(handle)
                    if len(served) == 2 and all(sum(one["jobs"].values()) for one in served):
                        break
                time.sleep(0.5)
            scaled = models()
        finally:
            stop.set()
            for thread in clients:
                thread.join(300)
        assert scaled.replica_states.get("RUNNING") == 2, (scaled, served)
        assert scaled.status_trigger in ("UPSCALE_COMPLETED", "AUTOSCALING"), scaled  # the autoscaler's doing
        assert len(served) == 2 and all(sum(one["jobs"].values()) for one in served), served
        assert answers and set(answers) == {200}, answers

        deadline = time.monotonic() + 120
        while (running() != 1 or models().replica_states.get("STOPPING")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dict(models().replica_states) == {"RUNNING": 1}, models()
        assert models().status_trigger == "DOWNSCALE_COMPLETED", models()
        assert len(_served(handle)) == 1
    finally:
        serve.delete(name)
        deadline = time.monotonic() + 30
        while _replica_processes(name) and time.monotonic() < deadline:
            time.sleep(0.5)


@ray_serve
def test_shutdown_removes_the_app_and_every_replica(cluster: Cluster) -> None:
    """serve_on_ray, told to stop, returns 0 having deleted its application from the runtime it joined (this test's):
    the routes stop answering and no replica process is left; Serve and Ray then shut down, and the port closes."""
    import ray
    from ray import serve

    from sdxl_control.serve.ray_serve import APP_NAME

    def replicas() -> list[Any]:
        return _replica_processes(APP_NAME)

    assert len(replicas()) == 3  # the ingress and two model replicas
    cluster.stop.set()
    cluster.serving.join(120)
    assert not cluster.serving.is_alive() and cluster.returned == [0]
    assert not _answers(f"{cluster.url}/sdapi/v1/progress")
    deadline = time.monotonic() + 30
    while replicas() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not replicas()
    serve.shutdown()
    ray.shutdown()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cluster.url}/sdapi/v1/progress", timeout=5)


def test_the_cli_hands_its_ray_flags_to_serve_on_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --ray`` with its flags runs :func:`serve_on_ray` with them (the queue as Serve's
    ``max_queued_requests``); a Ray flag without ``--ray`` is refused, naming it; bounds out of order too."""
    from sdxl_control.cli import main
    from sdxl_control.serve import ray_serve

    seen: list[Any] = []
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda config, options: seen.append((config, options)) or 0)
    flags = ["serve", "--tiny", "--ray", "--min-replicas", "2", "--max-replicas", "4", "--port", "7999"]
    assert main([*flags, "--target-ongoing-requests", "1.5", "--queue-size", "3", "--ray-address", "auto"]) == 0
    ((config, options),) = seen
    assert (options.min_replicas, options.max_replicas, options.target_ongoing_requests) == (2, 4, 1.5)
    assert (options.address, options.host, options.port, options.gpus_per_replica) == ("auto", "127.0.0.1", 7999, None)
    assert config.queue_size == 3 and isinstance(config.resolver, TinyResolver)
    assert options.autoscaling(gpus_in_cluster=8)["max_replicas"] == 4  # given: kept

    assert main(["serve", "--tiny", "--max-replicas", "3"]) == 2  # without --ray: refused before anything starts
    assert main(["serve", "--tiny", "--ray", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert len(seen) == 1
