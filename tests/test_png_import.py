"""PNGs of A1111 (its ``parameters`` text) and ComfyUI (its ``prompt`` graph) restore what maps to a request, and list
every part that does not. The corpus is hand-written from the formats: A1111's infotext (a prompt, ``Negative
prompt:``, one line of ``Key: value`` items with quoted values, ``<lora:name:weight>`` tags) and ComfyUI's API graph
(node id -> class_type and inputs, links as ``[node id, output]``)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time

import pytest
from PIL import Image, PngImagePlugin

from sdxl_control.base.defaults import DEFAULT_BASE, DEFAULT_REFINER
from sdxl_control.base.errors import InputError
from sdxl_control.cli import main
from sdxl_control.jobs.png_import import Imported, read_a1111, read_comfyui, read_image_settings
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.records.infotext import parameters_text
from sdxl_control.records.recipe import RECIPE_KEY, read_recipe
from sdxl_control.testing.lora import write_tiny_lora

HIRES = (
    "masterpiece, (a red fox:1.2) in the snow <lora:add-detail-xl:0.6>, <lora:xl_more_art-full:1:0.5>\n"
    "Negative prompt: blurry, (lowres:1.3)\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 832x1216, "
    "Model hash: 4496b36d48, Model: juggernautXL_v9Rdphoto2Lightning, Denoising strength: 0.4, Hires upscale: 1.5, "
    'Hires steps: 12, Hires upscaler: 4x-UltraSharp, Lora hashes: "add-detail-xl: 9c783c8ce46c, xl_more_art-full: '
    'fe3b4816be83", Version: v1.9.4'
)
REFINER = (
    "a portrait of a woman, BREAK studio light\n"
    "Negative prompt: ugly,\nbad hands\n"
    "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 1024x1024, Model hash: 31e35c80fc, "
    "Model: sd_xl_base_1.0, Denoising strength: 0.55, Clip skip: 2, ENSD: 31337, RNG: CPU, Emphasis: None, "
    "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer denoising strength: 0.4, "
    'ADetailer version: 24.1.2, ControlNet 0: "Module: canny, Model: diffusers_xl_canny_full [2b69fca4], Weight: 0.8, '
    'Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.7", Refiner: sd_xl_refiner_1.0 [7440042bbd], '
    "Refiner switch at: 0.8, Version: v1.7.0"
)


def _unmapped(imported: Imported, start: str) -> str:
    found = [u for u in imported.unmapped if u.startswith(start)]
    assert len(found) == 1, (start, imported.unmapped)
    return found[0]


def test_an_a1111_hires_png_with_loras():
    imported = read_a1111(HIRES)
    assert imported.tool == "A1111"
    assert imported.prompt.startswith("masterpiece, (a red fox:1.2) in the snow") and "<lora" not in imported.prompt
    assert imported.settings == {
        "negative_prompt": "blurry, (lowres:1.3)", "steps": 30, "seed": 1234567, "hires_steps": 12, "guidance": 6.5,
        "size": (832, 1216), "scheduler": "dpmpp_2m_karras", "hires_scale": 1.5, "hires_strength": 0.4,
        "upscaler": "4x-UltraSharp",
    }  # fmt: skip
    assert [(c.source, c.scale) for c in imported.conditions] == [("add-detail-xl", 0.6), ("xl_more_art-full", 1.0)]
    assert imported.models == {"base": "juggernautXL_v9Rdphoto2Lightning"}
    assert "text-encoder weight 0.5 differs" in _unmapped(imported, "<lora:xl_more_art-full:1:0.5>")
    assert _unmapped(imported, "Model hash: 4496b36d48").endswith("not checked")
    assert _unmapped(imported, "Lora hashes: add-detail-xl: 9c783c8ce46c, xl_more_art-full")
    assert _unmapped(imported, "Version: v1.9.4") and _unmapped(imported, "A1111's noise differs")
    assert len(imported.unmapped) == 5  # nothing else was left out


def test_an_a1111_png_with_a_refiner_controlnet_adetailer_and_settings_without_equivalent():
    imported = read_a1111(REFINER)
    assert imported.prompt == "a portrait of a woman, BREAK studio light"
    settings = imported.settings
    assert settings["negative_prompt"] == "ugly,\nbad hands" and settings["scheduler"] == "dpmpp_2m_karras"
    assert settings["refiner_switch"] == 0.8 and settings["emphasis"] == "off" and settings["detailer"] is True
    assert imported.models == {"base": DEFAULT_BASE, "refiner": DEFAULT_REFINER}  # the published files, by hub id
    assert "strength" not in settings and "--init-image" in _unmapped(imported, "Denoising strength: 0.55")
    assert "not applied" in _unmapped(imported, "Clip skip: 2")
    assert _unmapped(imported, "ENSD: 31337").endswith("no equivalent here") and _unmapped(imported, "RNG: CPU")
    assert "defaults are used" in _unmapped(imported, "ADetailer confidence: 0.3, ADetailer denoising strength: 0.4")
    control = _unmapped(imported, "ControlNet 0 (Module: canny, Model: diffusers_xl_canny_full")
    assert "control image is not in the PNG" in control and "--edges" in control


@pytest.mark.parametrize(
    ("sampler", "schedule", "ours"),
    [("Euler a", None, "euler_a_linspace"), ("Euler", "Simple", "euler_trailing"),
     ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"), ("Heun", "Karras", "heun_karras"),
     ("DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras")],
)  # fmt: skip
def test_a1111_samplers_and_schedule_types(sampler, schedule, ours):
    typed = f", Schedule type: {schedule}" if schedule else ""
    imported = read_a1111(f"a fox\nSteps: 20, Sampler: {sampler}{typed}, CFG scale: 5, Seed: 1")
    assert imported.settings["scheduler"] == ours


def test_a1111_texts_that_do_not_map():
    unknown = read_a1111("a fox\nSteps: 20, Sampler: DPM++ 3M SDE, Schedule type: Exponential, CFG scale: 5, Seed: 1")
    assert "scheduler" not in unknown.settings and "next-to-last sigma" in _unmapped(unknown, "Sampler: DPM++ 3M SDE")
    schedule = read_a1111("a fox\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 5, Seed: 1")
    assert "scheduler" not in schedule.settings and "no karras schedule" in _unmapped(schedule, "Sampler: Euler a")
    odd = read_a1111('a fox\nSteps: 20, Size: big, CFG scale: 5, Seed: 1, Note: "unclosed \\x"')
    assert "size" not in odd.settings and "not a size" in _unmapped(odd, "Size: big")
    assert _unmapped(odd, 'Note: "unclosed \\x"')  # kept as written, as A1111 keeps it
    prompt_only = read_a1111("a cat\nsitting on a mat")  # no settings line: all prompt
    assert prompt_only.prompt == "a cat\nsitting on a mat" and prompt_only.settings == {}
    networks = read_a1111("a fox <hypernet:anime:0.5> <lora:bad:x>\nSteps: 20, CFG scale: 5, Seed: 1")
    assert networks.prompt == "a fox" and not networks.conditions
    assert "no equivalent" in _unmapped(networks, "<hypernet:anime:0.5>")
    assert "not a number" in _unmapped(networks, "<lora:bad:x>")


def test_a_quoted_value_with_line_breaks_leaves_the_settings_settings():
    """A value quoted over several lines (an extension's wildcard prompt, written raw) used to put the whole settings
    block in the negative prompt, exit 0: the settings are read, the odd value listed with the others not mapped."""
    text = (
        "a fox in the snow\nNegative prompt: blurry\n"
        'Steps: 24, Sampler: Euler, CFG scale: 6, Seed: 77, Size: 832x1216, Wildcard prompt: "a __animal__\n'
        'in the __place__", Version: v1.10.1'
    )
    imported = read_a1111(text)
    assert imported.prompt == "a fox in the snow" and imported.settings["negative_prompt"] == "blurry"
    assert {k: imported.settings[k] for k in ("steps", "guidance", "seed", "size")} == {
        "steps": 24, "guidance": 6.0, "seed": 77, "size": (832, 1216)
    }  # fmt: skip
    assert _unmapped(imported, "Wildcard prompt:")
    # a prompt line that merely starts with "Steps: " is not taken for settings
    steps_prose = read_a1111("Steps: climbing stairs at dawn\nNegative prompt: ugly")
    assert steps_prose.prompt == "Steps: climbing stairs at dawn" and steps_prose.settings == {
        "negative_prompt": "ugly"
    }


def test_a_negative_a1111_seed_is_the_seed_torch_reads_it_as():
    """Some installs write seeds as signed 64-bit numbers (``Seed: -353763303``): torch's own ``manual_seed`` takes
    them, and the imported seed draws the very same noise (torch is the reference); ``-1`` (draw one) is listed."""
    import torch

    imported = read_a1111("a fox\nSteps: 20, CFG scale: 5, Seed: -353763303, Size: 64x64")
    seed = imported.settings["seed"]
    assert 0 <= seed < 2**64 and "Seed" not in " ".join(imported.unmapped)
    drawn = torch.randn(8, generator=torch.Generator("cpu").manual_seed(-353763303))
    assert torch.equal(torch.randn(8, generator=torch.Generator("cpu").manual_seed(seed)), drawn)
    assert resolve(imported.under(JobSpec())).request.seed == seed  # a request takes it
    random = read_a1111("a fox\nSteps: 20, CFG scale: 5, Seed: -1")
    assert "seed" not in random.settings and "a random seed" in _unmapped(random, "Seed: -1")
    exact = read_a1111(f"a fox\nSteps: 20, CFG scale: 5, Seed: {2**64 - 3}")  # read as an integer, not a float
    assert exact.settings["seed"] == 2**64 - 3
    huge = read_a1111(f"a fox\nSteps: 20, CFG scale: 5, Seed: {-(2**63) - 1}")
    assert "seed" not in huge.settings and "beyond a 64-bit seed" in _unmapped(huge, f"Seed: {-(2**63) - 1}")


def _graph(*extra: tuple[str, str, dict]) -> dict:
    """ComfyUI's default text-to-image graph, plus ``extra`` nodes (id, class_type, inputs)."""
    nodes = {
        "3": ("KSampler", {"seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
                           "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
                           "negative": ["7", 0], "latent_image": ["5", 0]}),
        "4": ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        "5": ("EmptyLatentImage", {"width": 1024, "height": 768, "batch_size": 2}),
        "6": ("CLIPTextEncode", {"text": "a (red:1.2) fox in the snow", "clip": ["4", 1]}),
        "7": ("CLIPTextEncode", {"text": "blurry", "clip": ["4", 1]}),
        "8": ("VAEDecode", {"samples": ["3", 0], "vae": ["4", 2]}),
        "9": ("SaveImage", {"filename_prefix": "ComfyUI", "images": ["8", 0]}),
    }  # fmt: skip
    for node_id, kind, inputs in extra:
        nodes[node_id] = (kind, {**nodes.get(node_id, (kind, {}))[1], **inputs})
    return {k: {"class_type": kind, "inputs": inputs} for k, (kind, inputs) in nodes.items()}


def test_the_comfyui_default_graph_with_loras():
    graph = _graph(
        ("3", "KSampler", {"model": ["11", 0], "sampler_name": "dpmpp_2m", "scheduler": "karras"}),
        ("10", "LoraLoader", {"lora_name": "add-detail-xl.safetensors", "strength_model": 0.7, "strength_clip": 0.7,
                              "model": ["4", 0], "clip": ["4", 1]}),
        ("11", "LoraLoader", {"lora_name": "styles/ink.safetensors", "strength_model": 1.0, "strength_clip": 0.5,
                              "model": ["10", 0], "clip": ["10", 1]}),
        ("6", "CLIPTextEncode", {"clip": ["11", 1]}),
    )  # fmt: skip
    imported = read_comfyui(graph)
    assert imported.tool == "ComfyUI" and imported.prompt == "a (red:1.2) fox in the snow"
    assert imported.settings == {
        "emphasis": "comfyui", "seed": 156680208700286, "steps": 20, "guidance": 8.0, "scheduler": "dpmpp_2m_karras",
        "negative_prompt": "blurry", "size": (1024, 768), "num_images": 2,
    }  # fmt: skip
    assert imported.models == {"base": DEFAULT_BASE}
    assert [(c.source, c.scale) for c in imported.conditions] == [
        ("styles/ink.safetensors", 1.0), ("add-detail-xl.safetensors", 0.7)
    ]  # fmt: skip
    assert "strength_clip 0.5 differs" in _unmapped(imported, "LoraLoader (node 11)")
    assert len(imported.unmapped) == 2  # and the noise note


def test_a_comfyui_base_and_refiner_graph():
    graph = _graph(
        ("3", "KSamplerAdvanced", {"add_noise": "enable", "noise_seed": 7, "steps": 25, "cfg": 7.0,
                                   "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0,
                                   "end_at_step": 20, "return_with_leftover_noise": "enable"}),
        ("6", "CLIPTextEncodeSDXL", {"text_g": "a lighthouse", "text_l": "a lighthouse", "width": 4096,
                                     "height": 4096, "crop_w": 0, "crop_h": 0, "target_width": 4096,
                                     "target_height": 4096, "clip": ["4", 1]}),
        ("12", "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}),
        ("13", "CLIPTextEncodeSDXLRefiner", {"ascore": 6.5, "width": 1024, "height": 1024, "text": "a lighthouse",
                                             "clip": ["12", 1]}),
        ("14", "CLIPTextEncodeSDXLRefiner", {"ascore": 2.0, "width": 1024, "height": 1024, "text": "blurry",
                                             "clip": ["12", 1]}),
        ("15", "KSamplerAdvanced", {"add_noise": "disable", "noise_seed": 7, "steps": 25, "cfg": 7.0,
                                    "sampler_name": "euler", "scheduler": "simple", "start_at_step": 20,
                                    "end_at_step": 10000, "return_with_leftover_noise": "disable",
                                    "model": ["12", 0], "positive": ["13", 0], "negative": ["14", 0],
                                    "latent_image": ["3", 0]}),
        ("8", "VAEDecode", {"samples": ["15", 0], "vae": ["12", 2]}),
    )  # fmt: skip
    imported = read_comfyui(graph)
    assert imported.prompt == "a lighthouse" and imported.settings["seed"] == 7
    assert imported.settings["scheduler"] == "euler_trailing" and imported.settings["refiner_switch"] == 0.8
    assert imported.settings["aesthetic_score"] == 6.5 and imported.settings["negative_aesthetic_score"] == 2.0
    assert imported.models == {"base": DEFAULT_BASE, "refiner": DEFAULT_REFINER}
    assert len(imported.unmapped) == 1


def test_a_comfyui_latent_hires_graph():
    graph = _graph(
        ("10", "LatentUpscaleBy", {"upscale_method": "nearest-exact", "scale_by": 1.5, "samples": ["3", 0]}),
        ("11", "KSampler", {"seed": 1, "steps": 14, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 0.45, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                            "latent_image": ["10", 0]}),
        ("8", "VAEDecode", {"samples": ["11", 0]}),
    )  # fmt: skip
    imported = read_comfyui(graph)
    settings = imported.settings
    assert settings["hires_scale"] == 1.5 and settings["upscaler"] == "latent-nearest-exact"
    assert settings["hires_steps"] == 14 and settings["hires_strength"] == 0.45 and settings["steps"] == 20
    # The hires sampler draws the noise it adds from a seed of its own: said, as the hires pass here uses the first's.
    assert imported.unmapped[0].startswith("KSampler (node 11): its seed 1 differs") and len(imported.unmapped) == 2


def test_comfyui_nodes_that_need_what_a_png_lacks_are_listed():
    graph = _graph(
        ("3", "KSampler", {"model": ["22", 0], "positive": ["21", 0], "negative": ["21", 1], "denoise": 0.6}),
        ("20", "ControlNetLoader", {"control_net_name": "diffusers_xl_canny_full.safetensors"}),
        ("19", "LoadImage", {"image": "edges.png"}),
        ("21", "ControlNetApplyAdvanced", {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0],
                                           "image": ["19", 0], "strength": 0.8, "start_percent": 0.0,
                                           "end_percent": 0.7}),
        ("22", "IPAdapterAdvanced", {"weight": 0.6, "model": ["23", 0], "ipadapter": ["24", 0]}),
        ("23", "TomePatchModel", {"ratio": 0.3, "model": ["4", 0]}),  # (FreeU_V2 is read now: issue 38)
        ("24", "IPAdapterModelLoader", {"ipadapter_file": "ip-adapter_sdxl.safetensors"}),
        ("25", "CLIPSetLastLayer", {"stop_at_clip_layer": -2, "clip": ["4", 1]}),
        ("6", "CLIPTextEncode", {"clip": ["25", 0]}),
    )  # fmt: skip
    imported = read_comfyui(graph)
    assert imported.prompt == "a (red:1.2) fox in the snow" and imported.models == {"base": DEFAULT_BASE}
    assert imported.settings["negative_prompt"] == "blurry"  # through the ControlNet node's negative output
    control = _unmapped(imported, "ControlNetApplyAdvanced (node 21)")  # said once for both prompts
    assert "diffusers_xl_canny_full.safetensors at strength 0.8" in control and "--edges" in control
    assert "--style or --reference" in _unmapped(imported, "IPAdapterAdvanced (node 22)")
    assert "not read here" in _unmapped(imported, "TomePatchModel (node 23)")
    assert "not on the sampler's path" in _unmapped(imported, "IPAdapterModelLoader (node 24)")
    assert imported.settings["clip_skip"] == 2  # CLIPSetLastLayer -2: hidden_states[-2], SDXL's own reading
    assert "--strength 0.6" in _unmapped(imported, "KSampler (node 3)")


def test_bad_comfyui_graphs_are_refused():
    with pytest.raises(InputError, match="no sampler node"):
        read_comfyui({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}}})
    with pytest.raises(InputError, match="maps node ids to nodes"):
        read_comfyui(["not", "a", "graph"])


