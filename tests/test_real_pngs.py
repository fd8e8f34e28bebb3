"""PNGs made by other tools on real installs, not written here (tests/data/real_pngs, with PROVENANCE.md): each is
restored, listed or refused as expected, nothing is lost without a word (checked from each file's own metadata), and
the prompt, seed, steps, guidance and size agree with what a third-party reader (sd-parsers 0.6) reads."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from sdxl_control.base.defaults import DEFAULT_BASE, DEFAULT_REFINER
from sdxl_control.base.errors import InputError
from sdxl_control.base.samplers import A1111_SCHEDULES, COMFYUI_SCHEDULES
from sdxl_control.cli import main
from sdxl_control.jobs.png_formats import read_swarmui
from sdxl_control.jobs.png_import import (
    A1111_UPSCALERS,
    PUBLISHED_CHECKPOINTS,
    Imported,
    read_a1111,
    read_comfyui,
    read_image_settings,
)
from sdxl_control.protocol.schedule import scheduler_name

CORPUS = Path(__file__).parent / "data" / "real_pngs"
# A schedule as A1111 or ComfyUI names it -> the suffix it gives our scheduler name ("Karras" -> "_karras").
SCHEDULE_SUFFIXES = {name: "_" + ours for name, ours in {**A1111_SCHEDULES, **COMFYUI_SCHEDULES}.items()}
FILES = sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".png", ".json"))
# The files refused, and the words that name why.
REFUSED = {
    "invokeai_dream1.png": "InvokeAI 2's 'sd-metadata' and 'Dream' texts are not read",
    "novelai1_cropped.png": "NovelAI's 'Comment' is not read",
    "comfyui_examples_edit_models_sdxl_edit_model.chunks.json": "DualCFGGuider",  # its prompt is not restored
}


def _texts(name: str) -> dict[str, str]:
    if name.endswith(".chunks.json"):
        return json.loads((CORPUS / name).read_text(encoding="utf-8"))
    with Image.open(CORPUS / name) as image:
        image.load()
        return {k: v for k, v in image.info.items() if isinstance(v, str)}


def _png(path: Path, texts: dict[str, str]) -> Path:
    """A PNG holding ``texts`` as its text chunks (for the files kept as their chunks alone)."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _read(name: str, tmp_path: Path) -> Imported:
    path = CORPUS / name if name.endswith(".png") else _png(tmp_path / (name + ".png"), _texts(name))
    found = read_image_settings(path)
    assert isinstance(found, Imported)
    return found


