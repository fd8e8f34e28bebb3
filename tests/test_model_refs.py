"""One model reference with one JSON form for presets, recipes, jobs and ``Generator.from_pretrained``; what 0.1
wrote (a ``[repo, file]`` pair, a bare path, a local file's reference) still reads."""

from __future__ import annotations

import json

import pytest

from sdxl_control import InvalidRequestError, Locator, ModelRef
from sdxl_control.base.files import portable_ref
from sdxl_control.cli import main
from sdxl_control.jobs.batch import parse_job
from sdxl_control.presets import load_preset
from sdxl_control.records.recipe import recipe_unet

LIGHTNING = ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")


def test_every_form_reads_as_one_reference():
    for form in (LIGHTNING, LIGHTNING.to_json(), list(LIGHTNING.to_json().values()),
                 ("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")):  # fmt: skip
        assert ModelRef.parse(form, "a UNet") == LIGHTNING
    assert ModelRef.parse("unet.safetensors", "a UNet") == ModelRef("unet.safetensors")
    assert ModelRef.parse(None, "a UNet") is None
    for bad in ({"source": "x", "file": "y"}, ["one"], 3, {"weight_name": "y"}, ""):
        with pytest.raises(InvalidRequestError, match="a UNet|source"):
            ModelRef.parse(bad, "a UNet")


def test_recipes_of_0_1_and_of_now_name_the_same_checkpoint(tmp_path):
    file = tmp_path / "distilled.safetensors"
    file.write_bytes(b"weights")
    locate = Locator([tmp_path])
    for recorded, expected in (
        (["ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors"], LIGHTNING),  # 0.1, a hub file
        (portable_ref(file), ModelRef(str(file))),  # 0.1, a local file
        (LIGHTNING.to_json(), LIGHTNING),  # now
        ({"source": portable_ref(file)}, ModelRef(str(file))),
    ):
        assert recipe_unet({"models": {"base": {"name": "b", "unet_weights": recorded}}}, locate) == expected


def test_a_dry_run_line_and_its_0_1_form_run_the_same_unet(capsys, tmp_path):
    assert main(["generate", "a fox", "--preset", "lightning-4step-unet", "--seed", "1", "--dry-run"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["models"]["unet"] == LIGHTNING.to_json() == load_preset("lightning-4step-unet").models["unet"]
    assert parse_job(line, 1, folder=tmp_path).unet == LIGHTNING
    old = {**line, "models": {**line["models"], "unet": ["ByteDance/SDXL-Lightning", LIGHTNING.weight_name]}}
    assert parse_job(old, 1, folder=tmp_path).unet == LIGHTNING