def _png(path, **texts):
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def test_what_a_png_holds(tmp_path):
    assert isinstance(read_image_settings(_png(tmp_path / "a.png", parameters=HIRES)), Imported)
    assert read_image_settings(_png(tmp_path / "c.png", prompt=json.dumps(_graph()))).tool == "ComfyUI"
    with pytest.raises(InputError, match=r"no ComfyUI 'prompt' or 'workflow' \(it holds Software\)"):
        read_image_settings(_png(tmp_path / "none.png", Software="GIMP"))
    with pytest.raises(InputError, match="w.png: its ComfyUI workflow has no list of nodes"):
        read_image_settings(_png(tmp_path / "w.png", workflow="{}"))
    with pytest.raises(InputError, match="not valid JSON"):
        read_image_settings(_png(tmp_path / "j.png", prompt="{"))
    merged = read_a1111(HIRES).under(JobSpec(settings={"steps": 8}, models={"base": "mine", "refiner": None}))
    assert merged.settings["steps"] == 8 and merged.settings["seed"] == 1234567 and merged.models["base"] == "mine"


def test_the_command_line_and_the_page_restore_an_a1111_png(tiny, tmp_path, caplog):
    install = tmp_path / "ComfyUI"
    (install / "models" / "loras").mkdir(parents=True)
    write_tiny_lora(install / "models" / "loras" / "add-detail-xl.safetensors", tiny.base, "kohya", seed=2, text=False)
    text = HIRES.replace(", <lora:xl_more_art-full:1:0.5>", "").replace("Size: 832x1216", "Size: 64x64")
    text = text.replace("Hires upscale: 1.5", "Hires upscale: 1.25").replace("4x-UltraSharp", "Latent (bicubic)")
    png = _png(tmp_path / "a1111.png", parameters=text)
    out = tmp_path / "out.png"
    argv = ["generate", "--recipe", str(png), "--tiny", "--steps", "2", "--hires-steps", "3", "-q", "-o", str(out)]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--models-dir", str(install)]) == 0
    assert "a1111.png: A1111's settings restored; not used:" in caplog.text and "Model hash: 4496b36d48" in caplog.text
    recipe = read_recipe(out)
    assert recipe["seed"] == 1234567 and recipe["steps"] == 2 and recipe["scheduler"]["requested"] == "dpmpp_2m_karras"
    assert recipe["prompt"].startswith("masterpiece, (a red fox:1.2)") and recipe["guidance"] == 6.5
    assert [(c["kind"], c["scale"]) for c in recipe["conditions"]] == [("lora", 0.6)]
    assert recipe["hires_scale"] == 1.25 and recipe["upscaler"] == "latent-bicubic" and recipe["hires_strength"] == 0.4
    # Our own parameters text reads back into the same settings.
    again = read_a1111(parameters_text(recipe))
    assert {k: again.settings[k] for k in ("seed", "steps", "guidance", "scheduler", "hires_scale", "upscaler")} == {
        "seed": 1234567, "steps": 2, "guidance": 6.5, "scheduler": "dpmpp_2m_karras", "hires_scale": 1.25,
        "upscaler": "latent-bicubic",
    }  # fmt: skip
    assert again.prompt == recipe["prompt"] and [(c.source, c.scale) for c in again.conditions] == [
        ("add-detail-xl", 0.6)
    ]  # fmt: skip
    pytest.importorskip("gradio")
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import UiConfig, _Page
    from sdxl_control.weights.model_folders import ModelFolders

    # The page served with the same install: the LoRA is found, as on the command line.
    page = _Page(UiConfig(resolver=TinyResolver(folders=ModelFolders.of([install], environment=False))))
    values = page.restore(str(png))
    assert values[:4] == [recipe["prompt"], "blurry, (lowres:1.3)", 64, 64] and values[6] == 1234567
    assert values[9] == "dpmpp_2m_karras" and "A1111 settings" in values[10] and "LoRA add-detail-xl" in values[10]
    assert "- hires_scale 1.25: no field on the page" in values[10]  # the form lacks it: named, not dropped
    ours = page.restore(str(out))  # an sdxl-control PNG restores as before
    assert ours[6] == 1234567 and ours[9] == "dpmpp_2m_karras" and ours[10] == "restored from out.png: seed 1234567"


