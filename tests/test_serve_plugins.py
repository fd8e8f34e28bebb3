"""Editors' plugins that speak the A1111 web API drive ``sdxl-control serve`` (issue 37): the requests the Photoshop
plugin sends, replayed with httpx against a tiny server, and the answers read as the plugin reads them.

The plugin: AbdullahAlfaraj/Auto-Photoshop-StableDiffusion-Plugin @ 6f6d4907adf0b6a6e562d084238f02ed6b7503c1 (v1.4.1),
its "Automatic1111" backend. Its calls, by file:

- typescripts/sd_tab/util.ts ``refreshUI`` (on start and on refresh): GET options (index.js ``checkAutoStatus``, then
  utility/sdapi/options.js ``getCurrentModel``/``getInpaintingMaskWeight``), samplers (``initSamplers``: each
  ``name``), sd-models (``refreshModels``: each ``title``), loras (each ``name``), embeddings (``loaded``'s keys),
  upscalers (``requestGetHiResUpscalers``: each ``name`` after the six Latent modes), POST options
  ``{inpainting_mask_weight: 1.0}`` (typescripts/util/ts/sdapi.ts ``setInpaintMaskWeight``), then
  typescripts/controlnet/entry.ts: GET /controlnet/settings (``control_net_unit_count``), /controlnet/version,
  /controlnet/model_list (``model_list``), /controlnet/module_list?alias_names=true (``module_list``,
  ``module_detail[module].model_free`` and ``.sliders``); typescripts/after_detailer/after_detailer.tsx
  ``isInstalled``: GET scripts, "adetailer" in its txt2img or img2img list.
- utility/session.js ``getSettings``: the body of txt2img and img2img (every UI field, A1111's and its own), built
  from typescripts/sd_tab/util.ts's ``store`` defaults; typescripts/controlnet/entry.ts
  ``mapPluginSettingsToControlNet`` adds the ControlNet units (typescripts/controlnet/store.ts
  ``DefaultControlNetUnitData``, one per ``control_net_unit_count``) both as ``controlnet_units`` and as
  ``alwayson_scripts.controlnet.args``.
- utility/sdapi/python_replacement.js ``txt2ImgRequest``/``img2ImgRequest`` (and typescripts/session/modes.ts
  ``requestControlNetTxt2Img``): POST with ``Accept``/``Content-Type: application/json``; each of ``images`` is sent
  back to POST png-info as ``data:image/png;base64,...`` (``getAuto1111Metadata``) and its ``info`` read by
  ``convertMetadataToJson``; with ControlNet, the images past ``batch_size`` are read as detect maps.
- typescripts/session/progress.ts ``requestProgress`` (GET progress?skip_current_image=false every 2 s: ``progress``,
  ``current_image``), typescripts/session/modes.ts ``requestInterrupt`` (POST interrupt, its JSON read),
  typescripts/util/ts/sdapi.ts ``requestSwapModel`` (POST options ``{sd_model_checkpoint: title}``, its JSON read),
  typescripts/settings/settings.tsx ``postOptions`` (``{CLIP_stop_at_last_layers}``).

Only the request shapes and the way answers are read are taken from it (facts), no code."""

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
from PIL import Image, ImageDraw

from sdxl_control.base.errors import InvalidRequestError
from tests.serving import running_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PLUGIN = "AbdullahAlfaraj/Auto-Photoshop-StableDiffusion-Plugin @ 6f6d4907adf0b6a6e562d084238f02ed6b7503c1"
# The plugin's fetch headers on every POST (python_replacement.js, modes.ts, api.ts requestPost).
HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server() -> Any:
    with running_server() as (url, _app):
        with httpx.Client(base_url=url, timeout=300) as client:
            yield client


