"""The A1111 web API of ``sdxl-control serve`` driven by its real clients on the tiny models: the ``webuiapi`` package
(0.9.17, its own code) and the exact requests Open WebUI and SillyTavern send, replayed and parsed as they parse them;
the same settings give the CLI's pixels; the infotext an answer carries reads back the same through ``/png-info``
and ``generate --recipe``.

The server runs with an A1111-style install beside it (a second checkpoint as one ``.safetensors`` file, a LoRA):
:class:`~sdxl_control.jobs.resolvers.TinyResolver` swaps every checkpoint for the tiny base, so
:class:`tests.serving.TwoCheckpoints` maps the second file to the tiny models of another seed, which makes a model
switch visible in the pixels."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdxl_control.weights.model_folders import ModelFolders
from tests.serving import OTHER, TwoCheckpoints, running_server, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def install(tiny, tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from sdxl_control.testing import tiny_models
    from sdxl_control.testing.lora import write_tiny_lora
    from sdxl_control.testing.single_file import write_single_file

    root = tmp_path_factory.mktemp("a1111")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "Lora").mkdir(parents=True)
    write_single_file(tiny_models(seed=1).base, root / "models" / "Stable-diffusion" / OTHER)
    write_tiny_lora(root / "models" / "Lora" / "detail.safetensors", tiny.base, "kohya", seed=1)
    (root / "embeddings").mkdir()
    save_file(
        {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(root / "embeddings" / "grainy.safetensors")
    )
    save_file({"emb_params": torch.zeros(1, 768)}, str(root / "embeddings" / "sd15.safetensors"))  # not SDXL's
    return root


@pytest.fixture(scope="module")
def server(install) -> Any:
    resolver = TwoCheckpoints(folders=ModelFolders.of([install], environment=False))
    with running_server(tiny_config(resolver=resolver)) as (url, app):
        yield url, app


def _api(url: str) -> Any:
    import webuiapi

    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def _png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _txt2img(url: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, headers=headers, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- webuiapi ---------------------------------------------------------------------------------------------------------


def test_webuiapi_txt2img_draws_seeds_as_a1111_and_answers_its_info(server):
    """webuiapi 0.9.17 (mix1009/sdwebuiapi ce232f0, webuiapi/webuiapi.py txt2img, _to_api_result): a batch of 2
    with a seed; its result's ``info`` is the JSON string decoded, one infotext per image; the images carry them."""
    url, _ = server
    api = _api(url)
    result = api.txt2img(prompt="a red fox", seed=5, batch_size=2, width=64, height=64, alwayson_scripts={})
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert isinstance(info, dict) and info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2 and info["cfg_scale"] == 7.0
    assert info["sd_model_name"] == "sd_xl_base_1.0" and info["all_prompts"] == ["a red fox"] * 2
    assert [image.info["parameters"] for image in result.images] == info["infotexts"]
    assert "Seed: 6" in info["infotexts"][1] and info["extra_generation_params"]["Schedule type"] == "Uniform"
    # webuiapi sends only A1111's fields, each at a value that changes nothing here: no note but the extensions'.
    assert not [n for n in info["sdxl_control_not_done"] if "alwayson_scripts" not in n]
    # A seed of -1 is drawn as A1111 draws it, below 4294967294, and the batch counts on from it.
    drawn = api.txt2img(prompt="a red fox", seed=-1, n_iter=2, width=64, height=64, alwayson_scripts={}).info
    assert 0 <= drawn["seed"] < 4294967294 and drawn["all_seeds"] == [drawn["seed"], drawn["seed"] + 1]


