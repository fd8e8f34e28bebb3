"""Extensions' fields as clients send them (issue 37, part 2): the ControlNet extension's units, ADetailer's args and
sdxl-control's own ``alwayson_scripts`` entry become the same conditions and settings the command line and job files
build; the real ``webuiapi`` package (0.9.17, mix1009/sdwebuiapi @ ce232f0c4ccc925bff27b783db6c646df7c8dcda) drives
txt2img with its ControlNetUnit and ADetailer objects and /controlnet/detect against a tiny server; what cannot be
done is refused naming the field."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.jobs.resolvers import TinyResolver
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.serve.app import Limits
from sdxl_control.serve.extensions import alwayson_scripts
from tests.serving import running_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def photo(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A picture with edges for canny to find (shapes on a noisy ground)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(90, 140, (size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size[0] // 5, size[1] // 5, size[0] // 2, size[1] // 2], fill=(240, 240, 240))
    draw.ellipse([size[0] // 2, size[1] // 3, size[0] - 4, size[1] - 4], fill=(10, 20, 30))
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def conditions_of(spec: JobSpec) -> tuple[Any, ...]:
    return resolve(spec, TinyResolver()).request.conditions


def same(a: Any, b: Any) -> None:
    """Two conditions with the same values, images compared by their pixels."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image):
            assert [np.asarray(i).tolist() for i in x] == [np.asarray(i).tolist() for i in y], f.name
        elif isinstance(x, Image.Image):
            assert np.array_equal(np.asarray(x), np.asarray(y)), f.name
        else:
            assert x == y, f.name


# -- the same conditions as the command line's and job files' inputs --------------------------------------------------


def test_a_canny_unit_is_the_edges_input() -> None:
    """module canny, weight 0.6 (the extension's thresholds 100/200, its processor_res at the photo's side) is the
    edges input with edges.scale 0.6 and those thresholds."""
    image = photo()
    unit = {"image": b64(image), "module": "canny", "model": "None", "weight": 0.6, "processor_res": 64,
            "guidance_start": 0.1, "guidance_end": 0.8}  # fmt: skip
    scripted = alwayson_scripts({"controlnet": {"args": [unit]}}, Limits(), size=(64, 64))
    ours = conditions_of(JobSpec("a", conditions=scripted.conditions))
    theirs = conditions_of(
        JobSpec(
            "a",
            inputs={"edges": [image]},
            set={"edges.scale": 0.6, "edges.window": (0.1, 0.8), "edges.preprocess_options": {"low": 100, "high": 200}},
        )
    )
    assert len(ours) == len(theirs) == 1
    same(ours[0], theirs[0])
    assert ours[0].infotext().units[0]["Module"] == "canny"  # what our own infotext calls it again


@pytest.mark.parametrize(
    ("unit", "inputs", "options"),
    [
        ({"module": "ip-adapter_clip_sdxl_plus_vith", "model": "ip-adapter-plus_sdxl_vit-h [ab12cd34]",
          "weight": 0.6}, {"reference": "face"}, {}),
        ({"module": "ip-adapter_clip_sdxl", "model": "ip-adapter_sdxl.safetensors", "weight": 0.8},
         {"style": "face"}, {"style.layers": "all"}),
        ({"module": "ip-adapter_face_id_plus", "model": "ip-adapter-faceid-plusv2_sdxl", "weight": 0.7,
          "guidance_end": 0.9}, {"face": "face"}, {"face.kind": "faceid", "face.scale": 0.7, "face.window": (0, 0.9)}),
        ({"module": "ip-adapter_pulid", "model": "ip-adapter_pulid_sdxl_fp16", "weight": 0.9,
          "pulid_mode": "Extremely style"}, {"face": "face"},
         {"face.kind": "pulid", "face.version": "v1", "face.mode": "style", "face.scale": 0.9}),
    ],
)  # fmt: skip
def test_adapter_units_are_the_families_inputs(unit: dict[str, Any], inputs: dict[str, str], options: dict) -> None:
    face = photo(seed=3)
    scripted = alwayson_scripts({"ControlNet": {"args": [{**unit, "image": b64(face)}]}}, Limits())
    ours = conditions_of(JobSpec("a", conditions=scripted.conditions))
    theirs = conditions_of(JobSpec("a", inputs={k: [face] for k in inputs}, set=options))
    assert len(ours) == len(theirs) == 1
    same(ours[0], theirs[0])