def picture(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(90, 140, (size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size[0] // 5, size[1] // 5, size[0] // 2, size[1] // 2], fill=(240, 240, 240))
    return image


def b64(image: Image.Image) -> str:
    """A layer as the plugin exports it: PNG, base64, no data-URL prefix."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png(value: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(value)))


def settings_body(mode: str = "txt2img", **ui: Any) -> dict[str, Any]:
    """The body utility/session.js ``getSettings`` builds for ``mode`` (txt2img, img2img, inpaint) with the sd tab's
    store defaults (typescripts/sd_tab/util.ts ``store``), ``ui`` changing what the user set; the plugin's document,
    selection and prompt-shortcut fields as it sends them; ADetailer's entry as it adds it when /scripts lists
    adetailer (disabled by default)."""
    store = {"batch_size": 1, "steps": 20, "width": 512, "height": 512, "cfg": 7.0, "denoising_strength": 0.7,
             "hr_denoising_strength": 0.5, "inpaint_full_res": False, "sampler_name": "Euler a", "seed": "-1",
             "mask_expansion": 0, "inpaint_full_res_padding": 0, "inpainting_fill": 1, "restore_faces": False,
             "tiling": False, "init_image": None, "mask": None, "adetailer": False}  # fmt: skip
    store.update(ui)
    body: dict[str, Any] = {"selection_info": {"left": 0, "top": 0, "width": store["width"],
                                               "height": store["height"]}}  # fmt: skip
    denoising = store["hr_denoising_strength"]
    if mode in ("inpaint", "outpaint"):
        body.update(inpaint_full_res=store["inpaint_full_res"], inpaint_full_res_padding=store["inpaint_full_res_padding"],
                    inpainting_fill=store["inpainting_fill"], mask_expansion=store["mask_expansion"],
                    mask=store["mask"], expanded_mask=store["mask"])  # fmt: skip
    if mode in ("img2img", "inpaint", "outpaint"):
        denoising = store["denoising_strength"]
        body.update(denoising_strength=denoising, init_images=[store["init_image"]])
    ad = {"ad_model": "face_yolov8n.pt", "ad_prompt": "", "ad_negative_prompt": "", "ad_confidence": 0.3,
          "ad_mask_min_ratio": 0.0, "ad_mask_max_ratio": 1.0, "ad_dilate_erode": 32, "ad_x_offset": 0,
          "ad_y_offset": 0, "ad_mask_merge_invert": "None", "ad_mask_blur": 4, "ad_denoising_strength": 0.4,
          "ad_inpaint_only_masked": True, "ad_inpaint_only_masked_padding": 0, "ad_use_inpaint_width_height": False,
          "ad_inpaint_width": 512, "ad_inpaint_height": 512, "ad_use_steps": True, "ad_steps": 28,
          "ad_use_cfg_scale": False, "ad_cfg_scale": 7.0, "ad_use_sampler": False, "ad_sampler": store["sampler_name"],
          "ad_use_noise_multiplier": False, "ad_noise_multiplier": 1.0, "ad_restore_face": False,
          "ad_controlnet_model": "None", "ad_controlnet_module": "None", "ad_controlnet_weight": 1,
          "ad_controlnet_guidance_start": 0.0, "ad_controlnet_guidance_end": 1.0}  # fmt: skip
    body["alwayson_scripts"] = {"ADetailer": {"args": [store["adetailer"], ad]}}
    if store.get("enable_hr") and store["width"] >= 512 and store["height"] >= 512:  # its hires gate
        body.update(enable_hr=True, hr_scale=store.get("hr_scale", 2.0), hr_upscaler=store.get("hr_upscaler", ""),
                    hr_second_pass_steps=store.get("hr_second_pass_steps", 20))  # fmt: skip
    body.update(prompt=store.get("prompt", "a cat"), negative_prompt=store.get("negative_prompt", ""),
                original_prompt=store.get("prompt", "a cat"), original_negative_prompt="", clip_skip=1)  # fmt: skip
    body.update(
        steps=store["steps"], sampler_index=store["sampler_name"], width=store["width"], height=store["height"],
        denoising_strength=denoising, batch_size=store["batch_size"], cfg_scale=store["cfg"], seed=store["seed"],
        mask_blur=4, use_sharp_mask=False, use_prompt_shortcut=False, prompt_shortcut_ui_dict={},
        uniqueDocumentId="0f1e2d3c-psd", mode=mode, restore_faces=store["restore_faces"], tiling=store["tiling"],
    )  # fmt: skip
    return body


def metadata_json(info: str) -> dict[str, str]:
    """utility/sdapi/python_replacement.js ``convertMetadataToJson``, the plugin's reading of png-info's ``info``: the
    prompt lines split at 'Negative prompt: ', then the last line without its last character, split at ',' and
    each piece at ':'."""
    last = info.rfind("\n")
    prompt, settings = info[:last], info[last + 1 : -1]
    out: dict[str, str] = {}
    parts = prompt.split("Negative prompt: ")
    out["prompt"], out["negative_prompt"] = parts[0], parts[1] if len(parts) > 1 else ""
    for setting in settings.split(","):
        key, _, value = setting.partition(":")
        out[key.lstrip()] = value.split(":")[0].lstrip()
    return out


def read_as_the_plugin(server: httpx.Client, answer: httpx.Response) -> list[dict[str, Any]]:
    """``txt2ImgRequest``'s reading of an answer: each image sent back to png-info with a data-URL prefix, its
    ``info`` read by ``convertMetadataToJson``."""
    assert answer.status_code == 200, answer.text
    out = []
    for image in answer.json()["images"]:
        info = server.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}, headers=HEADERS)
        assert info.status_code == 200, info.text
        out.append({"image": png(image), "auto_metadata": metadata_json(info.json()["info"])})
    return out


def recipe(image: Image.Image) -> dict[str, Any]:
    return json.loads(image.info["sdxl-control"])


# -- start: what refreshUI reads -------------------------------------------------------------------------------------


def test_the_plugins_start_finds_what_it_lists(server: httpx.Client) -> None:
    """refreshUI's calls answer what the plugin reads: options (the current model among sd-models' titles, the
    inpainting mask weight it just set), sampler names with its default 'Euler a', LoRA names, embeddings' loaded
    keys, upscaler names, the ControlNet extension's unit count, version (> 1: the plugin then sends control_mode
    and pixel_perfect), models, and a module_detail for every module (it reads ``model_free`` of the chosen one),
    and 'adetailer' in /scripts."""
    options = server.get("/sdapi/v1/options").json()
    models = [model["title"] for model in server.get("/sdapi/v1/sd-models").json()]
    assert options["sd_model_checkpoint"] in models
    assert server.post("/sdapi/v1/options", json={"inpainting_mask_weight": 1.0}, headers=HEADERS).status_code == 200
    assert server.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 1.0
    refused = server.post("/sdapi/v1/options", json={"inpainting_mask_weight": 0.5}, headers=HEADERS)
    assert refused.status_code == 422 and "inpainting_mask_weight" in refused.text
    samplers = [sampler["name"] for sampler in server.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in samplers
    assert all(isinstance(lora["name"], str) for lora in server.get("/sdapi/v1/loras").json())
    assert isinstance(server.get("/sdapi/v1/embeddings").json()["loaded"], dict)
    assert all(isinstance(up["name"], str) for up in server.get("/sdapi/v1/upscalers").json())
    settings = server.get("/controlnet/settings").json()
    assert (settings.get("control_net_unit_count") or settings.get("control_net_max_models_num")) >= 1
    assert server.get("/controlnet/version").json()["version"] > 1
    assert "controlnet-canny-sdxl-1.0" in server.get("/controlnet/model_list").json()["model_list"]
    modules = server.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    assert all(modules["module_detail"][name]["model_free"] in (True, False) for name in modules["module_list"])
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]][:3] == [512, 100, 200]
    scripts = server.get("/sdapi/v1/scripts").json()
    assert "adetailer" in scripts["txt2img"] and "adetailer" in scripts["img2img"]
    # Its own extension's routes (heartbeat, vae/list, mask/expansion, controlnet/filter) are not served: the plugin
    # reads a 404 as "extension missing" and goes on.
    assert server.get("/sdapi/auto-photoshop-sd/heartbeat").status_code == 404


def test_model_swap_and_clip_skip_through_options(server: httpx.Client) -> None:
    """requestSwapModel posts the title sd-models listed and reads the JSON answer; postOptions posts the clip skip
    the settings tab read from GET options."""
    title = server.get("/sdapi/v1/sd-models").json()[0]["title"]
    answer = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}, headers=HEADERS)
    assert answer.status_code == 200
    answer.json()  # the plugin reads the body as JSON
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == title
    clip = server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"]
    assert server.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": clip}, headers=HEADERS).status_code == 200


# -- generation ---------------------------------------------------------------------------------------------------------


def test_txt2img_as_the_plugin_sends_it(server: httpx.Client) -> None:
    """getSettings' txt2img body (seed as the string "-1", sampler_index, its own fields, a disabled ADetailer entry)
    makes one image of the asked size; png-info gives back the seed and settings ``convertMetadataToJson`` reads; the
    plugin's own fields are named in info's list of what was not read."""
    body = settings_body("txt2img", width=64, height=64, steps=2, prompt="a lighthouse")
    answer = server.post("/sdapi/v1/txt2img", json=body, headers=HEADERS)
    (read,) = read_as_the_plugin(server, answer)
    assert read["image"].size == (64, 64)
    info = json.loads(answer.json()["info"])
    meta = read["auto_metadata"]
    assert meta["prompt"].strip() == "a lighthouse"
    assert meta["Steps"] == "2" and meta["Sampler"] == "Euler a" and meta["Seed"] == str(info["seed"])
    assert meta["Size"] == "64x64"
    assert info["steps"] == 2 and info["sampler_name"] == "Euler a" and info["cfg_scale"] == 7.0
    not_read = " ".join(info["sdxl_control_not_done"])
    assert "uniqueDocumentId" in not_read and "selection_info" in not_read
    assert "detailer" not in recipe(read["image"])  # ADetailer's entry is there, disabled


def test_the_plugins_adetailer_entry_is_the_face_detailer() -> None:
    """With its After Detailer tab on, getSettings' ADetailer entry ([true, {ad_model face_yolov8n.pt, ad_confidence
    0.3, ad_dilate_erode 32, ad_mask_blur 4, ad_denoising_strength 0.4, ad_inpaint_only_masked_padding 0, ad_use_steps
    with ad_steps 28, its ControlNet model and module 'None'...}]) is the face detailer with those values; off, none."""
    from sdxl_control.serve.a1111 import request_spec

    spec, _ = request_spec("txt2img", settings_body("txt2img", adetailer=True, width=64, height=64, steps=2), {})
    assert spec.settings["detailer"] == {"strength": 0.4, "confidence": 0.3, "dilation": 32, "blur": 4, "padding": 0,
                                         "steps": 28}  # fmt: skip
    spec, _ = request_spec("txt2img", settings_body("txt2img", width=64, height=64, steps=2), {})
    assert "detailer" not in spec.settings


# requestGetHiResUpscalers: the six Latent modes the plugin offers before /upscalers' names.
PLUGIN_LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                       "Latent (nearest)", "Latent (nearest-exact)"]  # fmt: skip


def test_hires_fix_as_the_plugin_sends_it(server: httpx.Client) -> None:
    """With hires fix on at 512x512 (the plugin sends it only from 512 up), the store's defaults (hr_scale 2,
    hr_upscaler '' until the user picks one, 20 second-pass steps, hires denoising 0.5 as denoising_strength) are
    the job's hires pass. Of the upscaler names the plugin offers (A1111's six Latent modes, then /upscalers' names)
    all run but two Latent modes this server lacks, which are refused naming hr_upscaler (a 422)."""
    from sdxl_control.serve.a1111 import request_spec

    body = settings_body("txt2img", enable_hr=True)
    spec, notes = request_spec("txt2img", body, {})
    settings = spec.settings
    assert settings["hires_scale"] == 2.0 and settings["hires_strength"] == 0.5 and settings["hires_steps"] == 20
    assert settings["size"] == (512, 512)
    refused = ["Latent (bicubic antialiased)", "Latent (nearest)"]
    for name in [*(m for m in PLUGIN_LATENT_MODES if m not in refused),
                 *(up["name"] for up in server.get("/sdapi/v1/upscalers").json())]:  # fmt: skip
        assert request_spec("txt2img", {**body, "hr_upscaler": name}, {})[0].settings["upscaler"], name
    spec, notes = request_spec("txt2img", {**body, "hr_upscaler": "Latent (antialiased)"}, {})
    assert spec.settings["upscaler"] == "latent" and any(n.startswith("hr_upscaler 'Latent (antial") for n in notes)
    for name in refused:  # the other two it offers: refused, named
        with pytest.raises(InvalidRequestError, match=r"hr_upscaler: .*latent-upscale-modes"):
            request_spec("txt2img", {**body, "hr_upscaler": name}, {})
    assert server.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Latent (nearest)"}).status_code == 422


def test_antialiased_bilinear_enlargement_is_bilinear() -> None:
    """Why 'Latent (antialiased)' runs as 'Latent': A1111 interpolates the latents with torch's bilinear,
    antialias=True; for an enlargement (the hires fix only enlarges, hr_scale 1..4) that is the plain bilinear our
    'latent' mode runs, to float rounding."""
    import torch

    from sdxl_control.engine.upscale import upscale_latents

    latents = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    for size in [(96, 128), (144, 192), (192, 256), (384, 512)]:
        theirs = torch.nn.functional.interpolate(latents, size=(size[1] // 8, size[0] // 8), mode="bilinear",
                                                 antialias=True)  # fmt: skip
        assert torch.allclose(upscale_latents(latents, size, "latent"), theirs, atol=1e-5)
    assert "enable_hr" not in settings_body("txt2img", enable_hr=True, width=448)  # below 512: not sent


def test_img2img_and_inpaint_as_the_plugin_sends_them(server: httpx.Client, tmp_path: Path) -> None:
    """getSettings' img2img body (init_images: the layer as base64, denoising 0.7) and its inpaint body (mask,
    inpainting_fill 1 = original, inpaint_full_res false = whole picture, mask_blur 4, its expanded_mask and
    mask_expansion fields): the image keeps the layer's size, png-info reads back its seed and denoising strength,
    and the inpainting is the CLI's with the same image, mask, strength, blur and no crop, with nothing said about
    the fill (original is what this server does)."""
    from sdxl_control.cli import main

    layer = picture((64, 64), seed=3)
    body = settings_body("img2img", width=64, height=64, steps=2, init_image=b64(layer), seed="7")
    (read,) = read_as_the_plugin(server, server.post("/sdapi/v1/img2img", json=body, headers=HEADERS))
    assert read["image"].size == (64, 64)
    assert read["auto_metadata"]["Denoising strength"] == "0.7" and read["auto_metadata"]["Seed"] == "7"

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([32, 32, 63, 63], fill=255)
    body = settings_body("inpaint", width=64, height=64, steps=2, init_image=b64(layer), mask=b64(mask), seed="7")
    answer = server.post("/sdapi/v1/img2img", json=body, headers=HEADERS)
    (read,) = read_as_the_plugin(server, answer)
    assert not [n for n in json.loads(answer.json()["info"])["sdxl_control_not_done"] if "inpainting_fill" in n]
    layer.save(tmp_path / "layer.png")
    mask.save(tmp_path / "mask.png")
    argv = ["generate", "a cat", "--tiny", "--init-image", str(tmp_path / "layer.png"), "--mask",
            str(tmp_path / "mask.png"), "--strength", "0.7", "--mask-blur", "4", "--paste-back", "--steps", "2",
            "--seed", "7", "--size", "64x64", "--guidance", "7", "--scheduler", "euler_a_linspace", "-q", "-o",
            str(tmp_path / "cli.png")]  # fmt: skip
    assert main(argv) == 0
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    served = np.asarray(read["image"].convert("RGB"))
    assert np.array_equal(served, cli)
    # "Whole picture" (inpaint_full_res false): the original pasted back outside the feathered mask, as A1111 does.
    # (The mask is the square from 32 on; feathered by 4 px, it leaves the square up to 16 px untouched.)
    assert np.array_equal(served[:16, :16], np.asarray(layer.convert("RGB"))[:16, :16])


def test_controlnet_txt2img_as_the_plugin_sends_it(server: httpx.Client) -> None:
    """mapPluginSettingsToControlNet's body: ``control_net_unit_count`` units, the first a canny unit (its image as
    ``input_image``, the module's slider values as processor_res/threshold_a/threshold_b, control_mode 'Balanced',
    pixel_perfect, lowvram), the others the store's disabled defaults; the same units as top-level
    ``controlnet_units``; subseed -1, empty override_settings. The answer has batch_size images and no detect map
    (so the plugin shows none), and the image ran the edges input with those thresholds."""
    count = server.get("/controlnet/settings").json()["control_net_unit_count"]
    sliders = server.get("/controlnet/module_list", params={"alias_names": "true"}).json()["module_detail"]["canny"]
    default = {"enabled": False, "input_image": "", "mask": "", "module": "", "model": "", "weight": 1.0,
               "resize_mode": "Crop and Resize", "lowvram": True, "processor_res": 512, "threshold_a": 0,
               "threshold_b": 0, "guidance_start": 0, "guidance_end": 1, "control_mode": "Balanced",
               "pixel_perfect": True}  # fmt: skip
    canny = {**default, "enabled": True, "input_image": b64(picture(seed=5)), "module": "canny",
             "model": "controlnet-canny-sdxl-1.0", "processor_res": sliders["sliders"][0]["value"],
             "threshold_a": sliders["sliders"][1]["value"], "threshold_b": sliders["sliders"][2]["value"]}  # fmt: skip
    units = [canny, *([default] * (count - 1))]
    plugin = settings_body("txt2img", width=64, height=64, steps=2, seed="11")
    body = {**plugin, "controlnet_units": units, "subseed": -1, "override_settings": {},
            "override_settings_restore_afterwards": True,
            "alwayson_scripts": {**plugin["alwayson_scripts"], "controlnet": {"args": units}}}  # fmt: skip
    answer = server.post("/sdapi/v1/txt2img", json=body, headers=HEADERS)
    reads = read_as_the_plugin(server, answer)
    annotations = max(len(reads) - plugin["batch_size"], 0)
    assert annotations == 0 and len(reads) == 1
    (condition,) = recipe(reads[0]["image"])["conditions"]
    assert condition["kind"] == "controlnet" and condition["preprocess"] == "canny"
    assert condition["preprocess_options"] == {"low": 100, "high": 200}


def test_progress_polling_and_interrupt(server: httpx.Client) -> None:
    """While a txt2img runs, requestProgress's poll reads ``progress`` (x 100 for its bar) and ``current_image`` (the
    progress layer, a PNG); requestInterrupt's POST (headers, no body) answers JSON and the request still answers
    its image, which the plugin places."""
    body = settings_body("txt2img", width=64, height=64, steps=200, seed="3")
    answers: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: answers.append(server.post("/sdapi/v1/txt2img", json=body, headers=HEADERS))
    )
    worker.start()
    deadline = time.monotonic() + 120
    while True:
        state = server.get("/sdapi/v1/progress", params={"skip_current_image": "false"}).json()
        if state["progress"] and state["current_image"]:
            break
        assert time.monotonic() < deadline and worker.is_alive(), state
        time.sleep(0.05)
    assert 0 < state["progress"] * 100 < 100
    assert png(state["current_image"]).size == (64, 64)
    interrupted = server.post("/sdapi/v1/interrupt", headers=HEADERS)
    assert interrupted.status_code == 200 and interrupted.json() == {}
    worker.join(120)
    (answer,) = answers
    (read,) = read_as_the_plugin(server, answer)
    assert read["image"].size == (64, 64)


# -- Cyanic SD-Krita ---------------------------------------------------------------------------------------------------
# DrCyanide/cyanic-sd-krita @ 5678aa1bc6f263b23a7e1da384b235f61489d26d, the Krita plugin that speaks /sdapi/v1 (A1111
# and SD.Next). cyanic/sdapi_v1.py: SDAPI.init_api (GET /queue/status first: no answer = not connected, nothing
# else is asked), the lists it caches, cleanup_data (the widgets' fields as the API's), txt2img/img2img (POST with
# Content-Type: application/json; ``info`` parsed from its JSON string), get_progress, interrupt (POST ``{}``);
# cyanic/widgets/generate.py (the body: width/height raised to defaults.min_size, then every widget's
# get_generation_data; progress_check; threadable_return); cyanic/default_settings.json (the defaults).


def cyanic_get(server: httpx.Client, route: str) -> Any:
    """SDAPI.get: the JSON of a 200, None for anything else (urlopen raises, the plugin catches)."""
    answer = server.get(route)
    return answer.json() if answer.status_code == 200 else None


def cyanic_body(server: httpx.Client, mode: str, **changes: Any) -> dict[str, Any]:
    """GenerateWidget.generate's data for ``mode`` on a 64x64 canvas (the user's defaults.min_size set to 64; the
    default 512 would raise it), its widgets at default_settings.json's values (sampler '' as the options name
    none, the model and VAE the options name), then SDAPI.cleanup_data."""
    options = cyanic_get(server, "/sdapi/v1/options")
    data: dict[str, Any] = {"width": 64, "height": 64}
    data.update(model=options.get("sd_model_checkpoint", ""), vae=options.get("sd_vae", ""), sampler="",
                sampling_steps=2)  # ModelsWidget (enable_refiner false: its refiner fields popped)  # fmt: skip
    data.update(prompt="a red barn", negative_prompt="")  # PromptWidget
    data.update(batch_count=1, batch_size=1, cfg_scale=7, seed=-1, subseed=-1, subseed_strength=0.0)
    if mode == "txt2img":
        data["enable_hr"] = False  # HiResFixWidget: auto hires only above 768 px
    else:  # the inpaint page: MaskWidget, ColorCorrectionWidget, DenoiseWidget (SoftInpaintWidget off: {})
        data.update(mask_blur=4, inpainting_mask_invert=0, inpainting_fill=1, inpaint_full_res=0,
                    inpaint_full_res_padding=32, color_correction=True, denoising_strength=0.7)  # fmt: skip
    scripts = cyanic_get(server, "/sdapi/v1/scripts") or {}
    if any("controlnet" in [k.lower() for k in names] for names in scripts.values()):
        data["alwayson_scripts"] = {}  # ExtensionWidget: ControlNet and ADetailer listed, no unit enabled
    data.update(changes)
    # cleanup_data
    overrides: dict[str, Any] = data.setdefault("override_settings", {})
    overrides["sd_model_checkpoint"] = data.pop("model")
    overrides["sd_vae"] = data.pop("vae")
    if "color_correction" in data:
        overrides["img2img_color_correction"] = data.pop("color_correction")
    data["sampler_name"] = data.pop("sampler")
    data["steps"] = data.pop("sampling_steps")
    data["override_settings_restore_afterwards"] = False
    for old, new in (("inpaint_img", "init_images"), ("mask_img", "mask")):
        if old in data:
            data[new] = [data.pop(old)] if new == "init_images" else data.pop(old)
    data["n_iter"] = data.pop("batch_count")
    return data


def cyanic_results(answer: httpx.Response) -> dict[str, Any]:
    """SDAPI.txt2img/img2img's reading, then threadable_return's and results_to_layers': ``info`` parsed,
    ``parameters``' batch_size x n_iter images (more would be cut), each layer named by ``info.all_seeds``."""
    assert answer.status_code == 200, answer.text
    results = answer.json()
    if isinstance(results["info"], str):
        results["info"] = json.loads(results["info"])
    expected = results["parameters"]["batch_size"] * results["parameters"]["n_iter"]
    assert len(results["images"]) == expected
    assert len(results["info"]["all_seeds"]) >= expected
    return results