@contextlib.contextmanager
def _no_hang(seconds: int = 20):
    """Turn a hang (a walk that never ends, a reader made quadratic) into a failure, not a stuck suite."""

    def fail(*_):
        raise AssertionError(f"still running after {seconds} s: the reader hangs")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _refused_by_the_command_line(png, capsys) -> str:
    """``generate --recipe png``'s message, checked to be an input-file error (exit 3) that names the file."""
    with _no_hang():
        assert main(["generate", "--recipe", str(png), "--tiny", "-o", str(png.parent / "out.png")]) == 3
    err = capsys.readouterr().err
    assert str(png) in err and "Traceback" not in err and "unexpected" not in err
    return err


@pytest.mark.parametrize(
    "links, cycle",
    [
        # The model chain: two LoRA loaders feeding each other.
        ((("3", "KSampler", {"model": ["10", 0]}), ("10", "LoraLoader", {"lora_name": "a", "model": ["11", 0]}),
          ("11", "LoraLoader", {"lora_name": "b", "model": ["10", 0]})),
         "node 10 (LoraLoader) -> node 11 (LoraLoader) -> node 10 (LoraLoader)"),
        # The prompt's conditioning: a node fed by its own output.
        ((("6", "ConditioningCombine", {"conditioning_1": ["6", 0]}),),
         "node 6 (ConditioningCombine) -> node 6 (ConditioningCombine)"),
        # The clip chain.
        ((("6", "CLIPTextEncode", {"clip": ["25", 0]}), ("25", "CLIPSetLastLayer", {"clip": ["26", 0]}),
          ("26", "CLIPSetLastLayer", {"clip": ["25", 0]})),
         "node 25 (CLIPSetLastLayer) -> node 26 (CLIPSetLastLayer) -> node 25 (CLIPSetLastLayer)"),
        # The latent chain between two samplers: upscales feeding each other.
        ((("3", "KSampler", {"latent_image": ["10", 0]}), ("11", "KSampler", {"latent_image": ["5", 0]}),
          ("10", "LatentUpscaleBy", {"samples": ["12", 0]}), ("12", "LatentUpscaleBy", {"samples": ["10", 0]})),
         "node 10 (LatentUpscaleBy) -> node 12 (LatentUpscaleBy) -> node 10 (LatentUpscaleBy)"),
    ],
    ids=["model", "conditioning", "clip", "latent"],
)  # fmt: skip
def test_a_comfyui_graph_whose_links_form_a_cycle_is_refused_naming_its_nodes(links, cycle, tmp_path, capsys):
    png = _png(tmp_path / "cycle.png", prompt=json.dumps(_graph(*links)))
    with _no_hang(), pytest.raises(InputError, match="links form a cycle") as refused:
        read_image_settings(png)
    assert str(png) in str(refused.value) and cycle in str(refused.value)
    assert cycle in _refused_by_the_command_line(png, capsys)