class _Restored:
    """Every value an import restored, to find a file's values in: strings (the prompts, names) and numbers."""

    def __init__(self, imported: Imported) -> None:
        self.strings: list[str] = [imported.prompt, *(str(v) for v in imported.models.values() if v)]
        self.named = list(imported.unmapped)  # a value named in the list of what did not map
        settings = imported.settings
        # Values restored in another form: the hires fix's size (a scale of the size), the refiner's switch step.
        self.numbers: set[float] = {
            v * settings["hires_scale"] for v in settings.get("size", ()) if "hires_scale" in settings
        }
        if "clip_skip" in settings:  # ComfyUI's CLIPSetLastLayer(n) is clip_skip -n
            self.numbers.add(-float(settings["clip_skip"]))
        if "refiner_switch" in settings:
            self.numbers.add(settings["refiner_switch"] * settings.get("steps", 0))
        self.size = settings.get("size")
        self.scheduler = settings.get("scheduler")
        for name, hub in PUBLISHED_CHECKPOINTS.items():  # a published checkpoint restores as its hub id
            if hub in imported.models.values():
                self.strings.append(name)
        # A LoRA's name and scale; a region's prompt and strength (issue 38), with its box in the image's pixels.
        width, height = settings.get("size") or (1024, 1024)
        held = [(getattr(c, "source", None) or getattr(c, "prompt", None), c.scale) for c in imported.conditions]
        for box in (getattr(c, "box", None) for c in imported.conditions):
            if box is not None:
                x0, y0, x1, y1 = box
                held.append(
                    (round(x0 * width), round(y0 * height), round((x1 - x0) * width), round((y1 - y0) * height))
                )
        for value in (*imported.settings.values(), *held):
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, bool):
                    continue
                if isinstance(part, (int, float)):
                    self.numbers.add(float(part))
                self.strings.append(str(part))

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, (int, float)):
            return float(value) in self.numbers
        if isinstance(value, (list, tuple)):
            return all(self.holds(v) for v in value)
        if isinstance(value, dict):  # a model by name (InvokeAI): its kind and hash are not settings
            skipped = ("base_model", "model_type", "key", "hash", "base", "type")
            return all(self.holds(v) for k, v in value.items() if k not in skipped)
        text = str(value).strip()
        if text.startswith("("):  # Fooocus writes tuples as their Python text
            try:
                return self.holds(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                pass
        if (size := re.fullmatch(r"(\d+)x(\d+)", text)) is not None:  # A1111's WIDTHxHEIGHT
            return self.holds((int(size[1]), int(size[2])))
        if (ratio := re.fullmatch(r"(\d+):(\d+)", text)) is not None and self.size:  # SwarmUI's aspect ratio
            return self.size[0] * int(ratio[2]) == self.size[1] * int(ratio[1])
        if text.casefold() == "automatic":  # A1111's sampler's own schedule: read into the scheduler name with it
            return any(s in self.strings for s in [self.scheduler] if s)
        if (ours := A1111_UPSCALERS.get(text.casefold())) is not None:  # "Latent (nearest-exact)"
            text = ours
        text = text[len("model-") :] if text.startswith("model-") else text  # SwarmUI's "model-NAME" upscaler
        stem = Path(text).stem if Path(text).suffix in (".safetensors", ".ckpt") else text
        # A sampler as its tool names it ("UniPC", "euler_ancestral") is found as ours ("unipc", "euler_a").
        forms = {text.casefold(), stem.casefold(), scheduler_name(text).casefold()}
        forms |= {suffix for suffix in [SCHEDULE_SUFFIXES.get(text.casefold())] if suffix}  # "karras" -> "_karras"
        if any(form in s.casefold() for s in self.strings if s for form in forms):
            return True
        return len(text) >= 3 and any(text in line for line in self.named)


def _named(imported: Imported, words: str) -> bool:
    return any(line.startswith(words) for line in imported.unmapped)


# A node input that carries no setting: how the editor ran it, what the output was called, a default that means
# "nothing here" (full denoise, one image, the normal schedule, a first sampler from step 0 to its end).
NEUTRAL = {
    "Random seed after every gen": None, "filename_prefix": None, "return_with_leftover_noise": None,
    "add_noise": None, "upload": None, "choose file to upload": None, "config_name": None,
    "denoise": 1.0, "batch_size": 1, "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000,
    "crop": "disabled", "upscale_method": None,
}  # fmt: skip
_OUTPUTS = {"VAEDecode", "SaveImage", "PreviewImage", "VAEDecodeTiled"}


def _silently_lost_from_graph(graph: dict[str, Any], imported: Imported) -> list[str]:
    """Each value of each node that the import neither restored nor named (node by node, from the graph itself)."""
    restored, lost = _Restored(imported), []
    for node_id, node in graph.items():
        kind = node["class_type"]
        if kind in _OUTPUTS or any(f"(node {node_id})" in line for line in imported.unmapped):
            continue
        for key, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                continue  # a link
            if key in NEUTRAL and NEUTRAL[key] in (None, value):
                continue
            if key == "noise_seed" and node["inputs"].get("add_noise") == "disable":
                continue  # a sampler that adds no noise draws nothing with its seed
            if not restored.holds(value):
                lost.append(f"{kind} (node {node_id}) {key}={value!r}")
    return lost


# A key of a tool's JSON whose value says "nothing here": no refiner, the model's own VAE, text-to-image, no rescale.
NEUTRAL_JSON = {"refiner_model": "None", "vae": "Default (model)", "generation_mode": "sdxl_txt2img",
                "cfg_rescale_multiplier": 0.0, "denoise": None, "clip_skip": 1, "start_step": 0,
                "refinermethod": "PostApply"}  # fmt: skip


def _silently_lost_from_json(data: dict[str, Any], imported: Imported) -> list[str]:
    """Each key of a tool's JSON that the import neither restored (its value found) nor named."""
    restored = _Restored(imported)
    return [
        f"{k}={v!r}" for k, v in data.items()
        if NEUTRAL_JSON.get(k, ...) != v and not any(f"{k}: " in u for u in imported.unmapped) and not restored.holds(v)
    ]  # fmt: skip


@pytest.mark.parametrize("name", FILES)
def test_each_real_png_is_restored_listed_or_refused_and_nothing_is_lost_silently(name, tmp_path):
    texts = _texts(name)
    if name in REFUSED:
        path = CORPUS / name if name.endswith(".png") else _png(tmp_path / (name + ".png"), texts)
        try:
            imported = read_image_settings(path)
        except InputError as exc:
            assert REFUSED[name] in str(exc) and str(path) in str(exc)
            return
        assert isinstance(imported, Imported) and not imported.prompt and _named(imported, REFUSED[name])
        return
    imported = _read(name, tmp_path)
    assert imported.unmapped[-1].endswith("the same seed makes another image")  # said for every tool
    # In the order the reader takes them: parameters (A1111's text, or a tool's JSON), InvokeAI's, ComfyUI's graph.
    if "parameters" in texts and texts["parameters"].lstrip().startswith("{"):
        data = json.loads(texts["parameters"])
        if "sui_image_params" in data:  # SwarmUI: its parameters, and the records beside them
            data = {**data.pop("sui_image_params"), **data}
        lost = _silently_lost_from_json(data, imported)
    elif "parameters" in texts:  # A1111: every item of its settings line, as A1111's own reader splits it
        lost = [f"{k}: {v}" for k, v in _a1111_items(texts["parameters"])
                if not any(f"{k}: {v}" in u for u in imported.unmapped) and not _Restored(imported).holds(v)]  # fmt: skip
    elif "invokeai_metadata" in texts:
        lost = _silently_lost_from_json(json.loads(texts["invokeai_metadata"]), imported)
    else:  # ComfyUI: every node's values, from the graph it ran
        lost = _silently_lost_from_graph(json.loads(texts["prompt"]), imported)
    assert lost == [], f"{name}: values neither restored nor listed: {lost}"


def _a1111_items(text: str) -> list[tuple[str, str]]:
    """The settings line's items as A1111's parse_generation_parameters finds them (its re_param, from
    modules/infotext_utils.py at lllyasviel/stable-diffusion-webui-forge dfdcbab6, A1111 1.10's)."""
    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    return [(k, v[1:-1] if v.startswith('"') else v) for k, v in re_param.findall(text.strip().split("\n")[-1])]


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in FILES
        if {"workflow", "prompt"} <= _texts(n).keys() and "parameters" not in _texts(n) and n not in REFUSED
    ],
)
def test_a_comfyui_workflow_alone_reads_as_the_graph_it_ran(name, tmp_path):
    """The editor's workflow (widgets_values and links) read without the prompt graph restores the same request and
    lists the same parts as the graph ComfyUI ran, on every real file that kept both."""
    texts = _texts(name)
    from_graph = read_comfyui(json.loads(texts["prompt"]))
    alone = read_image_settings(_png(tmp_path / "w.png", {"workflow": texts["workflow"]}))
    assert isinstance(alone, Imported)
    assert (alone.prompt, dict(alone.settings), alone.conditions, dict(alone.models)) == (
        from_graph.prompt, dict(from_graph.settings), from_graph.conditions, dict(from_graph.models)
    )  # fmt: skip
    assert sorted(alone.unmapped) == sorted(from_graph.unmapped)