def test_webuiapi_lists_what_runs_here(server):
    url, _ = server
    api = _api(url)
    assert api.util_get_model_names() == sorted(["sd_xl_base_1.0", "sd_xl_refiner_1.0", OTHER])
    assert "Euler a" in api.util_get_sampler_names() and "Karras" in [s["label"] for s in api.get_schedulers()]
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == ["Latent", "Latent (bicubic)",
                                                                   "Latent (nearest-exact)"]  # fmt: skip
    assert [lora["name"] for lora in api.get_loras()] == ["detail"]
    embeddings = api.get_embeddings()
    assert embeddings["loaded"] == {"grainy": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": 2048, "vectors": 2}}  # fmt: skip
    assert list(embeddings["skipped"]) == ["sd15"]
    assert api.get_cmd_flags()["api_auth"] is None
    assert api.has_controlnet  # /scripts lists "controlnet m2m": webuiapi sends its empty ControlNet args


def test_webuiapi_switches_the_model_through_options(server):
    """util_set_model posts ``{"sd_model_checkpoint": title}`` (webuiapi.py util_set_model); the next job runs the
    other model (other pixels, the same seed), and switching back makes the first pixels again. A path, or a name
    the server does not list, is refused naming the field, and the model stays."""
    url, _ = server
    api = _api(url)
    body = dict(prompt="a lighthouse", seed=9, width=64, height=64, alwayson_scripts={})
    first = api.txt2img(**body)
    api.util_set_model(OTHER)
    assert api.util_get_current_model() == OTHER
    other = api.txt2img(**body)
    assert other.info["sd_model_name"] == "other_tiny"
    assert not np.array_equal(_pixels(first.image), _pixels(other.image))
    for bad in ("/etc/passwd", "../models/Stable-diffusion/other_tiny.safetensors", "nope"):
        refused = api.set_options({"sd_model_checkpoint": bad})  # webuiapi returns the JSON, whatever the status
        assert "sd_model_checkpoint" in refused["detail"] and repr(bad) in refused["detail"]
        assert api.util_get_current_model() == OTHER
    api.util_set_model("sd_xl_base_1.0")
    again = api.txt2img(**body)
    assert np.array_equal(_pixels(first.image), _pixels(again.image))


def test_webuiapi_img2img_with_a_mask_makes_the_clis_pixels(server, tmp_path):
    """webuiapi's img2img sends ``init_images`` and ``mask`` as data URLs, with mask_blur 4, inpainting_fill 0,
    inpaint_full_res True and its padding 0 (webuiapi.py img2img): the answer is the CLI's inpainting with the same
    image, mask, strength, blur and crop margin; "fill" (0) is listed as not done (the area starts from the
    original)."""
    from sdxl_control.cli import main

    url, _ = server
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    result = _api(url).img2img(images=[init], mask_image=mask, prompt="a cat", seed=4, denoising_strength=0.8,
                               width=64, height=64, alwayson_scripts={})  # fmt: skip
    assert result.image.size == (64, 64)
    assert any(n.startswith("inpainting_fill 0 (fill)") for n in result.info["sdxl_control_not_done"])
    assert result.info["denoising_strength"] == 0.8
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "cli.png"
    argv = ["generate", "a cat", "--tiny", "--init-image", str(tmp_path / "init.png"), "--mask",
            str(tmp_path / "mask.png"), "--strength", "0.8", "--mask-blur", "4", "--mask-crop", "0", "--steps", "2",
            "--seed", "4", "--size", "64x64", "--guidance", "7", "--scheduler", "euler_a_linspace", "-q", "-o",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    assert np.array_equal(_pixels(result.image), _pixels(Image.open(out)))


def test_webuiapi_progress_and_interrupt_answer_what_was_made(server):
    """While a long job runs, progress reports its step and a live preview; interrupt (webuiapi's interrupt(), which
    reads the JSON body) stops it at its next step, and the request answers 200 with the last preview, saying so, as
    A1111 answers an interrupted job with its image as far as it got. Idle, progress is all zero."""
    url, _ = server
    api = _api(url)
    answers: list[Any] = []
    body = dict(prompt="a long walk", seed=1, steps=200, width=64, height=64, alwayson_scripts={})
    worker = threading.Thread(target=lambda: answers.append(api.txt2img(**body)))
    worker.start()
    deadline = time.monotonic() + 120
    while True:
        state = api.get_progress()
        if state["state"]["sampling_step"] >= 2 and state["current_image"]:
            break
        assert time.monotonic() < deadline and worker.is_alive(), state
        time.sleep(0.05)
    assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 1
    assert _png(state["current_image"]).size == (64, 64)
    assert api.interrupt() == {}
    worker.join(120)
    (result,) = answers
    assert len(result.images) == 1
    assert any(n.startswith("interrupted:") for n in result.info["sdxl_control_not_done"])
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert api.skip() == {}  # nothing running: answered, nothing stopped


# -- Open WebUI and SillyTavern, as they send ------------------------------------------------------------------------


def test_open_webui_lists_switches_and_generates(server):
    """Open WebUI's A1111 engine (open-webui/open-webui backend/open_webui/routers/images.py @ 02530d50): an empty
    ``authorization`` header when no auth is set; the model list from sd-models (id = title); set_image_model GETs
    the options and POSTs the WHOLE dict back with sd_model_checkpoint changed (raise_for_status); txt2img with
    {prompt, batch_size, width, height, steps, negative_prompt}; it reads ``res['images']`` (raw base64 or a data URL,
    get_image_data) and ``res['info']``."""
    url, _ = server
    headers = {"authorization": ""}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        client.get("/sdapi/v1/options").raise_for_status()  # verify_url
        models = [{"id": m["title"], "name": m["model_name"]} for m in client.get("/sdapi/v1/sd-models").json()]
        assert {"id": OTHER, "name": "other_tiny"} in models
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "sd_xl_base_1.0"
        options["sd_model_checkpoint"] = OTHER
        client.post("/sdapi/v1/options", json=options).raise_for_status()
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == OTHER
        body = {"prompt": "a harbour", "batch_size": 2, "width": 64, "height": 64, "steps": 2,
                "negative_prompt": "fog"}  # fmt: skip
        res = client.post("/sdapi/v1/txt2img", json=body).json()
        images = []
        for image in res["images"]:  # get_image_data: a data URL if it holds a comma, else raw base64 PNG
            assert "," not in image
            images.append(_png(image))
        assert len(images) == 2 and json.loads(res["info"])["sd_model_name"] == "other_tiny"
        assert json.loads(res["info"])["negative_prompt"] == "fog"
        options["sd_model_checkpoint"] = "sd_xl_base_1.0"
        client.post("/sdapi/v1/options", json=options).raise_for_status()


def test_sillytavern_pings_lists_sets_and_generates(server):
    """SillyTavern's A1111 source (SillyTavern/SillyTavern src/endpoints/stable-diffusion.js @ 02903fdd; its client
    public/scripts/extensions/stable-diffusion/index.js @ 1ac6780e generateAutoImage): an ``Authorization: Basic``
    header with no credentials (src/util.js getBasicAuthHeader of an empty auth); upscalers + latent-upscale-modes names; sd-vae model_name; samplers and schedulers
    names; sd-models titles; set-model = POST options then poll progress until ``progress === 0.0 &&
    state.job_count === 0``; generate = its whole body POSTed as received (with its own ``url`` and ``auth``),
    the answer passed through; ``images[0]`` read as PNG base64."""
    url, _ = server
    headers = {"Authorization": "Basic"}  # "Basic " + b64(""), trimmed as fetch normalises header values
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        assert client.get("/sdapi/v1/options").is_success  # /ping
        upscalers = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
        latent = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
        assert [upscalers[0], *latent, *upscalers[1:]][:2] == ["None", "Latent"]
        assert client.get("/sdapi/v1/sd-vae").json() == []
        samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
        schedulers = [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert "DPM++ 2M" in samplers and "karras" in schedulers and OTHER in titles
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"}).is_success
        for _ in range(10):
            progress = client.get("/sdapi/v1/progress").json()
            if progress["progress"] == 0.0 and progress["state"]["job_count"] == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("progress never came back to idle")
        body = {
            "url": url, "auth": "user:s3cret-pass", "prompt": "a cosy tavern", "negative_prompt": "blurry",
            "sampler_name": "DPM++ 2M", "scheduler": "karras", "steps": 2, "cfg_scale": 7, "width": 64,
            "height": 64, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
            "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": True,
            "clip_skip": 2, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False,
        }  # fmt: skip
        answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    assert "s3cret-pass" not in answer.text  # its password is never echoed
    data = answer.json()
    assert _png(data["images"][0]).format == "PNG"
    info = json.loads(data["info"])
    assert 0 <= info["seed"] < 4294967294 and info["sampler_name"] == "DPM++ 2M"  # no seed: drawn
    assert info["extra_generation_params"]["Schedule type"] == "Karras" and info["clip_skip"] == 2
    notes = "\n".join(info["sdxl_control_not_done"])
    assert "url, auth, clip_skip" in notes and "CLIP_stop_at_last_layers 2: not applied" in notes
    assert "save_images" in notes


# -- pixels and read-back ---------------------------------------------------------------------------------------------


def test_a_txt2img_request_makes_the_clis_pixels_and_its_infotext_reads_back(server, install, tmp_path):
    """The same settings through the A1111 route and the CLI give the same pixels (hires fix in latent space, a
    LoRA from the install's Lora folder by its name in the prompt); the infotext in ``info`` reads back through
    /png-info (A1111's parameters) and ``generate --recipe`` (our reading of an A1111 PNG) as the same settings."""
    from sdxl_control.cli import main
    from sdxl_control.records.recipe import read_recipe

    url, _ = server
    body = {"prompt": "a red fox <lora:detail:0.7>", "negative_prompt": "blurry", "seed": 11, "steps": 2,
            "cfg_scale": 6.5, "width": 64, "height": 64, "sampler_name": "DPM++ 2M Karras", "enable_hr": True,
            "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "denoising_strength": 0.6,
            "hr_second_pass_steps": 2}  # fmt: skip
    data = _txt2img(url, body)
    served = _png(data["images"][0])
    assert served.size == (96, 96)
    recipe = json.loads(served.info["sdxl-control"])
    assert [(c["kind"], c["scale"]) for c in recipe["conditions"]] == [("lora", 0.7)]
    out = tmp_path / "cli.png"
    argv = ["generate", "a red fox", "-n", "blurry", "--tiny", "--models-dir", str(install), "--lora",
            str(install / "models" / "Lora" / "detail.safetensors") + ":0.7", "--seed", "11", "--steps", "2",
            "--guidance", "6.5", "--size", "64x64", "--scheduler", "dpmpp_2m_karras", "--hires", "1.5",
            "--hires-strength", "0.6", "--hires-steps", "2", "--upscaler", "latent-bicubic", "-q", "-o",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    assert np.array_equal(_pixels(served), _pixels(Image.open(out)))

    infotext = json.loads(data["info"])["infotexts"][0]
    only_text = tmp_path / "a1111.png"
    from PIL import PngImagePlugin

    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", infotext)
    served.save(only_text, pnginfo=chunk)
    encoded = base64.b64encode(only_text.read_bytes()).decode()
    read = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{encoded}"}).json()
    assert read["info"] == infotext
    params = read["parameters"]
    assert {k: params[k] for k in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2",
                                   "Hires upscale", "Hires upscaler", "Hires steps", "Denoising strength")} == {
        "Steps": "2", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "11",
        "Size-1": "64", "Size-2": "64", "Hires upscale": "1.5", "Hires upscaler": "Latent (bicubic)",
        "Hires steps": "2", "Denoising strength": "0.6",
    }  # fmt: skip
    assert params["Prompt"] == "a red fox <lora:detail:0.7>" and params["Negative prompt"] == "blurry"
    by_webuiapi = _api(url).png_info(Image.open(only_text))  # webuiapi.py png_info: a data URL, text chunks kept
    assert by_webuiapi.info == infotext and by_webuiapi.parameters == params
    # A1111 1.9+'s `infotext` field: the same settings, so the same pixels (the model it names is the tiny one's).
    pasted = _txt2img(url, {"infotext": infotext})
    assert np.array_equal(_pixels(_png(pasted["images"][0])), _pixels(served))
    assert "infotext Model 'base': not a model this server lists" in "".join(
        json.loads(pasted["info"])["sdxl_control_not_done"]
    )
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(only_text), "--tiny", "--models-dir", str(install), "-q", "-o",
                 str(again)]) == 0  # fmt: skip
    remade = read_recipe(again)
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "hires_scale", "hires_strength",
                "hires_steps", "upscaler"):  # fmt: skip
        assert remade[key] == recipe[key], key
    assert remade["scheduler"]["name"] == recipe["scheduler"]["name"] == "dpmpp_2m_karras"
    assert [(c["kind"], c["scale"]) for c in remade["conditions"]] == [("lora", 0.7)]