def test_two_comfyui_samplers_feeding_each_other_are_refused(tmp_path, capsys):
    graph = _graph(
        ("3", "KSampler", {"latent_image": ["11", 0]}),
        ("11", "KSampler", {"seed": 1, "steps": 14, "cfg": 8.0, "model": ["4", 0], "positive": ["6", 0],
                            "negative": ["7", 0], "latent_image": ["3", 0]}),
    )  # fmt: skip
    png = _png(tmp_path / "loop.png", prompt=json.dumps(graph))
    with pytest.raises(InputError, match=r"samplers feed each other.*node 3 \(KSampler\), node 11 \(KSampler\)"):
        read_image_settings(png)
    assert "node 3 (KSampler), node 11 (KSampler)" in _refused_by_the_command_line(png, capsys)


def test_comfyui_values_of_the_wrong_kind_are_refused_not_a_crash(tmp_path):
    for node in (("3", "KSampler", {"steps": "many"}), ("3", "KSampler", {"cfg": [1, 2]})):
        png = _png(tmp_path / "kind.png", prompt=json.dumps(_graph(node)))
        with pytest.raises(InputError, match=r"kind\.png: the ComfyUI prompt graph holds a value of the wrong kind"):
            read_image_settings(png)
    refiner = _graph(("15", "KSamplerAdvanced", {"steps": 0, "start_at_step": 0, "latent_image": ["3", 0]}))
    with pytest.raises(InputError, match=r"node 15 \(KSamplerAdvanced\) has steps 0"):
        read_comfyui(refiner)