def _sd_parsers(path: Path) -> Any:
    sd_parsers = pytest.importorskip("sd_parsers")
    return sd_parsers.ParserManager().parse(path)


@pytest.mark.parametrize(
    "name",
    ["automatic1111_cropped.png", "fooocus1_cropped.png", "invokeai_imeta1.png", "img2img_cropped.png",
     "night_evening_day_morning_cropped.png", "unclip_2pass_cropped.png"],
)  # fmt: skip
def test_the_first_sampler_agrees_with_a_third_party_reader(name, tmp_path):
    """sd-parsers 0.6 (d3x-at/sd-parsers) reads the same files: its first sampler's seed, steps and CFG, its first
    prompt and negative prompt, are ours (Fooocus: its plain prompt is a part of the full prompt restored)."""
    theirs = _sd_parsers(CORPUS / name)
    ours = _read(name, tmp_path)
    sampler = theirs.samplers[0]
    parameters = sampler.parameters
    assert ours.settings["seed"] == int(parameters.get("seed", parameters.get("noise_seed")))
    assert ours.settings["steps"] == int(parameters["steps"])
    assert ours.settings["guidance"] == float(parameters["cfg_scale"])
    assert any(p.value.strip() in ours.prompt for p in theirs.prompts)
    if theirs.negative_prompts:
        assert theirs.negative_prompts[0].value.strip() in ours.settings["negative_prompt"]
    if sampler.model is not None and sampler.model.name:
        assert Path(sampler.model.name).stem in str(ours.models.get("base"))