# -- refusals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "status", "named"),
    [
        ("txt2img", {"sampler_name": "Nope"}, 422, "sampler_name 'Nope'"),
        ("txt2img", {"sampler_name": "Euler a", "scheduler": "karras"}, 422, "sampler_name 'Euler a'"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 422,
         "override_settings.sd_model_checkpoint"),
        ("txt2img", {"refiner_checkpoint": "C:\\models\\x.safetensors", "refiner_switch_at": 0.8}, 422,
         "refiner_checkpoint"),
        ("txt2img", {"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, 422, "hr_upscaler"),
        ("txt2img", {"prompt": "a <lora:../../secret:1>"}, 422, "<lora:../../secret"),
        ("txt2img", {"steps": 10**6}, 422, "steps: 1000000"),
        ("txt2img", {"width": 20000}, 422, "width x height: 20000x512"),
        ("txt2img", {"batch_size": 8, "n_iter": 8}, 422, "batch_size x n_iter: 64"),
        ("txt2img", {"script_name": "x/y/z plot"}, 422, "script_name"),
        ("img2img", {"prompt": "x"}, 404, "Init image not found"),
        ("img2img", {"init_images": ["not base64 at all!"]}, 422, "init_images[0]"),
        ("img2img", {"init_images": ["https://example.com/a.png"]}, 422, "init_images[0]: image URLs"),
        ("options", {"sd_model_checkpoint": "sd_xl_base_1.0", "samples_format": "jpg"}, 422, "samples_format"),
        ("options", {"no_such_option": 1}, 422, "'no_such_option'"),
        ("options", {"sd_vae": "../vae.safetensors"}, 422, "sd_vae"),
        ("options", {"CLIP_stop_at_last_layers": 40}, 422, "CLIP_stop_at_last_layers"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_naming_the_field(server, route, body, status, named):
    url, _ = server
    answer = httpx.post(f"{url}/sdapi/v1/{route}", json={"prompt": "x", **body}, timeout=60)
    if route == "options":
        answer = httpx.post(f"{url}/sdapi/v1/options", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["detail"]
    assert httpx.get(f"{url}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == "sd_xl_base_1.0"


def test_every_listed_sampler_and_schedule_type_runs():
    """What /samplers and /schedulers list is what a request may name: each sampler (and its aliases) with its
    "Automatic" schedule, and each schedule type with some listed sampler, is read without a refusal."""
    from sdxl_control.serve.a1111 import request_spec
    from sdxl_control.serve.a1111_info import SAMPLERS, SCHEDULERS

    for entry in SAMPLERS:
        for name in (entry["name"], *entry["aliases"]):
            spec, _ = request_spec("txt2img", {"prompt": "x", "sampler_name": name, "steps": 10}, {})
            assert spec.settings["scheduler"]
    for schedule in SCHEDULERS:
        runs = []
        for entry in SAMPLERS:
            for label in (schedule["name"], schedule["label"]):
                try:
                    request_spec(
                        "txt2img", {"prompt": "x", "sampler_name": entry["name"], "scheduler": label, "steps": 10}, {}
                    )
                    runs.append(entry["name"])
                except Exception:
                    pass
        assert runs, schedule


def _page_curls() -> list[list[str]]:
    """The curl commands of docs/guides/serve.md's A1111 section, as argument lists."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "serve.md").read_text()
    section = page.split("## The A1111 web API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```console\n(.*?)```", section, flags=re.S)
    return [shlex.split(line[2:]) for block in blocks for line in block.splitlines() if line.startswith("$ curl")]


def test_the_pages_curl_commands_answer_as_it_says(server):
    """Each curl command the page prints, sent as curl sends it (method, headers, body) to the tiny server: the
    answers are A1111's shapes, and the one the page says is refused is refused naming its field."""
    url, _ = server
    commands = _page_curls()
    assert len(commands) >= 6
    for argv in commands:
        method, headers, data, target = "GET", {}, None, None
        words = iter(argv[1:])
        for word in words:
            if word == "-X":
                method = next(words)
            elif word == "-H":
                key, _, value = next(words).partition(":")
                headers[key.strip()] = value.strip()
            elif word == "-d":
                data = next(words)
            elif not word.startswith("-"):
                target = word.replace("http://127.0.0.1:7861", url)
        assert target is not None, argv
        if data is not None and method == "GET":
            method = "POST"
        answer = httpx.request(method, target, headers=headers, content=data, timeout=300)
        if "DPM adaptive" in (data or ""):
            assert answer.status_code == 422 and "sampler_name 'DPM adaptive'" in answer.json()["detail"]
            continue
        assert answer.status_code == 200, (argv, answer.text)
        body = answer.json()
        if target.endswith("/txt2img"):
            info = json.loads(body["info"])
            assert len(body["images"]) == len(info["infotexts"]) == len(info["all_seeds"])
            assert all(_png(image).format == "PNG" for image in body["images"])


def test_the_refiner_fields_make_the_clis_refined_pixels(server, tmp_path):
    """``refiner_checkpoint`` (a title sd-models lists) with ``refiner_switch_at`` hands the schedule over to the
    refiner as the CLI's ``--refiner-switch`` does; without refiner_switch_at no refiner runs (as in A1111), said."""
    from sdxl_control.cli import main

    url, _ = server
    body = {"prompt": "a castle", "seed": 2, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler",
            "refiner_checkpoint": "sd_xl_refiner_1.0", "refiner_switch_at": 0.5}  # fmt: skip
    data = _txt2img(url, body)
    served = _png(data["images"][0])
    assert json.loads(served.info["sdxl-control"])["refiner_switch"] == 0.5
    out = tmp_path / "cli.png"
    assert main(["generate", "a castle", "--tiny", "--seed", "2", "--steps", "3", "--size", "64x64", "--guidance",
                 "7", "--scheduler", "euler_linspace", "--refiner-switch", "0.5", "-q", "-o", str(out)]) == 0  # fmt: skip
    assert np.array_equal(_pixels(served), _pixels(Image.open(out)))
    alone = _txt2img(url, {**body, "refiner_switch_at": None})
    alone_recipe = json.loads(_png(alone["images"][0]).info["sdxl-control"])
    assert alone_recipe["refiner_switch"] is None and alone_recipe["models"]["refiner"] is None
    assert any("no refiner runs" in n for n in json.loads(alone["info"])["sdxl_control_not_done"])


def _b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def test_img2img_and_hires_fields_map_to_the_request():
    """A1111's img2img fields as the request's: the mask inverted by inpainting_mask_invert, one blur radius from
    mask_blur_x/y (the larger, said when they differ), "Only masked" as the crop margin, whole picture as none; the
    hires size from hr_resize_x alone (the aspect kept, as A1111's calculate_target_resolution)."""
    from sdxl_control.serve.a1111 import request_spec

    init = Image.new("RGB", (64, 64), (200, 10, 10))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    body = {"prompt": "x", "init_images": [_b64(init, data_url=True)], "mask": _b64(mask), "width": 64,
            "height": 64, "denoising_strength": 0.4, "mask_blur_x": 2, "mask_blur_y": 6, "inpainting_fill": 1,
            "inpaint_full_res": True, "inpaint_full_res_padding": 16, "inpainting_mask_invert": 1}  # fmt: skip
    spec, notes = request_spec("img2img", body, {})
    settings = spec.settings
    assert settings["strength"] == 0.4 and settings["mask_blur"] == 6 and settings["padding_mask_crop"] == 16
    assert np.asarray(settings["mask"])[0, 0] == 0 and np.asarray(settings["mask"])[0, 63] == 255  # inverted
    assert settings["init_image"].size == (64, 64)
    assert [n for n in notes if n.startswith("mask_blur_x 2, mask_blur_y 6")] and not [n for n in notes if "fill" in n]
    whole, _ = request_spec("img2img", {**body, "inpaint_full_res": False, "mask_blur": 3}, {})
    assert "padding_mask_crop" not in whole.settings and whole.settings["mask_blur"] == 3
    assert whole.settings["paste_back"] is True and "paste_back" not in settings  # a crop is always pasted back
    tall, notes = request_spec("img2img", {**body, "width": 64, "height": 128, "resize_mode": 0}, {})
    assert any(n.startswith("resize_mode 0: an init image of another aspect") for n in notes)
    hires, _ = request_spec(
        "txt2img", {"prompt": "x", "width": 64, "height": 48, "enable_hr": True, "hr_resize_x": 96}, {}
    )
    assert hires.settings["hires_scale"] == 1.5 and hires.settings["upscaler"] == "latent"
    assert hires.settings["hires_strength"] == 0.75  # A1111's txt2img default denoising_strength


def test_an_empty_prompt_makes_an_unconditional_image_as_a1111s_does(server):
    """A1111's API takes ``prompt: ""`` (its default): an image of the empty prompt, not an error; a job with no
    prompt at all is still refused where it is made (the page's empty box, the command line)."""
    url, _ = server
    answer = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "", "steps": 2, "width": 64, "height": 64, "seed": 3},
                        timeout=300)  # fmt: skip
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["prompt"] == "" and info["seed"] == 3
    assert (
        json.loads(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).info["sdxl-control"])["prompt"]
        == ""
    )


def test_each_refresh_route_lists_a_checkpoint_added_after_start(tmp_path):
    """A1111's refresh-checkpoints (and -loras, -vae, -embeddings): the model folders read again, so a file added
    while the server runs is listed (one reading serves every kind)."""
    from fastapi.testclient import TestClient

    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.serve.app import create_app

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    app = create_app(tiny_config(resolver=TinyResolver(folders=ModelFolders.of([tmp_path]))))
    try:
        client = TestClient(app)
        for index, kind in enumerate(("checkpoints", "loras", "vae", "embeddings")):
            (folder / f"added_{index}.safetensors").write_bytes(b"")
            assert f"added_{index}.safetensors" not in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
            assert client.post(f"/sdapi/v1/refresh-{kind}").status_code == 200
            assert f"added_{index}.safetensors" in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    finally:
        app.state.server.service.close(5)