@pytest.mark.parametrize("key", ["prompt", RECIPE_KEY])
@pytest.mark.parametrize("depth", [100, 100_000])  # past our bound; past Python's recursion limit in json itself
def test_deeply_nested_json_in_a_png_is_refused_naming_the_file(key, depth, tmp_path, capsys):
    png = _png(tmp_path / "deep.png", **{key: '{"a": ' * depth + "1" + "}" * depth})
    with pytest.raises(InputError, match="nests deeper than 64 levels") as refused:
        read_image_settings(png)
    assert str(png) in str(refused.value)
    assert "nests deeper than 64 levels" in _refused_by_the_command_line(png, capsys)


def test_a_job_line_nested_too_deep_is_a_problem_of_its_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a fox"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["batch", str(jobs), "-o", str(tmp_path / "out"), "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "2" in err and "nests deeper than 64 levels" in err and "unexpected" not in err


def _text_bomb(path, kind: str):
    """A PNG with a ``prompt`` chunk of 50 MiB that compresses to ~50 kB (zTXt or compressed iTXt)."""
    info = PngImagePlugin.PngInfo()
    text = "{" + " " * (50 * 2**20) + "}"
    info.add_itxt("prompt", text, zip=True) if kind == "iTXt" else info.add_text("prompt", text, zip=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert path.stat().st_size < 200_000
    return path


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_a_text_chunk_decompression_bomb_is_refused_naming_the_file(kind, tmp_path, capsys):
    png = _text_bomb(tmp_path / "bomb.png", kind)
    # PIL itself stops unpacking at its bound (the message below depends on it: a change of PIL's is seen here).
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):
        Image.open(png)
    with pytest.raises(InputError, match="refused as a decompression bomb: a compressed text chunk") as refused:
        read_image_settings(png)
    assert str(png) in str(refused.value) and "1 MiB" in str(refused.value)
    assert "decompression bomb" in _refused_by_the_command_line(png, capsys)


