"""APG and FreeU equal diffusers on the tiny models.

References: diffusers 0.42.1 (installed). APG: the guider ``diffusers.guiders.AdaptiveProjectedGuidance`` driving
diffusers' own modular SDXL pipeline (``StableDiffusionXLAutoBlocks``), the only SDXL pipeline that runs it; it
predicts the prompt and the negative prompt in two UNet calls where ours batches them, hence a tolerance. FreeU:
``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` after ``enable_freeu`` (its up blocks call
``apply_freeu``), and diffusers' ControlNet and IP-Adapter pipelines with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

from sdxl_control import ConditionError
from sdxl_control.adapters.apg import APG
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.freeu import FreeU
from sdxl_control.adapters.ip_adapter import VARIANTS, IPAdapter
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

from .conftest import as_reference

PROMPT = "a lighthouse on a cliff"
STEPS = 5
RUN = dict(steps=STEPS, size=(64, 64), seed=3, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-5)
SDXL = dict(s1=0.9, s2=0.2, b1=1.3, b2=1.4)  # FreeU's README, "SDXL"


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def modular(sdxl_pipes):
    """diffusers' modular SDXL text-to-image pipeline with the tiny base's components."""
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLAutoBlocks,
    )

    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{k: v for k, v in sdxl_pipes[0].components.items() if v is not None})
    return pipe


def _modular(pipe, guider):
    pipe.update_components(guider=guider)
    with torch.no_grad():
        return pipe(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64,
                    generator=torch.Generator().manual_seed(3), output="latents")  # fmt: skip


def test_the_modular_pipeline_with_plain_cfg_is_our_plain_call(generator, modular):
    from diffusers.guiders import ClassifierFreeGuidance

    ours = generator.generate(PROMPT, guidance=5.0, **RUN)
    torch.testing.assert_close(ours.latents, _modular(modular, ClassifierFreeGuidance(guidance_scale=5.0)), **CLOSE)


# (our APG fields, request fields, diffusers' AdaptiveProjectedGuidance arguments)
APG_CASES = {
    "defaults": ({}, {}, {}),
    "eta 0, momentum -0.5": (dict(eta=0.0, momentum=-0.5), {}, dict(eta=0.0, adaptive_projected_guidance_momentum=-0.5)),
    "a threshold that bites": (dict(eta=0.5, norm_threshold=0.5), {},
                               dict(eta=0.5, adaptive_projected_guidance_rescale=0.5)),
    "no threshold": (dict(norm_threshold=0.0), {}, dict(adaptive_projected_guidance_rescale=0.0)),
    "with rescale": (dict(eta=0.0, momentum=-0.3), dict(guidance_rescale=0.7),
                     dict(eta=0.0, adaptive_projected_guidance_momentum=-0.3, guidance_rescale=0.7)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(APG_CASES))
def test_apg_matches_diffusers_guider(generator, modular, case):
    from diffusers.guiders import AdaptiveProjectedGuidance

    ours_fields, request, theirs = APG_CASES[case]
    ours = generator.generate(PROMPT, guidance=5.0, conditions=[APG(**ours_fields)], **request, **RUN)
    ref = _modular(modular, AdaptiveProjectedGuidance(guidance_scale=5.0, **theirs))
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    plain = generator.generate(PROMPT, guidance=5.0, **request, **RUN)
    # eta 1 keeps the whole guidance: unless the norm threshold bites (not on the tiny models' small predictions at
    # 15), APG is CFG itself; every other case changes the image.
    same = ours_fields.get("eta", 1.0) == 1.0 and ours_fields.get("norm_threshold", 15.0) in (0.0, 15.0)
    assert torch.allclose(ours.latents, plain.latents, atol=1e-4) == same


def test_apg_scale_blends_from_cfg_and_needs_cfg(generator):
    plain = generator.generate(PROMPT, guidance=5.0, **RUN)
    full = generator.generate(PROMPT, guidance=5.0, conditions=[APG(eta=0.0)], **RUN)
    half = generator.generate(PROMPT, guidance=5.0, conditions=[APG(eta=0.0, scale=0.5)], **RUN)
    assert not torch.allclose(half.latents, full.latents, atol=1e-5)
    assert not torch.allclose(half.latents, plain.latents, atol=1e-5)
    # Without classifier-free guidance there is nothing to project: the same image as without it.
    alone = generator.generate(PROMPT, guidance=1.0, **RUN)
    assert torch.equal(generator.generate(PROMPT, guidance=1.0, conditions=[APG()], **RUN).latents, alone.latents)


def test_bad_apg_and_freeu_values_are_refused(generator):
    with pytest.raises(ConditionError, match="eta is 0 or more"):
        APG(eta=-1.0)
    with pytest.raises(ConditionError, match="norm_threshold is 0"):
        APG(norm_threshold=-1.0)
    with pytest.raises(ConditionError, match="FreeU b2 is above 0"):
        FreeU(b2=0.0)
    with pytest.raises(ConditionError, match="makes a factor 0 or less"):
        generator.generate(PROMPT, conditions=[FreeU(scale=2.0)], **RUN)  # s2 0.2 at scale 2: -0.6
    with pytest.raises(ConditionError, match="each compute the guidance anew"):
        generator.generate(PROMPT, conditions=[APG(), APG(eta=0.5)], **RUN)


def _freeu(pipe, **call):
    pipe.enable_freeu(**SDXL)
    try:
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                        generator=torch.Generator().manual_seed(3), output_type="latent", **call).images  # fmt: skip
    finally:
        pipe.disable_freeu()


def test_freeu_matches_diffusers_enable_freeu(generator, sdxl_pipes):
    ours = generator.generate(PROMPT, guidance=5.0, conditions=[FreeU()], **RUN)
    torch.testing.assert_close(ours.latents, _freeu(sdxl_pipes[0]), **CLOSE)
    plain = generator.generate(PROMPT, guidance=5.0, **RUN)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-4)
    # The UNet holds no FreeU factor after the call (diffusers' own disable_freeu leaves None attributes behind).
    assert not any(k in block.__dict__ for block in generator.base.unet.up_blocks for k in ("s1", "s2", "b1", "b2"))


def test_freeu_in_both_stages_matches_diffusers_handing_over(generator, sdxl_pipes):
    base, refiner = sdxl_pipes
    switch = 0.6
    ours = generator.generate(PROMPT, guidance=5.0, refiner_switch=switch, conditions=[FreeU(stage="both")], **RUN)
    latents = _freeu(base, denoising_end=switch)
    torch.testing.assert_close(ours.latents, _freeu(refiner, image=latents, denoising_start=switch), **CLOSE)


def test_freeu_scale_moves_the_factors_from_one():
    assert FreeU(scale=0.5).factors() == {"s1": 0.95, "s2": 0.6, "b1": 1.15, "b2": 1.2}
    assert FreeU().factors() == SDXL


def test_freeu_stacks_with_a_controlnet(generator, tiny, tmp_path_factory):
    net = write_tiny_controlnet(tmp_path_factory.mktemp("freeu-controlnet") / "net", tiny.base, seed=4)
    image = _photo(5)
    ours = generator.generate(PROMPT, guidance=5.0, conditions=[ControlNet(net, image=image, scale=0.8), FreeU()],
                              **RUN)  # fmt: skip
    pipe = as_reference(StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny.base, controlnet=ControlNetModel.from_pretrained(net)))  # fmt: skip
    ref = _freeu(pipe, image=image, controlnet_conditioning_scale=0.8)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_freeu_and_apg_stack_with_an_ip_adapter(generator, tiny, sdxl_pipes, tmp_path_factory):
    """FreeU beside an IP-Adapter equals diffusers' pipeline with both; APG and FreeU together change the image
    from FreeU alone (both act in one call)."""
    repo = write_tiny_ip_adapter_repo(tmp_path_factory.mktemp("freeu-ip") / "h94-IP-Adapter", tiny.base)
    image = _photo(6)
    adapter = IPAdapter("plus", image, source=str(repo), scale=0.7)
    ours = generator.generate(PROMPT, guidance=5.0, conditions=[adapter, FreeU()], **RUN)
    pipe = sdxl_pipes[0]
    pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=VARIANTS["plus"].weights.split("/")[-1],
                         image_encoder_folder=VARIANTS["plus"].encoder)  # fmt: skip
    try:
        pipe.set_ip_adapter_scale(0.7)
        ref = _freeu(pipe, ip_adapter_image=image)
    finally:
        pipe.unload_ip_adapter()
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-4)
    both = generator.generate(PROMPT, guidance=5.0, conditions=[adapter, FreeU(), APG(eta=0.0)], **RUN)
    assert not torch.allclose(both.latents, ours.latents, atol=1e-4)


def test_freeu_acts_only_inside_its_window(generator):
    early = generator.generate(PROMPT, guidance=5.0, conditions=[FreeU(window=(0.0, 0.4))], **RUN)
    whole = generator.generate(PROMPT, guidance=5.0, conditions=[FreeU()], **RUN)
    plain = generator.generate(PROMPT, guidance=5.0, **RUN)
    assert not torch.allclose(early.latents, whole.latents, atol=1e-5)
    assert not torch.allclose(early.latents, plain.latents, atol=1e-5)


def test_the_a1111_text_holds_forges_freeu_items_and_our_apg_item():
    fields = FreeU(window=(0.0, 0.8)).infotext().fields
    assert (fields["freeu_enabled"], fields["freeu_b1"], fields["freeu_s2"], fields["freeu_end"]) == (
        "True",
        "1.3",
        "0.2",
        "0.8",
    )
    assert APG(eta=0.0, momentum=-0.5).infotext().fields == {"APG": "eta 0, threshold 15, momentum -0.5"}
