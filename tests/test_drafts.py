"""Few-step drafts: Lightning/Hyper-SD/DMD2/LCM presets are data whose schedules equal the published usage, a
Lightning call runs with stacked conditions, and UNet-only checkpoints load over the base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from sdxl_control import GenerationRequest, Generator, IncompatibleModelError, InvalidRequestError, MissingWeightsError
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.base.model_refs import ModelRef
from sdxl_control.engine.vae import DRAFT_DECODER
from sdxl_control.presets import load_preset
from sdxl_control.protocol.guidance import NoGuidance, guidance_for
from sdxl_control.protocol.schedule import make_scheduler
from sdxl_control.testing import write_tiny_controlnet, write_tiny_taesd
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.testing.tiny import SDXL_SCHEDULER

from .conftest import as_reference
from .test_faceid import fake_face


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_lightning_schedule_is_the_published_one(generator, steps):
    preset = load_preset(f"lightning-{steps}step")
    assert preset.settings["steps"] == steps and preset.settings["guidance"] == 0.0
    ours = make_scheduler(
        generator.base.scheduler_config, preset.settings["scheduler"], preset.settings.get("scheduler_options")
    )
    # The SDXL-Lightning card: EulerDiscreteScheduler.from_config(base config, timestep_spacing="trailing"), guidance 0.
    published = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER, timestep_spacing="trailing")
    ours.set_timesteps(steps)
    published.set_timesteps(steps)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(ours) is EulerDiscreteScheduler and public(ours.config) == public(published.config)
    assert torch.equal(ours.timesteps, published.timesteps)
    assert isinstance(guidance_for(preset.settings["guidance"], generator.base.unet), NoGuidance)
    assert preset.conditions()[0].weight_name == f"sdxl_lightning_{steps}step_lora.safetensors"


def test_four_step_trailing_timesteps():
    scheduler = make_scheduler(SDXL_SCHEDULER | {"_class_name": "EulerDiscreteScheduler"}, "euler_trailing")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_one_step_predicts_the_sample():
    preset = load_preset("lightning-1step-unet")
    scheduler = make_scheduler(SDXL_SCHEDULER, preset.settings["scheduler"], preset.settings["scheduler_options"])
    assert scheduler.config.prediction_type == "sample" and scheduler.config.timestep_spacing == "trailing"
    assert preset.unet == ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_1step_unet_x0.safetensors")


def test_dmd2_runs_its_published_timesteps(generator):
    preset = load_preset("dmd2-4step")
    seen = []
    generator.generate(
        "x", size=(64, 64), seed=1, progress=lambda e: seen.append(e.timestep), progress_bar=False, **preset.settings
    )
    assert seen == [999.0, 749.0, 499.0, 249.0]


@pytest.mark.parametrize("name", ["lightning-4step", "hyper-sd-8step", "lcm-lora-4step"])
def test_preset_loras_use_the_real_loading_code(generator, name):
    preset = load_preset(name)
    source = preset.loras[0]["source"]
    with pytest.raises(MissingWeightsError, match=f"hf download {source}"):
        generator.generate("x", size=(64, 64), steps=1, conditions=preset.conditions(), progress_bar=False)


def test_lightning_call_with_stacked_conditions(generator, tiny, tmp_path):
    preset = load_preset("lightning-4step")
    lora = write_tiny_lora(tmp_path / "lightning-standin.safetensors", tiny.base, "kohya", seed=7)
    ip = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    faceid = write_tiny_faceid_repo(tmp_path / "faceid", tiny.base)
    controlnet = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=3)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    conditions = (LoRA(str(lora)), ControlNet(str(controlnet), image=photo, scale=0.7),
                  IPAdapter("plus", photo, source=str(ip), scale=0.6), FaceID("faceid", fake_face(3), source=str(faceid)))  # fmt: skip
    batches = []
    hook = generator.base.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        result = generator.run(
            GenerationRequest("a portrait", size=(64, 64), seed=2, conditions=conditions, **preset.settings),
            progress_bar=False,
        )
    finally:
        hook.remove()
    assert batches == [1, 1, 1, 1]  # four steps, one unguided forward each
    assert result.recipes[0]["scheduler"]["requested"] == "euler_trailing" and len(result.recipes[0]["conditions"]) == 4
    plain = generator.run(GenerationRequest("a portrait", size=(64, 64), seed=2, **preset.settings), progress_bar=False)
    assert not torch.allclose(result.latents, plain.latents, atol=1e-3)


def test_unet_only_checkpoint_loads_over_the_base(tiny, tmp_path):
    from safetensors.torch import save_file

    reference = Generator.from_pretrained(tiny.base, device="cpu")
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
        for k, v in reference.base.unet.state_dict().items()
    }
    save_file(state, str(tmp_path / "distilled_unet.safetensors"))
    gen = Generator.from_pretrained(tiny.base, device="cpu", unet=str(tmp_path / "distilled_unet.safetensors"))
    assert all(torch.equal(gen.base.unet.state_dict()[k], v) for k, v in state.items())
    assert gen.base.source.unet_weights == ModelRef(str(tmp_path / "distilled_unet.safetensors"))
    run = dict(size=(64, 64), steps=2, seed=1, progress_bar=False)
    assert not torch.allclose(gen.generate("x", **run).latents, reference.generate("x", **run).latents)
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IncompatibleModelError, match="does not fit the base UNet.*missing: "):
        Generator.from_pretrained(tiny.base, device="cpu", unet=str(tmp_path / "other.safetensors"))


def test_unet_only_checkpoint_takes_the_models_dtype_and_names_what_does_not_fit(tiny, tmp_path):
    from safetensors.torch import save_file

    reference = Generator.from_pretrained(tiny.base, device="cpu")
    state = {k: v.half() for k, v in reference.base.unet.state_dict().items()}  # published as fp16
    save_file(state, str(tmp_path / "fp16.safetensors"))
    gen = Generator.from_pretrained(tiny.base, device="cpu", unet=str(tmp_path / "fp16.safetensors"))
    params = dict(gen.base.unet.named_parameters())
    assert params.keys() == state.keys()
    assert all(p.dtype == torch.float32 and torch.equal(p, state[k].float()) for k, p in params.items())
    before = dict(reference.base.unet.named_parameters())
    assert all(p.requires_grad == before[k].requires_grad for k, p in params.items())
    wrong = {**state, "conv_in.weight": torch.zeros(3, 3), "extra.weight": torch.zeros(1)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(IncompatibleModelError, match=r"unexpected: extra.weight; shapes: conv_in.weight \(3, 3\)"):
        Generator.from_pretrained(tiny.base, device="cpu", unet=str(tmp_path / "wrong.safetensors"))


def test_draft_decoder_equals_diffusers_with_the_tiny_autoencoder(generator, tiny, tmp_path):
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

    taesd = write_tiny_taesd(tmp_path / "taesdxl")
    run = dict(size=(64, 64), steps=3, seed=4, guidance=5.0)
    ours = generator.generate("a fox", decoder=str(taesd), progress_bar=False, **run)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.base, vae=AutoencoderTiny.from_pretrained(taesd))
    as_reference(pipe)
    theirs = pipe("a fox", height=64, width=64, num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(4), output_type="np").images[0]  # fmt: skip
    assert np.abs(np.asarray(ours.images[0], np.float32) / 255 - theirs).max() <= 1 / 255 + 1e-6
    vae = generator.generate("a fox", progress_bar=False, **run)
    assert torch.equal(vae.latents, ours.latents)
    # The decoder's folder is recorded by name and content, never by its path, and found again to re-make the image.
    recorded = ours.recipes[0]["decoder"]
    assert recorded == {"folder": "taesdxl", "fingerprint": recorded["fingerprint"]} and str(tmp_path) not in str(
        recorded
    )
    again = generator.run(GenerationRequest.from_recipe(ours.recipes[0]), progress_bar=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(ours.images[0]))
    assert np.abs(np.asarray(vae.images[0], np.int16) - np.asarray(ours.images[0], np.int16)).max() > 0


def test_draft_decoder_errors(generator, tiny):
    with pytest.raises(IncompatibleModelError, match="AutoencoderTiny"):
        generator.generate("x", size=(64, 64), steps=1, decoder=str(tiny.base / "vae"), progress_bar=False)
    with pytest.raises(MissingWeightsError, match="hf download madebyollin/taesdxl"):
        generator.generate("x", size=(64, 64), steps=1, decoder="madebyollin/taesdxl", progress_bar=False)
    with pytest.raises(InvalidRequestError, match="needs no tiling"):
        GenerationRequest("x", decoder="madebyollin/taesdxl", vae_tiling=True)


def test_draft_preset_is_lightning_with_the_draft_decoder():
    draft, lightning = load_preset("draft"), load_preset("lightning-4step")
    settings = dict(draft.settings)
    assert settings.pop("decoder") == DRAFT_DECODER
    assert settings == lightning.settings and draft.loras == lightning.loras


def test_the_tiny_draft_decoder_shows_visible_noise_not_black(tiny, tmp_path):
    """``--preset draft --tiny`` and ``--preview-every`` under ``--tiny`` decode with the tiny TAESD: random weights,
    but a picture one can see (its untouched random last layer decoded every latent to black)."""
    from diffusers import AutoencoderTiny

    from sdxl_control.cli import main

    decoder = AutoencoderTiny.from_pretrained(write_tiny_taesd(tmp_path / "taesd"))
    with torch.no_grad():
        pixels = decoder.decode(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))).sample
    assert -0.5 < pixels.mean() < 0.5 and pixels.std() > 0.1  # [-1, 1]: about mid-grey, not flat
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox in the snow", "--preset", "draft", "--tiny", "--seed", "3", "--preview-every", "2"]
    assert main([*argv, "-q", "-o", str(out)]) == 0
    for written in (out, tmp_path / "fox-preview.png"):
        image = np.asarray(Image.open(written).convert("L"), np.float32)
        assert 32 < image.mean() < 224 and image.std() > 8, (written.name, image.mean(), image.std())