def test_a_plain_text_chunk_over_the_bound_is_refused(tmp_path):
    png = _png(tmp_path / "big.png", parameters="a fox " * 200_000 + "\nSteps: 20, Seed: 1, CFG scale: 7")
    with pytest.raises(InputError, match=r"big\.png: its A1111 parameters holds 1,200,\d+ characters, more than"):
        read_image_settings(png)


@pytest.mark.parametrize(
    "text",
    ["a " * 40_000, "<a:b" * 20_000, "<a:b:" * 20_000, "(" * 100_000],
    ids=["a settings line without colons", "unclosed tags", "unclosed tags with weights", "brackets"],
)
def test_a1111_texts_made_to_be_slow_read_in_linear_time(text):
    # Each of these took the old patterns 30 s or more (their time grew with the square of the length).
    started = time.perf_counter()
    with _no_hang(10):
        imported = read_a1111(text)
    assert time.perf_counter() - started < 3
    assert imported.tool == "A1111"


def test_invokeai_schedulers_are_its_diffusers_classes_and_karras_its_option() -> None:
    """InvokeAI runs diffusers' classes on the model's own config, ``_k`` adding ``use_karras_sigmas`` (its
    SCHEDULER_MAP): ours of the same class with that option, not A1111's or ComfyUI's meaning of the name; one with
    no equivalent is listed, the default sampler kept."""
    from sdxl_control.jobs.png_formats import read_invokeai
    from sdxl_control.protocol.schedule import make_scheduler

    config = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "steps_offset": 1}
    for name, ours, cls in (("euler", "euler", "EulerDiscreteScheduler"), ("dpmpp_2m_k", "dpmpp_2m", "DPMSolverMultistepScheduler"),
                            ("kdpm_2_a", "dpm2_a", "KDPM2AncestralDiscreteScheduler")):  # fmt: skip
        found = read_invokeai({"positive_prompt": "a fox", "scheduler": name})
        assert found.settings["scheduler"] == ours, name
        options = found.settings.get("scheduler_options", {})
        assert options == ({"use_karras_sigmas": True} if name.endswith("_k") else {}), name
        scheduler = make_scheduler(config, ours, options)
        assert type(scheduler).__name__ == cls and scheduler.config.timestep_spacing == "leading", name
    listed = read_invokeai({"positive_prompt": "a fox", "scheduler": "dpmpp_3m_k"})
    assert "scheduler" not in listed.settings and any(
        line.startswith("scheduler: dpmpp_3m_k") for line in listed.unmapped
    )


