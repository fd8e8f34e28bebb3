"""KoboldAI Lite (KoboldCpp's web UI) with ``sdxl-control serve`` as its external "KoboldCpp / Forge / A1111" image
generator: the requests it sends, replayed as it builds them, and the answers read as it reads them.

Source: LostRuins/lite.koboldai.net ``index.html`` @ 27eb1dcc59d686675ce5018ccf696f0ee8cf5794 (Lite v339). KoboldCpp
embeds the page as ``klite.embd``; the older copy read at LostRuins/koboldcpp 2da346a5 (Lite v180) sends the same
bodies less ``scheduler`` and ``clip_skip``, which the newer one also leaves out by default. What it does, in its
functions:

- ``connect_to_a1111``: ``GET /sdapi/v1/sd-models`` then ``GET /sdapi/v1/options``; it refuses the server when
  ``samples_format`` is null or no model is listed; its model menu is the ``title`` of each model, the one equal to
  the options' ``sd_model_checkpoint`` selected.
- ``generate_new_image`` (with ``localsettings`` defaults: img_steps 20, img_cfgscale 5, img_sampler "Euler",
  img_scheduler "default" (not sent), img_aspect 0 = 512x512, img_img2imgstr 0.6, img_clipskip -1 (not sent)) and
  ``generate_a1111_image``: the prompt is the sentence, then " ### " and the negative prompt, split again on "###";
  a seed drawn below 99999999; ``POST /sdapi/v1/txt2img`` (``img2img`` with ``init_images`` and
  ``denoising_strength`` when a source image is given) with ``Content-Type: application/json`` and the body built in
  :func:`_lite_body`; it reads ``images[0]`` (shown as ``data:image/jpeg;base64,`` + it) and nothing else.
- ``compressImage``: what it stores (and sends back for img2img, without its data-URL prefix) is a JPEG of quality
  0.5.
- ``interrogate_new_image``: ``POST /sdapi/v1/interrogate`` with ``{"image": <base64>, "model": "clip"}``; it reads
  ``caption`` and does nothing without one.

Lite runs in a browser on another origin (KoboldCpp serves it on http://localhost:5001, the hosted copy is
https://lite.koboldai.net), so every call needs the server's CORS answer for that origin (``--cors-allow-origins``);
the JSON POSTs are preflighted."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdxl_control.serve.a1111 import NOT_DONE, read_request
from tests.serving import running_server, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

ORIGIN = "http://localhost:5001"  # Lite as KoboldCpp serves it
# Lite's img_aspect choices -> the size it sends (generate_new_image).
LITE_SIZES = {0: (512, 512), 1: (512, 768), 2: (768, 512), 3: (768, 768), 4: (512, 1024), 5: (1024, 512),
              6: (1024, 1024), 7: (768, 1024), 8: (1024, 768)}  # fmt: skip
# Lite's sampler and scheduler menus (its img_sampler / img_scheduler <select> options).
LITE_SAMPLERS = ("Euler", "Euler a", "Heun", "DPM2", "DPM++ 2M", "DDIM", "LCM")
LITE_SCHEDULERS = ("default", "simple", "karras", "exponential", "sgm_uniform")


@pytest.fixture(scope="module")
def server(tiny) -> Any:
    config = tiny_config(cors_origins=(ORIGIN, "https://lite.koboldai.net"))
    with running_server(config) as (url, app):
        yield url, app


def _lite_body(
    sentence: str,
    model: str,
    *,
    negative: str = "",
    source_image: str = "",
    sampler: str = "Euler",
    scheduler: str = "default",
    steps: int = 20,
    cfg_scale: float = 5,
    aspect: int = 0,
    strength: float = 0.6,
    clip_skip: int = -1,
    save_remote_images: bool = False,
    seed: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """(route, body) as generate_new_image + generate_a1111_image build them from Lite's settings (defaults: its
    ``localsettings`` defaults); ``model``: the title selected in its menu."""
    prompt_field = sentence.replace("###", "") + (f" ### {negative}" if negative else "")
    prompt, _, negative_prompt = prompt_field.partition("###")
    width, height = LITE_SIZES[aspect]
    body: dict[str, Any] = {
        "prompt": prompt.strip(), "seed": random.randrange(99999999) if seed is None else seed,
        "sampler_name": sampler, "batch_size": 1, "n_iter": 1, "steps": steps, "cfg_scale": cfg_scale,
        "width": width, "height": height, "negative_prompt": negative_prompt.strip(),
        "do_not_save_samples": not save_remote_images, "do_not_save_grid": True, "enable_hr": False, "eta": 0,
        "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
        "override_settings": {
            "sd_model_checkpoint": model, "eta_noise_seed_delta": 0.0, "CLIP_stop_at_last_layers": 1.0,
            "ddim_discretize": "uniform", "img2img_fix_steps": False, "sd_hypernetwork": "None",
            "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "comma_padding_backtrack": 20.0,
        },
    }  # fmt: skip
    if scheduler != "default":
        body["scheduler"] = scheduler
    route = "/sdapi/v1/txt2img"
    if source_image:
        route = "/sdapi/v1/img2img"
        body["init_images"] = [source_image]
        body["denoising_strength"] = strength
    if clip_skip > 0:
        body["clip_skip"] = clip_skip
    if save_remote_images:
        body["save_images"] = True
    return route, body


def _fetch(client: httpx.Client, method: str, path: str, body: Any = None, origin: str = ORIGIN) -> httpx.Response:
    """A browser's fetch from Lite's page: a JSON POST is preflighted first; the answer is readable only with the
    CORS header for Lite's origin."""
    headers = {"Origin": origin}
    if method == "POST":
        preflight = client.options(path, headers={**headers, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
        answer = client.post(path, json=body, headers={**headers, "Content-Type": "application/json"})
    else:
        answer = client.get(path, headers=headers)
    assert answer.headers.get("access-control-allow-origin") == origin, answer.headers
    return answer


def _lite_image(answer: httpx.Response) -> Image.Image | None:
    """What generate_a1111_image hands on: ``images[0]`` when the answer has images, else nothing (its generation-failed
    message)."""
    resp = answer.json()
    images = resp.get("images") if isinstance(resp, dict) else None
    if not images:
        return None
    return Image.open(io.BytesIO(base64.b64decode(images[0])))  # the browser sniffs the bytes behind "image/jpeg"


def _selected_model(client: httpx.Client) -> str:
    """connect_to_a1111: the model menu's titles, the one the options name selected."""
    models = _fetch(client, "GET", "/sdapi/v1/sd-models").json()
    options = _fetch(client, "GET", "/sdapi/v1/options").json()
    assert options.get("samples_format") is not None and len(models) > 0  # else Lite refuses the server
    titles = [m["title"] for m in models]
    assert options["sd_model_checkpoint"] in titles
    return str(options["sd_model_checkpoint"])


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_kobold_lite_connects_from_its_origin_only(server):
    """connect_to_a1111 from Lite's page: models and options read with the CORS answer for its origin; a page of an
    origin the server was not given gets no CORS header, so the browser keeps the answer from it."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as client:
        assert _selected_model(client) == "sd_xl_base_1.0"
        other = client.get("/sdapi/v1/options", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # Chrome's preflight from a page on the internet (the hosted Lite) to a server on this machine.
        private = client.options("/sdapi/v1/txt2img", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type",
            "Access-Control-Request-Private-Network": "true"})  # fmt: skip
        assert private.status_code == 200, private.text
        assert private.headers["access-control-allow-private-network"] == "true"


def test_kobold_lite_txt2img_with_its_defaults(server):
    """generate_a1111_image with Lite's default settings (Euler, 20 steps, CFG 5, 512x512, eta 0, its fixed
    override_settings) and a negative prompt: ``images[0]`` is the image; ``info`` says the seed, prompts and model
    it was sent; and nothing it sends is listed as not done (its override_settings are A1111's defaults, and Euler
    takes no eta)."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=300) as client:
        model = _selected_model(client)
        route, body = _lite_body("a red fox in the snow", model, negative="blurry, lowres", aspect=1)
        answer = _fetch(client, "POST", route, body)
    assert answer.status_code == 200, answer.text
    image = _lite_image(answer)
    assert image is not None and image.height > image.width  # portrait (the tiny models run it at their scale)
    info = json.loads(answer.json()["info"])
    assert info["seed"] == body["seed"] and info["prompt"] == "a red fox in the snow"
    assert info["negative_prompt"] == "blurry, lowres" and info["sd_model_name"] == "sd_xl_base_1.0"
    assert info["sampler_name"] == "Euler" and info["steps"] == 20 and info["cfg_scale"] == 5
    assert info[NOT_DONE] == []
    assert f"Seed: {body['seed']}" in image.info["parameters"]


def test_kobold_lite_euler_a_with_eta_0_runs_as_a1111_runs_it(server):
    """Lite sends eta 0 with every sampler. A1111 passes eta only to the samplers whose k-diffusion function takes
    one (Forge dfdcbab6 modules/sd_samplers_common.py ``initialize``), and Euler a with eta 0 adds no noise
    (k_diffusion/sampling.py ``get_ancestral_step`` returns (sigma_next, 0) for a zero eta, so
    ``sample_euler_ancestral`` takes Euler's steps): Lite's "Euler A" gives Euler's pixels, saying so; the same
    request at A1111's default eta (1) gives other pixels."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=300) as client:
        model = _selected_model(client)

        def run(sampler: str, lite: bool = True) -> tuple[Image.Image, dict[str, Any]]:
            route, body = _lite_body("a lantern", model, steps=4, seed=11, sampler=sampler)
            if not lite:
                del body["eta"]  # A1111's default, eta_ancestral 1
            answer = _fetch(client, "POST", route, body)
            assert answer.status_code == 200, answer.text
            image = _lite_image(answer)
            assert image is not None
            return image, json.loads(answer.json()["info"])

        ancestral, info = run(sampler="Euler a")
        euler, _ = run(sampler="Euler")
        noisy, noisy_info = run("Euler a", lite=False)
    assert [n for n in info[NOT_DONE] if n.startswith("eta 0")] and noisy_info[NOT_DONE] == []
    assert np.array_equal(_pixels(ancestral), _pixels(euler))
    assert not np.array_equal(_pixels(ancestral), _pixels(noisy))


def test_kobold_lite_img2img_from_its_stored_jpeg(server):
    """Lite's img2img: the image it stored (compressImage: a JPEG at quality 0.5), sent without its data-URL prefix
    as ``init_images[0]`` with its default ``denoising_strength`` 0.6; the answer's ``images[0]`` is the result."""
    url, _ = server
    rng = np.random.default_rng(3)
    stored = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(stored, "JPEG", quality=50)
    source = base64.b64encode(stored.getvalue()).decode()
    with httpx.Client(base_url=url, timeout=300) as client:
        model = _selected_model(client)
        route, body = _lite_body("a watercolour", model, source_image=source, steps=10)
        answer = _fetch(client, "POST", route, body)
    assert route == "/sdapi/v1/img2img" and answer.status_code == 200, answer.text
    image = _lite_image(answer)
    assert image is not None and image.width == image.height
    info = json.loads(answer.json()["info"])
    assert info["denoising_strength"] == 0.6 and info["seed"] == body["seed"] and info[NOT_DONE] == []
    assert "Denoising strength: 0.6" in image.info["parameters"]


def test_kobold_lite_sampler_and_schedule_menus(server):
    """Each of Lite's sampler x scheduler choices: those this server runs exactly are read into a job (checked here
    without running them); the others are refused with a 422 naming the sampler and schedule and why (no ``images``:
    Lite shows its generation-failed message). What runs is what GET /samplers and /schedulers list, less
    Euler a on Karras or Exponential (diffusers' Euler ancestral takes no sigma schedule). Lite's optional
    ``clip_skip`` (a field A1111 does not read either) and ``save_images`` are listed as not done."""
    url, app = server
    catalogue = app.state.server.catalogue
    refused = {("DPM2", s) for s in LITE_SCHEDULERS} | {("DDIM", s) for s in LITE_SCHEDULERS}
    refused |= {("LCM", s) for s in LITE_SCHEDULERS} | {(s, "sgm_uniform") for s in LITE_SAMPLERS}
    refused |= {("Euler a", "karras"), ("Euler a", "exponential")}
    with httpx.Client(base_url=url, timeout=60) as client:
        model = _selected_model(client)
        listed = {s["name"] for s in _fetch(client, "GET", "/sdapi/v1/samplers").json()}
        schedules = {s["name"] for s in _fetch(client, "GET", "/sdapi/v1/schedulers").json()}
        for sampler in LITE_SAMPLERS:
            for scheduler in LITE_SCHEDULERS:
                _, body = _lite_body("a boat", model, sampler=sampler, scheduler=scheduler)
                runs = sampler in listed and (scheduler == "default" or scheduler in schedules)
                if (sampler, scheduler) in refused:
                    answer = _fetch(client, "POST", "/sdapi/v1/txt2img", body)
                    assert answer.status_code == 422 and _lite_image(answer) is None
                    detail = answer.json()["detail"]
                    assert f"sampler_name {sampler!r}" in detail and "scheduler" in detail
                else:
                    assert runs, (sampler, scheduler)
                    assert read_request(body, {}, catalogue=catalogue).spec.settings["scheduler"]
    _, body = _lite_body("a boat", model, clip_skip=2, save_remote_images=True)
    notes = read_request(body, {}, catalogue=catalogue).notes
    assert "fields not read by this server (A1111 ignores them too): clip_skip" in notes
    assert any(n.startswith("save_images:") for n in notes) and len(notes) == 2


def test_kobold_lite_interrogate_is_refused_naming_it(server):
    """interrogate_new_image posts ``{"image", "model": "clip"}`` and reads ``caption``: no captioning model runs
    here, so the answer is a 501 in A1111's error shape naming the route and the model (no ``caption``, so Lite
    leaves the image's description alone), and the server goes on serving."""
    url, _ = server
    image = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(image, "JPEG", quality=50)
    payload = {"image": base64.b64encode(image.getvalue()).decode(), "model": "clip"}
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = _fetch(client, "POST", "/sdapi/v1/interrogate", payload)
        assert answer.status_code == 501
        resp = answer.json()
        assert not resp.get("caption")
        assert "/sdapi/v1/interrogate" in resp["detail"] and "'clip'" in resp["detail"]
        assert _selected_model(client) == "sd_xl_base_1.0"