def test_hand_checked_values_of_key_files(tmp_path):
    """Values read off the files by hand (their JSON and ComfyUI's node code at a125cd84)."""
    simple = _read("comfyui_examples_sdxl_sdxl_simple_example.chunks.json", tmp_path)
    assert simple.models == {"base": DEFAULT_BASE, "refiner": DEFAULT_REFINER}
    assert simple.settings["refiner_switch"] == 20 / 25 and simple.settings["steps"] == 25  # end_at_step 20 of 25
    assert "refiner_prompt" not in simple.settings  # the same texts feed both (one PrimitiveNode each)

    refiner = _read("comfyui_examples_sdxl_sdxl_refiner_prompt_example.chunks.json", tmp_path)
    assert refiner.prompt == "daytime sky nature dark blue galaxy bottle"
    assert refiner.settings["refiner_prompt"] == "daytime scenery  sky nature dark blue bottle with a galaxy stars milky way in it"  # fmt: skip  # noqa: E501

    turbo = _read("comfyui_examples_sdturbo_sdxlturbo_example.chunks.json", tmp_path)  # SamplerCustom, SDTurboScheduler
    assert (turbo.settings["steps"], turbo.settings["guidance"], turbo.settings["seed"]) == (1, 1.0, 0)
    assert turbo.settings["size"] == (512, 512) and turbo.models["base"] == "sd_xl_turbo_1.0_fp16.safetensors"

    zeroed = _read("comfyui_examples_sdxl_sdxl_revision_zero_positive.chunks.json", tmp_path)
    assert zeroed.prompt == "" and "negative_prompt" not in zeroed.settings
    assert "zeroed on purpose" in next(u for u in zeroed.unmapped if u.startswith("ConditioningZeroOut (node 42)"))

    merged = _read("comfyui_examples_model_merging_model_merging_lora.chunks.json", tmp_path)
    line = next(u for u in merged.unmapped if u.startswith("ModelMergeSimple (node 17)"))
    assert "v1-5-pruned-emaonly.ckpt and cardosAnime_v10.safetensors" in line and "--base" in line
    assert "base" not in merged.models  # not one of the two, silently

    # The hires sampler's latent is upscaled from another chain: no hires scale of 1920 / 256 = 7.5.
    noisy = _read("noisy_latents_3_subjects_cropped.png", tmp_path)
    assert "hires_scale" not in noisy.settings
    assert any("upscaled from another chain" in u for u in noisy.unmapped)
    uneven = _read("night_evening_day_morning_cropped.png", tmp_path)  # 704x1280 -> 1088x1920: no single scale
    assert "hires_scale" not in uneven.settings and any("not one scale" in u for u in uneven.unmapped)
    latent = _read("comfyui_examples_2_pass_txt2img_hiresfix_latent_workflow.chunks.json", tmp_path)
    assert latent.settings["hires_scale"] == 1152 / 768 and latent.settings["hires_strength"] == 0.5
    assert any(u.startswith("KSampler (node 11): its sampler_name dpmpp_2m differs") for u in latent.unmapped)
    # Decoded, enlarged by RealESRGAN, resized to 1536x1536, encoded again, redrawn at denoise 0.5 in 14 steps.
    esrgan = _read("comfyui_examples_2_pass_txt2img_hiresfix_esrgan_workflow.chunks.json", tmp_path)
    assert {k: esrgan.settings[k] for k in ("hires_scale", "upscaler", "hires_steps", "hires_strength")} == {
        "hires_scale": 2.0, "upscaler": "RealESRGAN_x4plus.pth", "hires_steps": 14, "hires_strength": 0.5
    }  # fmt: skip

    fooocus = _read("fooocus1_cropped.png", tmp_path)
    assert fooocus.settings["size"] == (768, 1280) and fooocus.settings["seed"] == 6952411511246973023
    assert fooocus.prompt.startswith("cinematic still a smiling goldfish") and " BREAK a smiling goldfish, deep" in fooocus.prompt  # fmt: skip  # noqa: E501
    invoke = _read("invokeai_imeta1.png", tmp_path)
    assert invoke.settings["size"] == (1024, 1024) and invoke.settings["scheduler"] == "euler"
    assert any(u.startswith("ipAdapters:") and "--style or --reference" in u for u in invoke.unmapped)