def test_a_graphs_own_timesteps_a_sampler_cannot_take_are_listed_not_kept() -> None:
    """SDXL Turbo's SDTurboScheduler with 4 steps runs timesteps 999, 899, 799, 699; ComfyUI's euler_ancestral runs
    them, diffusers' EulerAncestralDiscreteScheduler takes no timestep list: the import keeps the sampler, lists the
    timesteps with the reason and leaves none in the request (which would be refused before it runs)."""
    from sdxl_control.jobs.png_import import SettingsReader

    reader = SettingsReader("ComfyUI")
    reader.settings.update(steps=4, timesteps=(999, 899, 799, 699))
    reader.scheduler("euler_ancestral", "normal", "SDTurboScheduler (node 3)", tool="ComfyUI custom")
    assert reader.settings["scheduler"].startswith("euler_a") and "timesteps" not in reader.settings
    assert any("takes no timestep list" in line for line in reader.unmapped), reader.unmapped
    kept = SettingsReader("ComfyUI")
    kept.settings.update(steps=4, timesteps=(999, 899, 799, 699))
    kept.scheduler("euler", "normal", "SDTurboScheduler (node 3)", tool="ComfyUI custom")
    assert kept.settings["timesteps"] == (999, 899, 799, 699) and kept.unmapped == []
