"""Models kept in a ComfyUI or A1111 install are found by name (``--models-dir``, ``SDXL_CONTROL_MODELS_DIR``):
installs with each tool's folder layout, and ComfyUI's ``extra_model_paths.yaml``, are built in the tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.pulid import PuLID
from sdxl_control.base.errors import InputError, InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.jobs.resolvers import HubResolver
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.records.recipe import read_recipe
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.weights.model_folders import MODELS_DIR_ENV, ModelFolders

COMFYUI = {
    "checkpoints": "sdxl/juggernautXL_v9.safetensors",
    "loras": "add-detail-xl.safetensors",
    "controlnet": "diffusers_xl_canny_full.safetensors",
    "ipadapter": "ip-adapter_sdxl.safetensors",
    "clip_vision": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
    "upscale_models": "4x-UltraSharp.pth",
    "vae": "sdxl_vae.safetensors",
    "vae_approx": "taesdxl_decoder.safetensors",
    "instantid": "ip-adapter.bin",
    "pulid": "pulid_v1.1.safetensors",
    "photomaker": "photomaker-v2.bin",
}
A1111 = {
    "Stable-diffusion": "ponyDiffusionV6XL.safetensors",
    "Lora": "xl_more_art-full.safetensors",
    "LyCORIS": "style/lyco-thing.safetensors",
    "ControlNet": "ip-adapter-plus_sdxl_vit-h.safetensors",
    "ESRGAN": "4x_NMKD-Siax_200k.pth",
    "VAE": "sdxl-vae-fp16-fix.safetensors",
}


def _install(root: Path, files: dict[str, str], models: str = "models") -> Path:
    for folder, name in files.items():
        path = root / models / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
    return root


@pytest.fixture
def comfyui(tmp_path: Path) -> Path:
    root = _install(tmp_path / "ComfyUI", COMFYUI)
    pack = root / "models" / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "glintr100.onnx").write_bytes(b"onnx")
    return root


@pytest.fixture
def a1111(tmp_path: Path) -> Path:
    root = _install(tmp_path / "stable-diffusion-webui", A1111)
    (root / "extensions" / "sd-webui-controlnet" / "models").mkdir(parents=True)
    (root / "extensions" / "sd-webui-controlnet" / "models" / "control-lora-canny-rank256.safetensors").write_bytes(
        b"w"
    )
    return root


def test_a_comfyui_install_finds_every_kind_by_name(comfyui):
    folders = ModelFolders.of([comfyui], environment=False)
    models = comfyui / "models"
    for kind, name in COMFYUI.items():
        file = (models / kind / name).resolve()
        assert folders.find(kind, name) == file  # the path inside the kind's folder
        assert folders.find(kind, Path(name).name) == file  # its file name, searched in subfolders
        assert folders.find(kind, Path(name).stem) == file  # without the extension, as A1111's tags name them
    assert folders.find("insightface", "antelopev2") == (models / "insightface" / "models" / "antelopev2").resolve()
    assert folders.find("loras", "not-there") is None and folders.find("checkpoints", "add-detail-xl") is None
    assert ModelFolders.of([models], environment=False).find("loras", "add-detail-xl") is not None  # its models folder


def test_an_a1111_install_and_extra_model_paths(a1111, tmp_path, monkeypatch):
    folders = ModelFolders.of([a1111], environment=False)
    models = a1111 / "models"
    assert folders.find("checkpoints", "ponyDiffusionV6XL") == (models / "Stable-diffusion" / A1111["Stable-diffusion"])
    assert folders.find("loras", "xl_more_art-full") and folders.find("loras", "lyco-thing")
    assert folders.find("ipadapter", "ip-adapter-plus_sdxl_vit-h")  # the extension keeps them with the ControlNets
    assert folders.find("controlnet", "control-lora-canny-rank256")  # the extension's own models folder
    assert folders.find("upscale_models", "4x_NMKD-Siax_200k") and folders.find("vae", "sdxl-vae-fp16-fix")
    # ComfyUI's extra_model_paths.yaml pointing at the A1111 install, and at a folder of its own (several per kind).
    comfy = tmp_path / "comfy"
    (tmp_path / "more-loras").mkdir()
    (tmp_path / "more-loras" / "extra-lora.safetensors").write_bytes(b"w")
    comfy.mkdir()
    (comfy / "extra_model_paths.yaml").write_text(
        f"a111:\n    base_path: {a1111}\n    checkpoints: models/Stable-diffusion\n"
        f"    loras: |\n        models/Lora\n        {tmp_path / 'more-loras'}\n    configs: models/Stable-diffusion\n"
    )
    extra = ModelFolders.of([comfy], environment=False)
    assert extra.find("checkpoints", "ponyDiffusionV6XL") and extra.find("loras", "extra-lora")
    assert extra.find("loras", "xl_more_art-full") and extra.find("loras", "lyco-thing") is None  # only what it lists
    monkeypatch.setenv(MODELS_DIR_ENV, str(comfy))
    assert ModelFolders.of().find("loras", "extra-lora")


def test_bad_folders_and_names_are_said(comfyui, a1111, tmp_path):
    with pytest.raises(InputError, match="neither a ComfyUI install .* nor an A1111 one"):
        ModelFolders.of([tmp_path], environment=False)
    with pytest.raises(InputError, match="no such folder"):
        ModelFolders.of([tmp_path / "nowhere"], environment=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "extra_model_paths.yaml").write_text("a: [unclosed")
    with pytest.raises(InputError, match="not readable YAML"):
        ModelFolders.of([tmp_path / "bad"], environment=False)
    both = _install(comfyui, {"loras": "other/add-detail-xl.safetensors"})
    with pytest.raises(InvalidRequestError, match="'add-detail-xl' is ambiguous") as caught:
        ModelFolders.of([both], environment=False).find("loras", "add-detail-xl")
    assert "other/add-detail-xl.safetensors" in str(caught.value) and "loras/add-detail-xl" in str(caught.value)
    folders = ModelFolders.of([both], environment=False)
    assert folders.find("loras", "other/add-detail-xl") is None  # a path inside the folder names the file exactly
    assert folders.find("loras", "other/add-detail-xl.safetensors") is not None


def test_a_job_names_models_by_their_install_names(comfyui, tmp_path, caplog):
    image = tmp_path / "edges.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    resolver = HubResolver(folders=ModelFolders.of([comfyui], environment=False))
    spec = JobSpec(
        "a portrait",
        models={"base": "juggernautXL_v9", "refiner": None},
        settings={"upscaler": "4x-UltraSharp", "hires_scale": 1.5, "decoder": "taesdxl_decoder"},
        conditions=(
            LoRA("add-detail-xl", scale=0.6),
            ControlNet("diffusers_xl_canny_full", image=str(image)),
            IPAdapter("ip-adapter_sdxl.safetensors", images=str(image)),
            PuLID(faces=str(image), weights="pulid_v1.1", face_pack="antelopev2"),
            InstantID(faces=str(image), adapter="ip-adapter", identitynet="diffusers_xl_canny_full"),
        ),
    )
    with caplog.at_level(logging.WARNING):
        job = resolve(spec, resolver)
    assert not caplog.text  # found, not swapped
    models = comfyui.resolve() / "models"
    assert job.base == str(models / "checkpoints" / COMFYUI["checkpoints"])
    lora, control, ip, pulid, instantid = job.request.conditions
    assert lora.source == str(models / "loras" / COMFYUI["loras"]) and lora.scale == 0.6
    assert control.model == str(models / "controlnet" / COMFYUI["controlnet"])
    assert ip.variant == str(models / "ipadapter" / COMFYUI["ipadapter"])
    assert pulid.weights == str(models / "pulid" / COMFYUI["pulid"])
    assert pulid.face_pack == str(models / "insightface" / "models" / "antelopev2")
    assert instantid.adapter == str(models / "instantid" / COMFYUI["instantid"])
    assert instantid.identitynet == control.model
    assert job.request.upscaler == str(models / "upscale_models" / COMFYUI["upscale_models"])
    assert job.request.decoder == str(models / "vae_approx" / COMFYUI["vae_approx"])
    # Hub ids, published names and paths that exist stay as they are.
    plain = resolve(JobSpec("a portrait", conditions=(LoRA(str(image)),)), resolver)
    assert plain.base == "stabilityai/stable-diffusion-xl-base-1.0" and plain.request.conditions[0].source == str(image)


def test_the_command_line_finds_a_lora_by_name_and_lists_the_install(comfyui, tiny, tmp_path, capsys):
    lora = comfyui / "models" / "loras" / "add-detail-xl.safetensors"
    write_tiny_lora(lora, tiny.base, "kohya", seed=3, text=False)
    out = tmp_path / "x.png"
    argv = ["generate", "a fox", "--tiny", "--size", "64x64", "--steps", "2", "-q", "-o", str(out)]
    assert main([*argv, "--models-dir", str(comfyui), "--lora", "add-detail-xl:0.7"]) == 0
    (condition,) = read_recipe(out)["conditions"]
    assert condition["source"]["file"] == "add-detail-xl.safetensors" and condition["scale"] == 0.7
    assert main([*argv, "--lora", "add-detail-xl"]) != 0  # without the install it is no file
    assert "add-detail-xl" in capsys.readouterr().err
    assert main(["models", "--preset", "draft", "--models-dir", str(comfyui)]) in (0, 4)
    listed = capsys.readouterr().out
    assert "loras in the model folders: 1" in listed and str(lora.resolve()) in listed
    assert "insightface in the model folders: 1" in listed