def test_swarmui_parameters_are_read_by_their_key_names():
    """SwarmUI's keys (sui_image_params: prompt, negativeprompt, cfgscale, ...), as SwarmUI writes them (no
    licensed real file was found, see PROVENANCE.md)."""
    imported = read_swarmui(
        {"sui_image_params": {"prompt": "a fox", "negativeprompt": "blur", "model": "OfficialStableDiffusion/sd_xl_base_1.0", "seed": 7,
                              "steps": 28, "cfgscale": 6.0, "aspectratio": "8:5", "width": 1216, "height": 768,
                              "sampler": "euler", "scheduler": "karras", "loras": ["detail"], "loraweights": ["0.6"],
                              "refinercontrolpercentage": 0.2, "swarm_version": "0.9.3.1"},
         "sui_models": [{"name": "sd_xl_base_1.0.safetensors", "param": "model", "hash": "0x1"}]}
    )  # fmt: skip
    assert imported.tool == "SwarmUI" and imported.prompt == "a fox" and imported.models == {"base": DEFAULT_BASE}
    assert imported.settings == {"negative_prompt": "blur", "seed": 7, "steps": 28, "guidance": 6.0,
                                 "size": (1216, 768), "scheduler": "euler"} | {"scheduler": imported.settings["scheduler"]}  # fmt: skip  # noqa: E501
    assert [(c.source, c.scale) for c in imported.conditions] == [("detail", 0.6)]
    assert _named(imported, "refinercontrolpercentage: 0.2") and _named(imported, "sui_models:")