def test_cyanic_connects_and_lists(server: httpx.Client) -> None:
    """SDAPI.init_api: /queue/status answers (else the plugin stays disconnected); the lists it caches read as it
    reads them (sd-models' title and model_name, sd-vae's model_name, samplers' and upscalers' name, embeddings'
    loaded, scripts); options tell it A1111 (none of SD.Next's own keys), its default model the title sd-models
    lists. The routes A1111 has and this server does not (face-restorers, prompt-styles, hypernetworks) answer 404,
    which the plugin keeps as None and checks before use."""
    status = cyanic_get(server, "/queue/status")
    assert status is not None and status["queue_size"] == 0
    models = cyanic_get(server, "/sdapi/v1/sd-models")
    titles, names = [m["title"] for m in models], [m["model_name"] for m in models]
    options = cyanic_get(server, "/sdapi/v1/options")
    sdnext = ["cross_attention_sep", "cuda_compile_sep", "models_paths_sep_options", "outdir_sep_dirs",
              "outdir_sep_grids", "postprocessing_sep_img2img", "postprocessing_sep_upscalers", "sd_lyco"]  # fmt: skip
    assert sum(key in options for key in sdnext) <= len(sdnext) / 2  # host_version 'A1111'
    assert options["sd_model_checkpoint"] in titles and len(names) == len(titles)
    assert all(isinstance(v["model_name"], str) for v in cyanic_get(server, "/sdapi/v1/sd-vae"))
    assert "Euler a" in [s["name"] for s in cyanic_get(server, "/sdapi/v1/samplers")]
    assert all(isinstance(u["name"], str) for u in cyanic_get(server, "/sdapi/v1/upscalers"))
    assert isinstance(cyanic_get(server, "/sdapi/v1/embeddings")["loaded"], dict)
    assert isinstance(cyanic_get(server, "/sdapi/v1/loras"), list)
    assert "controlnet" in cyanic_get(server, "/sdapi/v1/scripts")["txt2img"]


