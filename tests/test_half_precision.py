"""Every condition family stacked in half precision (bf16 on CPU), base -> refiner: dtype slips that would only
show on a GPU in fp16 fail here. Also the fp16 VAE path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import FastPath, Generator
from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora

from .test_faceid import fake_face


@pytest.fixture(scope="module")
def half(tiny):
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu", dtype=torch.bfloat16)


def test_everything_stacked_in_bf16(half, tiny, tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    ip = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    conditions = [
        LoRA(str(write_tiny_lora(tmp_path / "l.safetensors", tiny.base, "kohya", seed=1)), scale=0.5),
        ControlNet(str(write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=1)), image=photo),
        ControlNetUnion(str(write_tiny_controlnet(tmp_path / "u", tiny.base, seed=2, union=True)), depth=photo),
        IPAdapter("plus", photo, source=str(ip), mask=photo),
        IPAdapter("sdxl", photo, source=str(ip), layers="style"),
        FaceID("plusv2", fake_face(1), source=str(write_tiny_faceid_repo(tmp_path / "fid", tiny.base)),
               image_encoder=str(ip / "models" / "image_encoder")),
    ]  # fmt: skip
    before = {k: v.clone() for k, v in half.base.unet.state_dict().items()}
    result = half.generate(
        "a portrait", conditions=conditions, steps=4, refiner_switch=0.5, size=(64, 64), seed=1, progress_bar=False
    )
    assert result.latents.dtype == torch.bfloat16 and torch.isfinite(result.latents).all()
    assert all(torch.equal(before[k], v) for k, v in half.base.unet.state_dict().items())
    half.set_fast_path(FastPath())
    try:
        fast = half.generate(
            "a portrait", conditions=conditions, steps=4, refiner_switch=0.5, size=(64, 64), seed=1, progress_bar=False
        )
    finally:
        half.set_fast_path(None)
    # bf16 keeps 8 bits of mantissa: summing in another order moves values by a few of its steps, not more.
    difference = np.abs(np.asarray(fast.images[0], np.int16) - np.asarray(result.images[0], np.int16))
    assert difference.mean() < 1.0 and difference.max() <= 8  # measured: 0.47 and 4
    assert all(torch.equal(before[k], v) for k, v in half.base.unet.state_dict().items())


def test_fp16_vae_round_trip(half):
    vae = half.base.vae
    vae.to(torch.float16)
    try:
        result = half.generate("a portrait", steps=2, size=(64, 64), seed=1, progress_bar=False)
        assert vae.dtype == torch.float16 and np.asarray(result.images[0]).std() > 0
    finally:
        vae.to(torch.bfloat16)