def test_an_unquoted_json_value_keeps_its_commas_and_nothing_after_it_is_lost():
    """An extension's JSON written unquoted: A1111 cuts it at its first comma; here it is one value, listed whole, and
    the items after it are read."""
    text = (
        "a fox\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 1024x1024, "
        'Civitai resources: [{"type":"lora","weight":0.8,"name":"<lora:detail:0.8>"}], Model: mine, Version: v1.10.1'
    )
    imported = read_a1111(text)
    assert imported.models == {"base": "mine"}  # read after the JSON, not lost in it
    assert _named(imported, 'Civitai resources: [{"type":"lora","weight":0.8,"name":"<lora:detail:0.8>"}]')
    # A fragment that is no item (A1111 skips it) is named too.
    stray = read_a1111("a fox\nSteps: 20, Sampler: Euler, CFG scale: 5, Wildcards: a, b <lora:x:1>, Seed: 3")
    assert _named(stray, "b <lora:x:1>") and stray.settings["seed"] == 3


def test_lora_names_from_a_png_are_looked_for_alike_in_a_dry_run(tmp_path, caplog):
    """A name with a dot, without one, or that reads like a hub id ("styles/detail"): each is a file of the install
    that made the PNG, refused alike when this machine lacks it, --dry-run included."""
    for name in ("detail.v2", "detail", "styles/detail"):
        png = _png(tmp_path / "a.png", {"parameters": f"a fox <lora:{name}:0.6>\nSteps: 4, CFG scale: 5, Seed: 1"})
        with caplog.at_level(logging.WARNING):
            assert main(["generate", "--recipe", str(png), "--dry-run", "--tiny"]) == 4, name


def test_a_refiner_prompt_reaches_the_refiners_encoding_and_is_recorded(generator):
    """The refiner's own prompt (a ComfyUI graph's refiner CLIPTextEncode): the refiner steps read it, the base's
    do not, and the recipe records it and re-makes the same pixels; given as the prompt itself it changes nothing."""
    import torch

    from sdxl_control.passes.request import GenerationRequest

    args = dict(steps=4, size=(64, 64), seed=5, refiner_switch=0.5, progress_bar=False)
    plain = generator.generate("a cat", **args)
    own = generator.generate("a cat", refiner_prompt="a dog on a beach", refiner_negative_prompt="blur", **args)
    same = generator.generate("a cat", refiner_prompt="a cat", **args)
    assert torch.equal(same.latents, plain.latents) and not torch.equal(own.latents, plain.latents)
    base_only = dict(args, refiner_switch=None)  # without a refiner the field has nothing to change
    assert torch.equal(
        generator.generate("a cat", **base_only).latents,
        generator.generate("a cat", refiner_prompt="a dog", **base_only).latents,
    )
    recipe = own.recipes[0]
    assert recipe["refiner_prompt"] == "a dog on a beach" and recipe["refiner_negative_prompt"] == "blur"
    assert "refiner_prompt" not in plain.recipes[0]  # recorded only when given: older recipes read as before
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert torch.equal(again.latents, own.latents)


@pytest.mark.parametrize(
    "name",
    ["automatic1111_cropped.png", "invokeai_imeta1.png", "img2img_cropped.png", "sd_metadata_sd-webui.chunks.json",
     "sd_metadata_forge-neo-hires.chunks.json", "sd_metadata_invokeai.chunks.json", "sd_metadata_swarmui.chunks.json",
     "sd_metadata_comfyui.chunks.json"],
)  # fmt: skip
def test_prompt_seed_steps_cfg_and_size_agree_with_sd_prompt_reader(name, tmp_path):
    """sd-prompt-reader 1.3.4 (receyuki/stable-diffusion-prompt-reader), a second third-party reading: prompt,
    negative prompt, seed, steps, CFG and (where it reads it from the metadata, not the 1x1 pixels) the size."""
    reader = pytest.importorskip("sd_prompt_reader.image_data_reader")
    path = CORPUS / name if name.endswith(".png") else _png(tmp_path / "x.png", _texts(name))
    theirs = reader.ImageDataReader(str(path))
    ours = _read(name, tmp_path)
    # Line by line without the spaces at their ends, as A1111's parse_generation_parameters strips each line (which
    # sd-prompt-reader does not).
    assert _lines(ours.prompt) == _lines(theirs.positive)
    assert _lines(ours.settings["negative_prompt"]) == _lines(theirs.negative)
    parameters = theirs.parameter
    assert (ours.settings["seed"], ours.settings["steps"]) == (int(parameters["seed"]), int(parameters["steps"]))
    assert ours.settings["guidance"] == float(parameters["cfg"])
    if parameters["size"] not in ("1x1", "8x8"):  # the pixels' size, where it reads no size from the metadata
        assert "x".join(map(str, ours.settings["size"])) == parameters["size"]