def test_instantid_is_its_two_units() -> None:
    face, pose = photo(seed=4), photo(seed=5)
    units = [
        {"module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl", "weight": 0.7,
         "image": b64(face)},
        {"module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl [c5c25a50]", "weight": 0.5,
         "guidance_end": 0.6, "image": b64(pose), "control_mode": "Balanced"},
    ]  # fmt: skip
    scripted = alwayson_scripts({"ControlNet": {"args": units}}, Limits())
    ours = conditions_of(JobSpec("a", conditions=scripted.conditions))
    theirs = conditions_of(JobSpec("a", inputs={"face": [face]}, set={
        "face.kind": "instantid", "face.scale": 0.7, "face.keypoints_from": pose, "face.controlnet_scale": 0.5,
        "face.controlnet_window": (0.0, 0.6)}))  # fmt: skip
    same(ours[0], theirs[0])
    units = {u["Module"] for u in ours[0].infotext().units}
    assert units == {"instant_id_face_embedding", "instant_id_face_keypoints"}


@pytest.mark.parametrize(
    ("arg", "options"),
    [
        ({"family": "pulid", "weight": 0.7, "mode": "style"}, {"face.kind": "pulid", "face.scale": 0.7,
                                                                "face.mode": "style"}),
        ({"family": "photomaker", "start_merge": 0.3}, {"face.kind": "photomaker", "face.start_merge": 0.3}),
        ({"input": "reference", "scale": 0.4, "window": [0.0, 0.5]}, {"reference.scale": 0.4,
                                                                      "reference.window": (0.0, 0.5)}),
        ({"family": "instantid", "keypoints_from": "POSE", "controlnet_scale": 0.5},
         {"face.kind": "instantid", "face.keypoints_from": "POSE", "face.controlnet_scale": 0.5}),
    ],
)  # fmt: skip
def test_the_sdxl_control_entry_fills_the_registrys_inputs(arg: dict[str, Any], options: dict[str, Any]) -> None:
    face, pose = photo(seed=6), photo(seed=7)
    arg = {key: b64(pose) if value == "POSE" else value for key, value in arg.items()}
    options = {key: pose if value == "POSE" else value for key, value in options.items()}
    scripted = alwayson_scripts({"sdxl-control": {"args": [{**arg, "images": [b64(face)]}]}}, Limits())
    slot = next(iter(options)).partition(".")[0]
    prompt = "a photo of a man img" if arg.get("family") == "photomaker" else "a"
    ours = conditions_of(JobSpec(prompt, conditions=scripted.conditions))
    theirs = conditions_of(JobSpec(prompt, inputs={slot: [face]}, set=options))
    same(ours[0], theirs[0])


def test_a_model_is_found_by_its_listed_name(tmp_path: Path) -> None:
    from sdxl_control.serve.catalogue import Catalogue
    from sdxl_control.weights.model_folders import ModelFolders

    (tmp_path / "sub").mkdir()
    file = tmp_path / "sub" / "my_canny.safetensors"
    file.write_bytes(b"not read here")
    catalogue = Catalogue(ModelFolders({"controlnet": (tmp_path,)}))
    unit = {"image": b64(photo()), "module": "canny", "model": "sub/my_canny.safetensors [0123abcd]"}
    scripted = alwayson_scripts({"controlnet": {"args": [unit]}}, Limits(), catalogue=catalogue)
    assert scripted.conditions[0].model == str(file)
    with pytest.raises(InvalidRequestError, match=r"args\[0\]\.model: 'my_other'.* it offers sub/my_canny"):
        alwayson_scripts({"controlnet": {"args": [{**unit, "model": "my_other"}]}}, Limits(), catalogue=catalogue)


def test_modes_read_as_strings_and_old_integers_and_enabled() -> None:
    image = b64(photo())
    unit = {"image": image, "module": "none", "model": "controlnet-depth-sdxl-1.0", "control_mode": 2,
            "resize_mode": 0}  # fmt: skip
    later = {**unit, "control_mode": "ControlNet is more important", "resize_mode": "Just Resize", "enabled": True}
    off = {**unit, "enabled": False}
    scripted = alwayson_scripts({"controlnet": {"args": [unit, later, off]}}, Limits())
    assert len(scripted.conditions) == 2  # a unit without "enabled" runs (as the extension before 1.1.45x); false: not
    assert all(c.guess_mode and c.preprocess is None for c in scripted.conditions)
    assert scripted.conditions[0].model == "diffusers/controlnet-depth-sdxl-1.0"


