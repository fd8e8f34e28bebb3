"""Model loading: the real folder layout loads; every bad model fails fast with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdxl_control import (
    CheckpointError,
    DeviceError,
    Generator,
    IncompatibleModelError,
    MissingWeightsError,
    ModelNotFoundError,
    Stage,
)
from sdxl_control.engine.devices import default_device_and_dtype
from sdxl_control.engine.models import load_stage


@pytest.fixture()
def base_copy(tiny, tmp_path):
    return shutil.copytree(tiny.base, tmp_path / "base")


def test_loads_tiny_folders_with_their_stage_conditioning(generator):
    assert generator.base.requires_aesthetics_score is False and generator.base.force_zeros_for_empty_prompt is True
    assert (
        generator.refiner.requires_aesthetics_score is True and generator.refiner.force_zeros_for_empty_prompt is False
    )
    assert len(generator.base.text_encoders) == 2 and len(generator.refiner.text_encoders) == 1
    assert generator.base.unet.config.addition_embed_type == "text_time"


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_stage("./does/not/exist", Stage.BASE)


def test_hub_id_missing_offline_says_how_to_fetch(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_stage("stabilityai/stable-diffusion-xl-base-1.0", Stage.BASE, cache_dir=tmp_path)
    message = str(err.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and str(tmp_path) in message
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in message


def test_sd15_shaped_unet_is_refused(base_copy):
    config_file = base_copy / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(addition_embed_type=None, cross_attention_dim=768)
    config_file.write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match=r"not an SDXL UNet.*cross_attention_dim=768.*Stable Diffusion 1"):
        load_stage(base_copy, Stage.BASE)


def test_corrupt_safetensors_is_named(base_copy):
    weights = base_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a readable safetensors"):
        load_stage(base_copy, Stage.BASE)


def test_pickle_weights_are_refused(base_copy, tmp_path):
    weights = base_copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({"w": torch.zeros(1)}, weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_stage(base_copy, Stage.BASE)
    single = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, single)
    with pytest.raises(CheckpointError, match="only loads safetensors"):
        load_stage(single, Stage.BASE)


def test_refiner_is_not_a_base(tiny):
    with pytest.raises(IncompatibleModelError, match="is an SDXL refiner; it cannot be loaded as the base"):
        load_stage(tiny.refiner, Stage.BASE)


def test_folder_that_is_no_pipeline(tmp_path):
    with pytest.raises(IncompatibleModelError, match="no model_index.json"):
        load_stage(tmp_path, Stage.BASE)


def test_default_device_and_dtype(monkeypatch):
    assert default_device_and_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_device_and_dtype("cuda", None) == (torch.device("cuda"), torch.float16)
    with pytest.raises(DeviceError, match="cuda:0 to cuda:0"):
        default_device_and_dtype("cuda:1", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        default_device_and_dtype("cuda", None)
    assert default_device_and_dtype("cpu", torch.bfloat16)[1] == torch.bfloat16


def test_every_missing_model_is_said_at_once_with_its_size(tiny, capsys, monkeypatch):
    """Base, refiner and a condition's weights all missing: one message, each with its command and size, and the
    total; nothing is loaded first."""
    from sdxl_control.cli import main
    from sdxl_control.weights.inventory import PUBLISHED_SIZES, human_size

    monkeypatch.setattr(Generator, "from_pretrained", lambda *a, **k: pytest.fail("loaded before saying"))
    argv = ["generate", "a fox", "--refiner-switch", "0.8", "--preset", "lightning-4step", "-o", "fox.png"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "3 models this run needs are not on this machine" in err
    for what, size in (("base model", "13.9 GB"), ("refiner model", "12.2 GB"), ("LoRA", "394.0 MB")):
        assert f"{what}: " in err and f"({size})" in err, (what, err)
    assert err.count("hf download") == 3 and "sdxl_lightning_4step_lora.safetensors" in err
    total = sum(v for (repo, _), v in PUBLISHED_SIZES.items() if repo.startswith("stabilityai/"))
    assert f"{human_size(total + 394_000_000)} in all" in err


def test_from_pretrained_names_the_base_and_the_refiner():
    with pytest.raises(MissingWeightsError) as err:
        Generator.from_pretrained("someone/missing-base", "someone/missing-refiner")
    message = str(err.value)
    assert "2 models" in message and "someone/missing-base" in message and "someone/missing-refiner" in message
    assert " in all" not in message  # no size known for these: none made up


def test_online_missing_models_are_fetched_until_the_hub_fails(monkeypatch):
    """With the hub reachable, missing models are fetched; after the first that cannot be, none is tried and all
    the rest are in the one message."""
    from huggingface_hub import constants

    from sdxl_control.weights import inventory

    tried = []

    def fetch(need):
        tried.append(need.source)
        raise MissingWeightsError("the hub could not be reached")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(inventory, "fetch", fetch)
    needs = [inventory.ModelNeed("LoRA", f"someone/lora-{i}", ("a.safetensors",)) for i in range(3)]
    with pytest.raises(MissingWeightsError, match="3 models") as err:
        inventory.ensure(needs)
    assert tried == ["someone/lora-0"] and all(f"someone/lora-{i}" in str(err.value) for i in range(3))
    inventory.ensure([inventory.ModelNeed("LoRA", "./a/local/path.safetensors")])  # a local path: its loader's call