def test_a_workflow_runs_as_comfyui_runs_it_bypassed_and_muted_nodes(tmp_path):
    """The real lora_multiple workflow with its second LoRA loader bypassed (mode 4: its model and clip pass
    through, as ComfyUI runs it) reads as the graph without that LoRA; muted (mode 2), the chain it cuts is gone."""
    texts = _texts("comfyui_examples_lora_lora_multiple.chunks.json")
    workflow = json.loads(texts["workflow"])
    loaders = [n for n in workflow["nodes"] if n["type"] == "LoraLoader"]
    assert len(loaders) == 2
    # The loader nearest the sampler: the one whose model output no other loader takes.
    fed = {i["link"] for n in loaders for i in n["inputs"] if i["name"] == "model"}
    last = next(n for n in loaders if not set(n["outputs"][0]["links"] or ()) & fed)
    first = next(n for n in loaders if n is not last)
    last["mode"] = 4
    bypassed = read_image_settings(_png(tmp_path / "b.png", {"workflow": json.dumps(workflow)}))
    assert isinstance(bypassed, Imported)
    assert [c.source for c in bypassed.conditions] == [first["widgets_values"][0]]
    assert bypassed.models["base"] == "v1-5-pruned-emaonly.ckpt" and bypassed.prompt == "masterpiece best quality girl"
    last["mode"] = 2  # muted: the sampler's model input is cut, as in ComfyUI (which would refuse to run it)
    muted = read_image_settings(_png(tmp_path / "m.png", {"workflow": json.dumps(workflow)}))
    assert isinstance(muted, Imported) and muted.conditions == () and "base" not in muted.models
    assert _named(muted, "KSampler (node 3): no model reaches it")


def test_an_a1111_prompt_that_starts_with_a_brace_is_not_taken_for_json(tmp_path):
    """Dynamic prompts' ``{red|blue} fox`` opens A1111's text with a brace: read as A1111's text, not refused."""
    png = _png(tmp_path / "b.png", {"parameters": "{red|blue} fox\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 1"})
    imported = read_image_settings(png)
    assert isinstance(imported, Imported) and imported.tool == "A1111" and imported.prompt == "{red|blue} fox"