def test_resize_modes_fit_the_image_to_the_output() -> None:
    image = b64(photo((64, 64)))
    sizes = {}
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill", "Envelope (Outer Fit)"):
        unit = {"image": image, "module": "none", "model": "controlnet-canny-sdxl-1.0", "resize_mode": mode}
        scripted = alwayson_scripts({"controlnet": {"args": [unit]}}, Limits(), size=(128, 64))
        sizes[mode] = scripted.conditions[0].image.size
    assert sizes == {"Just Resize": (64, 64), "Crop and Resize": (64, 32), "Resize and Fill": (128, 64),
                     "Envelope (Outer Fit)": (128, 64)}  # fmt: skip


def test_pixel_perfect_resolution_is_the_extensions() -> None:
    """The extension's pixel_perfect_resolution (sd-webui-controlnet @ 56cec5b internal_controlnet/external_code.py):
    max(target_H/raw_H, target_W/raw_W) * min(raw_H, raw_W) for Crop and Resize."""
    unit = {"image": b64(photo((64, 48))), "module": "canny", "pixel_perfect": True, "resize_mode": "Just Resize"}
    scripted = alwayson_scripts({"controlnet": {"args": [unit]}}, Limits(), size=(96, 96))
    assert min(scripted.conditions[0].image.size) == round(max(96 / 48, 96 / 64) * 48)


# -- ADetailer -------------------------------------------------------------------------------------------------------


def test_adetailer_args_map_to_the_face_detailer() -> None:
    tab = {"ad_model": "face_yolov8s.pt", "ad_denoising_strength": 0.3, "ad_confidence": 0.5, "ad_mask_blur": 6,
           "ad_dilate_erode": 8, "ad_inpaint_only_masked_padding": 40, "ad_use_steps": True, "ad_steps": 12,
           "ad_prompt": "", "ad_mask_k_largest": 0}  # fmt: skip
    scripted = alwayson_scripts({"adetailer": {"args": [True, tab]}}, Limits())
    assert scripted.settings["detailer"] == {"strength": 0.3, "confidence": 0.5, "blur": 6, "dilation": 8,
                                             "padding": 40, "steps": 12}  # fmt: skip
    off = alwayson_scripts({"ADetailer": {"args": [False, tab]}}, Limits())
    assert off.settings == {}
    no_model = alwayson_scripts({"ADetailer": {"args": [True, {"ad_model": "None"}]}}, Limits())
    assert no_model.settings == {}


# -- refused, naming the field ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scripts", "named"),
    [
        ({"controlnet": {"args": [{"image": "IMG", "module": "lineart_realistic"}]}},
         "alwayson_scripts.controlnet.args[0].module"),
        ({"controlnet": {"args": [{"image": "not base64 at all!", "module": "canny"}]}},
         "alwayson_scripts.controlnet.args[0].image"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "none", "model": "/etc/passwd"}]}},
         "alwayson_scripts.ControlNet.args[0].model"),
        ({"ControlNet": {"args": [{"enabled": False}, {"image": "IMG", "module": "canny", "model": "../m/cn.safetensors"}]}},
         "alwayson_scripts.ControlNet.args[1].model"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "none", "model": "controlnet-foo"}]}},
         "alwayson_scripts.ControlNet.args[0].model"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "canny", "control_mode": "My prompt is more important"}]}},
         "alwayson_scripts.ControlNet.args[0].control_mode"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "canny", "control_mode": 7}]}},
         "alwayson_scripts.ControlNet.args[0].control_mode"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "canny", "guidance_start": 0.9, "guidance_end": 0.2}]}},
         "alwayson_scripts.ControlNet.args[0].guidance_start"),
        ({"ControlNet": {"args": [{"image": "", "module": "canny"}]}}, "alwayson_scripts.ControlNet.args[0].image"),
        ({"ControlNet": {"args": [{"image": "IMG", "module": "instant_id_face_embedding"}]}},
         "alwayson_scripts.ControlNet.args[0].module"),
        ({"ADetailer": {"args": [True, True, {"ad_model": "hand_yolov8n.pt"}]}},
         "alwayson_scripts.ADetailer.args[2].ad_model"),
        ({"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt", "ad_prompt": "smiling"}]}},
         "alwayson_scripts.ADetailer.args[1].ad_prompt"),
        ({"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt", "ad_denoising_strenght": 0.2}]}},
         "alwayson_scripts.ADetailer.args[1].ad_denoising_strenght"),
        ({"sdxl-control": {"args": [{"family": "pulid", "images": ["IMG"], "weights": "/tmp/x.bin"}]}},
         "alwayson_scripts.sdxl-control.args[0].weights"),
        ({"sdxl-control": {"args": [{"family": "pulid", "images": ["IMG"], "mode": "loud"}]}},
         "alwayson_scripts.sdxl-control.args[0]"),
        ({"Dynamic Prompts": {"args": [True, "x"]}}, "alwayson_scripts.Dynamic Prompts"),
    ],
)  # fmt: skip
def test_what_cannot_be_done_is_refused_naming_the_field(scripts: dict[str, Any], named: str) -> None:
    image = b64(photo())
    scripts = json.loads(json.dumps(scripts).replace('"IMG"', json.dumps(image)))
    with pytest.raises(InvalidRequestError) as caught:
        alwayson_scripts(scripts, Limits())
    assert str(caught.value).startswith(named), str(caught.value)


