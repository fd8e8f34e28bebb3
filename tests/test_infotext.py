"""The A1111 ``parameters`` text of our PNGs, read by A1111's own grammar and by two third-party readers (sd-parsers,
sd-prompt-reader); no private path in an image by default; recipes whose inputs moved still re-run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control import read_recipe
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.cli import main
from sdxl_control.protocol.schedule import SCHEDULERS
from sdxl_control.records.infotext import parameters_text, sampler_label
from sdxl_control.testing import tiny_control_models
from sdxl_control.testing.lora import write_tiny_lora

# A1111's infotext grammar (modules/infotext_utils.py): one "key: value" item, a value JSON-quoted when it holds a
# comma, colon or newline; the last line is the settings line when it has at least 3 items.
A1111_ITEM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> tuple[str, str, dict[str, str]]:
    *lines, last = text.strip().split("\n")
    if len(A1111_ITEM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in A1111_ITEM.findall(last):
        fields[key] = json.loads(value) if value[:1] == '"' and value[-1:] == '"' else value
    return "\n".join(prompt), "\n".join(negative), fields


def controlnet_unit(text: str) -> dict[str, str]:
    """The ControlNet extension's reading of one unit (scripts/infotext.py: items split on ',' then on ': ')."""
    return dict(item.strip().split(": ") for item in text.split(","))  # type: ignore[misc]


def old_a1111_hash(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hash(path: Path) -> str:
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header :]).hexdigest()[:12]


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    from skimage.data import astronaut

    folder = tmp_path_factory.mktemp("inputs")
    photo = folder / "photo.png"
    Image.fromarray(astronaut()).resize((64, 48)).save(photo)
    lora = write_tiny_lora(folder / "style.safetensors", tiny.base, "kohya", seed=3)
    return {"photo": photo, "lora": Path(lora), "edges": tiny_control_models("controlnet-edges"),
            "ip": tiny_control_models("ip-adapter")}  # fmt: skip