def test_cyanic_txt2img_and_inpaint(server: httpx.Client) -> None:
    """The txt2img page's body (model and VAE as override_settings, sampler_name '' = the server's default,
    override_settings_restore_afterwards false, n_iter) and the inpaint page's (init_images and mask from the layer
    and its mask layer, inpaint_full_res 0, padding 32, img2img_color_correction as an override, which is noted as
    not applied) answer images the plugin places: batch_size x n_iter of them, seeds in info.all_seeds."""
    results = cyanic_results(server.post("/sdapi/v1/txt2img", json=cyanic_body(server, "txt2img", seed=5)))
    assert png(results["images"][0]).size == (64, 64) and results["info"]["all_seeds"][0] == 5
    assert results["info"]["sampler_name"] == "Euler"  # '' runs the server's default, as A1111's does

    layer = picture((64, 64), seed=9)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)
    body = cyanic_body(server, "inpaint", seed=6, inpaint_img=b64(layer), mask_img=b64(mask))
    results = cyanic_results(server.post("/sdapi/v1/img2img", json=body))
    assert png(results["images"][0]).size == (64, 64) and results["info"]["denoising_strength"] == 0.7
    assert any("img2img_color_correction" in n for n in results["info"]["sdxl_control_not_done"])


def test_cyanic_progress_check_and_cancel(server: httpx.Client) -> None:
    """GenerateWidget.progress_check reads state.skipped/interrupted (stopping when either is set), progress x 100
    and current_image (its preview layer); cancel() posts interrupt with ``{}``; the request then answers, and the
    next check sees interrupted and stops."""
    body = cyanic_body(server, "txt2img", sampling_steps=200, seed=2)
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(server.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    deadline = time.monotonic() + 120
    while True:
        results = cyanic_get(server, "/sdapi/v1/progress")
        running = not (results["state"]["skipped"] or results["state"]["interrupted"])
        if running and int(results["progress"] * 100) > 0 and results["current_image"]:  # its bar moved
            break
        assert time.monotonic() < deadline and worker.is_alive(), results
        time.sleep(0.05)
    assert 0 < int(results["progress"] * 100) < 100 and png(results["current_image"]).size == (64, 64)
    assert server.post("/sdapi/v1/interrupt", json={}).status_code == 200
    worker.join(120)
    (answer,) = answers
    assert len(cyanic_results(answer)["images"]) == 1
