"""No step reads a device tensor back to the host.

A read (``.item()``, ``bool()``, ``.tolist()``, a copy to the CPU) makes the host wait until the device has run
everything queued, so the next step's kernels are not queued while the device works: on a GPU that idles it between
steps and rules out CUDA graphs. Meta tensors have no data, so every such read raises: a whole call runs on the meta
device — prompts, condition preparation, both stages with windows starting and ending mid-schedule, detach — up to the
VAE decode, whose PNG output has to come to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl_control.passes.generator as generator_module
from sdxl_control import Attachment, Condition, FastPath, GenerationRequest, Generator, Prepared, Stage
from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.photomaker import PhotoMaker
from sdxl_control.adapters.pulid import PuLID
from sdxl_control.preprocessors.face import Identity
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.instantid import write_tiny_instantid_repo
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.testing.photomaker import TINY_CLIP, write_photomaker_checkpoint
from sdxl_control.testing.pulid import write_pulid_checkpoint

from .test_faceid import fake_face
from .test_instantid import raw_face


class _ReachedDecode(Exception):
    pass


def _stop_at_decode(vae, latents, **options):
    raise _ReachedDecode(latents)


@pytest.fixture(scope="module")
def meta_generator(tiny) -> Generator:
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="meta")


@pytest.fixture(scope="module")
def stacked(tiny, tmp_path_factory) -> tuple[Condition, ...]:
    folder = tmp_path_factory.mktemp("meta")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    ip = write_tiny_ip_adapter_repo(folder / "ip", tiny.base)
    return (
        LoRA(str(write_tiny_lora(folder / "lora.safetensors", tiny.base, "kohya", seed=7)), window=(0.25, 0.75)),
        ControlNet(str(write_tiny_controlnet(folder / "cn", tiny.base, seed=3)), image=photo, window=(0.0, 0.5)),
        ControlNetUnion(str(write_tiny_controlnet(folder / "u", tiny.base, seed=2, union=True)), depth=photo),
        IPAdapter("plus", photo, source=str(ip), window=(0.5, 1.0)),
        IPAdapter("sdxl", photo, source=str(ip), mask=photo, layers="style"),
        FaceID(
            "plusv2",
            fake_face(3),
            source=str(write_tiny_faceid_repo(folder / "faceid", tiny.base)),
            image_encoder=str(ip / "models" / "image_encoder"),
        ),  # fmt: skip
        InstantID(
            raw_face(1),
            source=str(write_tiny_instantid_repo(folder / "instantid", tiny.base)),
            mask=photo,
            controlnet_window=(0.25, 1.0),
        ),
        PuLID(
            identity=str(_pulid_identity(folder / "me.safetensors")),
            window=(0.0, 0.75),
            weights=str(write_pulid_checkpoint(folder / "pulid_v1.bin", _unet(tiny), "v1", **TINY_PULID)),
        ),
        PhotoMaker(
            photo,
            start_merge=0.25,
            weights=str(
                write_photomaker_checkpoint(
                    folder / "photomaker-v1.bin", _unet(tiny), "v1", widths=(32, 32), **TINY_CLIP
                )
            ),
        ),  # fmt: skip
    )


# The widths of sdxl_control.testing.pulid's tiny EVA tower: 16-wide class embedding, 17 tokens of 128.
TINY_PULID = dict(vit_width=128, id_width=512 + 16, hidden=128)


def _unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny.base, subfolder="unet")


def _pulid_identity(path):
    """A saved identity with PuLID's EVA features, as save_identity(..., pulid=True) writes them."""
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((1, 512), (1, 16), (1, 5, 17, 128))]
    keypoints = rng.uniform(20, 40, (5, 2)).astype(np.float32)
    Identity(arrays[0], keypoints, (64, 64), "antelopev2", arrays[1], arrays[2]).save(path)
    return path


def _run_on_meta(generator: Generator, monkeypatch: pytest.MonkeyPatch, **options) -> torch.Tensor:
    monkeypatch.setattr(generator_module, "decode_latents", _stop_at_decode)
    seen: list[float] = []
    # The class word and trigger serve PhotoMaker; the other conditions do not read the prompt.
    request = GenerationRequest("a portrait of a man img", size=(64, 64), seed=1, **options)
    with pytest.raises(_ReachedDecode) as reached:
        generator.run(request, progress=lambda e: seen.append(e.timestep), progress_bar=False)
    assert len(seen) >= request.steps  # progress reports host numbers (second-order samplers: two per step)
    latents = reached.value.args[0]
    assert latents.device.type == "meta"
    return latents


def test_two_stage_call_with_every_condition_stacked_never_reads_the_device(meta_generator, stacked, monkeypatch):
    latents = _run_on_meta(meta_generator, monkeypatch, steps=4, refiner_switch=0.5, conditions=stacked)
    assert latents.shape == (1, 4, 8, 8)


# A scheduler reads the device or not whatever the conditions; each runs with windows that start and end mid-schedule.
# DPM++ SDE (DPMSolverSDEScheduler) cannot run here: torchsde seeds a generator on the latents' device, which meta is
# not; its single-step predecessor (0.2's "dpmpp_sde") is kept.
@pytest.mark.parametrize(
    "scheduler",
    ["euler", "euler_a", "heun", "dpmpp_2m", "DPMSolverSinglestepScheduler", "unipc", "ddim", "lcm",
     "dpmpp_2m_sde_karras", "dpm2_a_karras", "lms_exponential"],
)  # fmt: skip
def test_every_scheduler_never_reads_the_device(meta_generator, stacked, monkeypatch, scheduler):
    windowed = tuple(c for c in stacked if type(c).__name__ in ("LoRA", "ControlNet", "IPAdapter"))
    latents = _run_on_meta(
        meta_generator, monkeypatch, steps=4, refiner_switch=0.5, scheduler=scheduler, conditions=windowed
    )
    assert latents.shape == (1, 4, 8, 8)


def test_draft_with_explicit_timesteps_never_reads_the_device(meta_generator, monkeypatch):
    _run_on_meta(meta_generator, monkeypatch, timesteps=(999, 749, 499, 249), guidance=0.0, scheduler="euler_trailing")


@dataclass(frozen=True)
class _HostReader(Condition):
    """Reads the sample back every step: what this test exists to catch."""

    kind = "host-reader"
    supported_stages = Stage.BOTH

    def prepare(self, ctx):
        return _HostReaderPrepared()


class _HostReaderPrepared(Prepared):
    def attach(self, unet, stage):
        return _HostReaderAttachment()


class _HostReaderAttachment(Attachment):
    def contribute(self, step, active):
        if float(step.sample.mean()) > 1e9:
            raise AssertionError("unreachable")
        return None

    def detach(self):
        pass


def test_a_condition_that_reads_the_device_is_caught(meta_generator, monkeypatch):
    monkeypatch.setattr(generator_module, "decode_latents", _stop_at_decode)
    with pytest.raises(RuntimeError, match="meta"):
        meta_generator.generate("x", size=(64, 64), steps=2, conditions=(_HostReader(),), progress_bar=False)


def test_fast_path_never_reads_the_device(meta_generator, stacked, monkeypatch):
    meta_generator.set_fast_path(FastPath())
    try:
        _run_on_meta(meta_generator, monkeypatch, steps=4, refiner_switch=0.5, conditions=stacked)
    finally:
        meta_generator.set_fast_path(None)