def _conditions(inputs):
    return [
        ControlNet(str(inputs["edges"]), image=str(inputs["photo"]), preprocess="canny",
                   preprocess_options={"low": 50, "high": 150}, scale=0.6, window=(0.0, 0.7)),
        IPAdapter("plus", str(inputs["photo"]), source=str(inputs["ip"]), scale=0.5),
        LoRA(str(inputs["lora"]), scale=0.7),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def png(generator, inputs, tmp_path_factory):
    result = generator.generate(
        "a cat, oil painting: detailed", negative_prompt="blurry, dark", seed=11, steps=4, size=(64, 48),
        refiner_switch=0.5, scheduler="dpmpp_2m_karras", conditions=_conditions(inputs), progress_bar=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("png") / "out.png"
    result.images[0].save(path)
    return path


def test_a1111_grammar_reads_every_field(png, inputs):
    prompt, negative, fields = a1111_parse(Image.open(png).info["parameters"])
    assert prompt == "a cat, oil painting: detailed <lora:style:0.7>" and negative == "blurry, dark"
    expected = {"Steps": "4", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "5.0", "Seed": "11",
                "Size": "64x48", "Model": "base", "Refiner": "refiner", "Refiner switch at": "0.5"}  # fmt: skip
    assert {k: fields[k] for k in expected} == expected
    assert controlnet_unit(fields["ControlNet 0"]) == {
        "Module": "canny", "Model": "controlnet-edges", "Weight": "0.6", "Resize Mode": "Just Resize",
        "Threshold A": "50", "Threshold B": "150", "Guidance Start": "0", "Guidance End": "0.7",
        "Control Mode": "Balanced",
    }  # fmt: skip
    weights = inputs["ip"] / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"
    ip_unit = controlnet_unit(fields["ControlNet 1"])
    assert ip_unit["Module"] == "ip-adapter_clip_sdxl_plus_vith" and ip_unit["Weight"] == "0.5"
    assert ip_unit["Model"] == f"ip-adapter-plus_sdxl_vit-h [{old_a1111_hash(weights)}]"
    assert fields["Lora hashes"] == f"style: {addnet_hash(inputs['lora'])}"
    assert "Model hash" not in fields  # a folder model has no file hash A1111 or Civitai could look up


def test_sd_parsers_reads_the_png(png):
    from sd_parsers import ParserManager

    info = ParserManager().parse(str(png))
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "5.0", "seed": "11", "steps": "4"}
    assert sampler.model.name == "base"
    assert [p.value for p in sampler.prompts] == ["a cat, oil painting: detailed <lora:style:0.7>"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, dark"]
    assert info.metadata["Size"] == "64x48"


def test_sd_prompt_reader_reads_the_png(png):
    from sd_prompt_reader.image_data_reader import ImageDataReader

    reader = ImageDataReader(str(png))
    assert reader.tool == "A1111 webUI"
    assert reader.positive == "a cat, oil painting: detailed <lora:style:0.7>" and reader.negative == "blurry, dark"
    assert reader.parameter == {"model": "base", "sampler": "DPM++ 2M", "seed": "11", "cfg": "5.0", "steps": "4",
                                "size": "64x48"}  # fmt: skip
    assert 'ControlNet 0: "Module: canny' in reader.setting and "Lora hashes" in reader.setting


def test_quoted_values_and_file_model_hashes():
    recipe = {
        "prompt": "x", "negative_prompt": None, "steps": 20, "guidance": 7.0, "seed": 1, "size": [1024, 768],
        "version": "0.1.0", "scheduler": {"class": "EulerAncestralDiscreteScheduler", "config": {}},
        "models": {"base": {"name": "my, model: v2.safetensors", "local": "file", "sha256": "ab12" * 16},
                   "refiner": {"name": "stabilityai/stable-diffusion-xl-refiner-1.0"}},
        "refiner_switch": 0.8,
        "infotext": {"units": [{"Module": "none", "Model": "m"}], "tags": [],
                     "fields": {"PhotoMaker": {"Version": "v2", "Trigger": "img"}}},
    }  # fmt: skip
    text = parameters_text(recipe)
    _, _, fields = a1111_parse(text)
    assert fields["Model"] == "my, model: v2" and fields["Model hash"] == "ab12ab12ab"
    assert fields["Sampler"] == "Euler a" and fields["Size"] == "1024x768" and "Schedule type" not in fields
    assert fields["Refiner"] == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert fields["PhotoMaker"] == "Version: v2, Trigger: img"
    # The checkpoint's Model item comes again after the units, whose own "Model:" naive readers would take.
    assert text.rstrip().endswith('Model: "my, model: v2"')


@pytest.mark.parametrize(
    "name, label",
    [("euler", ("Euler", None)), ("euler_a", ("Euler a", None)), ("heun", ("Heun", None)), ("ddim", ("DDIM", None)),
     ("unipc", ("UniPC", None)), ("dpmpp_2m", ("DPM++ 2M", None)), ("dpmpp_2m_karras", ("DPM++ 2M", "Karras")),
     ("dpmpp_sde", ("DPM++ SDE", None)), ("lcm", ("LCM", None)), ("euler_trailing", ("Euler", "SGM Uniform")),
     ("ddim_trailing", ("DDIM", "SGM Uniform"))],
)  # fmt: skip
def test_sampler_labels_are_a1111s(name, label):
    class_name, overrides = SCHEDULERS[name]
    config = {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "leading", **overrides}
    assert sampler_label(class_name, config) == label


def test_no_private_path_in_a_png_by_default(generator, inputs, tiny, tmp_path):
    private = [str(inputs["photo"].parent), str(tiny.base.parent), os.path.expanduser("~") + "/", "/tmp/"]
    for paths, expect_private in (("names", False), ("full", True)):
        result = generator.generate("a cat", seed=1, steps=2, size=(64, 48), conditions=_conditions(inputs),
                                    progress_bar=False, recipe_paths=paths)  # fmt: skip
        out = tmp_path / f"{paths}.png"
        result.images[0].save(out)
        data = out.read_bytes()
        found = [p for p in private if p.encode() in data]
        assert bool(found) == expect_private, found
    recipe = read_recipe(tmp_path / "full.png")
    assert recipe["conditions"][0]["image"]["path"] == str(inputs["photo"].resolve())


def _run(*args: str) -> int:
    return main(["generate", *args, "-q"])


def test_recipe_finds_moved_inputs_beside_the_png_or_in_a_given_folder(tiny, inputs, tmp_path, capsys):
    first = tmp_path / "first"
    first.mkdir()
    photo, lora = shutil.copy(inputs["photo"], first), shutil.copy(inputs["lora"], first)
    out = tmp_path / "out.png"
    assert _run("a cat", "--tiny", "--steps", "3", "--seed", "5", "--edges", photo, "--lora", f"{lora}:0.8",
                "-o", str(out)) == 0  # fmt: skip
    moved = tmp_path / "moved"
    shutil.move(first, moved)  # the paths this machine remembers no longer exist
    capsys.readouterr()
    assert _run("--recipe", str(out), "-o", str(tmp_path / "lost.png")) == 3
    error = capsys.readouterr().err
    assert "photo.png" in error and "--inputs-from" in error
    assert _run("--recipe", str(out), "--inputs-from", str(moved), "-o", str(tmp_path / "found.png")) == 0
    # The PNG moved together with its inputs: found beside it.
    shutil.copy(out, moved / "out.png")
    assert _run("--recipe", str(moved / "out.png"), "-o", str(tmp_path / "beside.png")) == 0
    original = np.asarray(Image.open(out))
    for name in ("found", "beside"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), original)
    # A file of the same name with other contents is not taken for the recorded one.
    Image.new("RGB", (64, 48), (9, 9, 9)).save(moved / "photo.png")
    assert _run("--recipe", str(out), "--inputs-from", str(moved), "-o", str(tmp_path / "wrong.png")) == 3
    assert "has other contents than the recipe records" in capsys.readouterr().err