def test_hand_checked_values_of_real_swarmui_ruinedfooocus_and_comfyui_hires_files(tmp_path):
    """SwarmUI's hires fix (its "refiner" upscale on the same model, PostApply) and its side length where it says it
    did not use width and height; RuinedFooocus's JSON; ComfyUI's pixel hires fix with an upscaler model; a workflow's
    /* comments */ taken out of the prompt as the editor does."""
    swarm = _read("sd_metadata_swarmui-hires.chunks.json", tmp_path)
    assert swarm.settings["size"] == (768, 768) and _named(swarm, "width: 768: SwarmUI did not use it")
    assert {k: swarm.settings[k] for k in ("hires_scale", "upscaler", "hires_strength")} == {
        "hires_scale": 1.5, "upscaler": "RealESRGAN_x4plus_anime_6B.pth", "hires_strength": 0.3
    }  # fmt: skip
    ruined = _read("sd_metadata_ruined-fooocus.chunks.json", tmp_path)
    assert ruined.tool == "RuinedFooocus" and ruined.settings["seed"] == 2020047614
    assert (ruined.settings["steps"], ruined.settings["guidance"], ruined.settings["size"]) == (30, 8.0, (1024, 1024))
    comfy = _read("sd_metadata_comfyui-hires.chunks.json", tmp_path)
    assert comfy.settings["upscaler"] == "RealESRGAN_x4plus_anime_6B.pth" and comfy.settings["hires_scale"] == 1.5
    texts = _texts("sd_metadata_comfyui.chunks.json")
    alone = read_image_settings(_png(tmp_path / "w.png", {"workflow": texts["workflow"]}))
    assert isinstance(alone, Imported) and "/*" in texts["workflow"] and "/*" not in alone.prompt


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _spoiled(value: Any, kind: int) -> Any:
    """``value`` with each leaf replaced by one of the wrong kind (a text, a list, a number, null)."""
    if isinstance(value, dict):
        return {k: _spoiled(v, kind) for k, v in value.items()}
    if isinstance(value, list):
        return [_spoiled(v, kind) for v in value]
    return ("x", [1], 7, None, {"a": 1})[kind]


@pytest.mark.parametrize("kind", range(5))
@pytest.mark.parametrize("name", [n for n in FILES if n.endswith(".json")])
def test_real_metadata_with_every_value_of_a_wrong_kind_is_refused_not_a_crash(name, kind, tmp_path):
    """Each JSON chunk of each real file with all its values replaced by ones of another kind: read, or refused as
    an input file naming it (exit 3), never another exception."""
    texts = {}
    for key, text in _texts(name).items():
        try:
            texts[key] = json.dumps(_spoiled(json.loads(text), kind))
        except ValueError:
            texts[key] = text
    png = _png(tmp_path / "s.png", texts)
    try:
        read_image_settings(png)
    except InputError as exc:
        assert str(png) in str(exc)


def test_a_prompt_given_over_a_png_replaces_its_refiners_own_prompt_too(tmp_path):
    """Options given win over the PNG's; a new prompt (or negative prompt) is the refiner's too, not mixed with the
    PNG's refiner text."""
    from sdxl_control.jobs.spec import JobSpec

    imported = _read("comfyui_examples_sdxl_sdxl_refiner_prompt_example.chunks.json", tmp_path)
    kept = imported.under(JobSpec(settings={"steps": 8}))
    assert kept.settings["refiner_prompt"] == imported.settings["refiner_prompt"] and kept.settings["steps"] == 8
    assert "refiner_prompt" not in imported.under(JobSpec("a cat")).settings
    both = imported.under(JobSpec("a cat", settings={"refiner_prompt": "a dog"}))
    assert both.prompt == "a cat" and both.settings["refiner_prompt"] == "a dog"


def test_a_recipes_refiner_prompts_go_through_its_parameters_text_and_back():
    """The parameters text written for a recipe with a refiner prompt carries it (quoted), and reads back into it."""
    from sdxl_control.records.infotext import parameters_text

    recipe = {"prompt": "a cat", "negative_prompt": "blur", "steps": 20, "guidance": 5.0, "seed": 3,
              "size": [1024, 1024], "scheduler": {"class": "EulerDiscreteScheduler", "config": {}},
              "models": {"base": {"name": "b"}, "refiner": {"name": "r"}}, "refiner_switch": 0.8,
              "refiner_prompt": "a dog, on a beach: sunny", "refiner_negative_prompt": "grain"}  # fmt: skip
    text = parameters_text(recipe)
    assert 'Refiner prompt: "a dog, on a beach: sunny"' in text
    again = read_a1111(text)
    assert again.settings["refiner_prompt"] == "a dog, on a beach: sunny"
    assert again.settings["refiner_negative_prompt"] == "grain" and again.settings["refiner_switch"] == 0.8
    assert "Refiner prompt" not in parameters_text({**recipe, "refiner_prompt": None, "refiner_negative_prompt": None})
