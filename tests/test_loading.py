"""Model loading: the real folder layout loads; every bad model fails fast with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdxl_control import (
    CheckpointError,
    DeviceError,
    IncompatibleModelError,
    MissingWeightsError,
    ModelNotFoundError,
    Stage,
)
from sdxl_control.devices import default_device_and_dtype
from sdxl_control.models import load_stage


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


def test_single_file_that_is_no_sdxl_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, path)
    with pytest.raises(IncompatibleModelError, match="not a single-file Stable Diffusion checkpoint"):
        load_stage(path, Stage.BASE)


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