def test_what_a1111_passes_over_is_listed_in_the_notes() -> None:
    unit = {"image": b64(photo()), "module": "canny", "hr_option": "Low res only", "foo": 1}
    notes = alwayson_scripts({"controlnet": {"args": [unit]}, "animatediff": {"args": [False]}}, Limits()).notes
    text = "\n".join(notes)
    assert "args[0].hr_option" in text and "args[0]: foo" in text and "alwayson_scripts.animatediff" in text


# -- real clients against a running tiny server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Any:
    with running_server() as (url, _app):
        yield url


def client(url: str) -> Any:
    import webuiapi

    host, _, port = url.removeprefix("http://").partition(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def recipe(image: Image.Image) -> dict[str, Any]:
    return json.loads(image.info["sdxl-control"])


def test_webuiapi_controlnet_units_drive_txt2img(server: str) -> None:
    import webuiapi

    api = client(server)
    unit = webuiapi.ControlNetUnit(image=photo(), module="canny", model="controlnet-canny-sdxl-1.0 [a1b2c3d4]",
                                   weight=0.6, processor_res=64, threshold_a=50, threshold_b=150, guidance_end=0.7,
                                   control_mode=0)  # fmt: skip
    # alwayson_scripts={} given: webuiapi's default dict is shared by every call (the research's stale-default bug).
    result = api.txt2img(prompt="a house", width=64, height=64, seed=4, controlnet_units=[unit], alwayson_scripts={})
    assert result.image.size == (64, 64)
    (condition,) = recipe(result.image)["conditions"]
    assert condition["kind"] == "controlnet" and condition["scale"] == 0.6 and condition["preprocess"] == "canny"
    assert condition["preprocess_options"] == {"low": 50, "high": 150}
    assert 'ControlNet 0: "Module: canny' in result.info["infotexts"][0]
    assert any(".save_detected_map" in note for note in result.info["sdxl_control_not_done"])


@pytest.mark.parametrize(
    ("units", "kinds"),
    [
        ([{"module": "ip-adapter_clip_sdxl_plus_vith", "model": "ip-adapter-plus_sdxl_vit-h", "weight": 0.5}],
         ["ip-adapter"]),
        ([{"module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl"},
          {"module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl", "weight": 0.6}], ["instantid"]),
    ],
)  # fmt: skip
def test_webuiapi_adapter_units_run(server: str, units: list[dict[str, Any]], kinds: list[str]) -> None:
    import webuiapi

    made = [webuiapi.ControlNetUnit(image=photo(seed=i), **unit) for i, unit in enumerate(units)]
    result = client(server).txt2img(prompt="a person", width=64, height=64, seed=3, controlnet_units=made,
                                    alwayson_scripts={})  # fmt: skip
    assert [c["kind"] for c in recipe(result.image)["conditions"]] == kinds


def test_webuiapi_adetailer_drives_txt2img(server: str) -> None:
    import webuiapi

    api = client(server)
    # webuiapi still sends ad_mask_k_largest (ADetailer 25.3.0 renamed it ad_mask_k); it is read.
    detailer = webuiapi.ADetailer(ad_model="face_yolov8n.pt", ad_denoising_strength=0.35, ad_mask_blur=5)
    result = api.txt2img(
        prompt="a face", width=64, height=64, seed=2, steps=3, adetailer=[detailer], alwayson_scripts={}
    )
    recorded = recipe(result.image)["detailer"]
    assert recorded["strength"] == 0.35 and recorded["blur"] == 5


def test_sillytavern_adetailer_body(server: str) -> None:
    """The body SillyTavern's generateAutoImage posts with its ADetailer face option on
    (SillyTavern/SillyTavern @ 1ac6780e9c7f8a24a91ddbd8efd0f638e480cbd3,
    public/scripts/extensions/stable-diffusion/index.js lines 2930-2974: two leading booleans, ad_enable and
    skip_img2img, then {ad_model: 'face_yolov8n.pt'}), with the transport fields its server adds."""
    body = {
        "url": server, "auth": "", "prompt": "a knight", "negative_prompt": "", "sampler_name": "Euler a",
        "scheduler": "Automatic", "steps": 3, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False,
        "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "seed": 9, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
        "alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}},
    }  # fmt: skip
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert json.loads(image.info["sdxl-control"])["detailer"]["strength"] == 0.4  # ADetailer's default


@pytest.mark.parametrize("module", ["canny", "depth_midas", "openpose_full", "instant_id_face_keypoints"])
def test_webuiapi_controlnet_detect_runs_our_preprocessors(server: str, module: str) -> None:
    from sdxl_control.preprocessors import preprocess

    image = photo((64, 64), seed=8)
    result = client(server).controlnet_detect(images=[image], module=module, processor_res=64, threshold_a=60,
                                              threshold_b=120)  # fmt: skip
    from sdxl_control.preprocessors.face import IDENTITY_PACK

    name, options = {
        "canny": ("canny", {"low": 60, "high": 120}),
        "depth_midas": ("depth", TinyResolver().preprocess_options("depth")),
        "openpose_full": ("pose", TinyResolver().preprocess_options("pose", {"hands": True, "face": True})),
        "instant_id_face_keypoints": ("face", {"pack": TinyResolver().face_pack(IDENTITY_PACK)}),
    }[module]
    expected = preprocess(name, image, **options)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert result.json["info"] == "Success"


def test_controlnet_routes_answer_as_the_extension(server: str) -> None:
    api = client(server)
    assert api.controlnet_version() == 3
    models = api.controlnet_model_list()
    assert "controlnet-canny-sdxl-1.0" in models and "ip-adapter-faceid-plusv2_sdxl" in models
    listed = httpx.get(f"{server}/controlnet/module_list", params={"alias_names": True}, timeout=10).json()
    assert "canny" in listed["module_list"] and "lineart_realistic" not in listed["module_list"]
    assert listed["module_detail"]["canny"]["sliders"][1]["name"] == "Canny Low Threshold"
    refused = httpx.post(f"{server}/controlnet/detect", json={"controlnet_module": "canny"}, timeout=10)
    assert refused.status_code == 422 and "controlnet_input_images" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("unit", "named"),
    [
        ({"module": "softedge_hed"}, "alwayson_scripts.ControlNet.args[0].module"),
        ({"module": "canny", "image": "%%%notbase64"}, "alwayson_scripts.ControlNet.args[0].image"),
        ({"module": "none", "model": "C:\\models\\cn.safetensors"}, "alwayson_scripts.ControlNet.args[0].model"),
    ],
)  # fmt: skip
def test_the_server_answers_422_naming_the_field(server: str, unit: dict[str, Any], named: str) -> None:
    body = {"prompt": "a", "steps": 2, "width": 64, "height": 64,
            "alwayson_scripts": {"ControlNet": {"args": [{"image": b64(photo()), **unit}]}}}  # fmt: skip
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=60)
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith(named)


@pytest.mark.parametrize(
    ("arg", "prompt"),
    [({"family": "pulid", "weight": 0.7}, "a woman"), ({"family": "photomaker"}, "a photo of a woman img")],
)
def test_the_sdxl_control_entry_runs_pulid_and_photomaker(server: str, arg: dict[str, Any], prompt: str) -> None:
    entry = {"sdxl-control": {"args": [{**arg, "images": [b64(photo(seed=11))]}]}}
    body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 1, "alwayson_scripts": entry}
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    (condition,) = recipe(image)["conditions"]
    assert condition["kind"] == arg["family"]
