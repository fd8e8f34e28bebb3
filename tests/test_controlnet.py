"""ControlNet conditions equal diffusers' SDXL ControlNet pipelines on tiny models, and fail clearly on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    MultiControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from sdxl_control import ConditionError, IncompatibleModelError, InputError, Stage
from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
from sdxl_control.preprocessors import preprocess
from sdxl_control.testing import write_tiny_controlnet

from .conftest import as_reference

PROMPT = "a portrait of an astronaut"
RUN = dict(steps=8, size=(64, 64), seed=7, progress_bar=False)


@pytest.fixture(scope="module")
def nets(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    out = {name: write_tiny_controlnet(root / name, tiny.base, seed=i + 1) for i, name in enumerate("abc")}
    out["union"] = write_tiny_controlnet(root / "union", tiny.base, seed=9, union=True)
    return out


@pytest.fixture(scope="module")
def maps():
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut()).crop((0, 0, 512, 384))  # 4:3, resized to the square output
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    return {"edges": preprocess("canny", photo), "photo": photo.convert("RGB"), "noise": noise}


def run_diffusers(tiny, controlnet, images, *, union_modes=None, switch=None, **kwargs):
    generator = torch.Generator().manual_seed(7)
    if union_modes is None:
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny.base, controlnet=controlnet)
        extra = dict(image=images)
    else:
        pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(tiny.base, controlnet=controlnet)
        extra = dict(control_image=images, control_mode=union_modes)
    as_reference(pipe)
    common = dict(num_inference_steps=8, guidance_scale=5.0, generator=generator)
    with torch.no_grad():
        latents = pipe(
            PROMPT, height=64, width=64, output_type="latent", denoising_end=switch, **common, **extra, **kwargs
        ).images
        if switch is None:
            return latents
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny.refiner)
        as_reference(refiner)
        return refiner(PROMPT, image=latents, denoising_start=switch, output_type="latent", **common).images


def test_one_controlnet_matches_diffusers(generator, tiny, nets, maps):
    ours = generator.generate(
        PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"], scale=0.6, window=(0.0, 0.7))], **RUN
    )
    ref = run_diffusers(tiny, ControlNetModel.from_pretrained(nets["a"]), maps["edges"],
                        controlnet_conditioning_scale=0.6, control_guidance_start=0.0, control_guidance_end=0.7)  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)
    plain = generator.generate(PROMPT, **RUN)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)


def test_three_controlnets_match_multicontrolnet(generator, tiny, nets, maps):
    images = [maps["edges"], maps["photo"], maps["noise"]]
    scales, windows = [0.6, 0.8, 0.5], [(0.0, 0.7), (0.2, 1.0), (0.0, 1.0)]
    conditions = [
        ControlNet(nets[n], image=img, scale=s, window=w)
        for n, img, s, w in zip("abc", images, scales, windows, strict=True)
    ]
    ours = generator.generate(PROMPT, conditions=conditions, **RUN)
    multi = MultiControlNetModel([ControlNetModel.from_pretrained(nets[n]) for n in "abc"])
    ref = run_diffusers(tiny, multi, images, controlnet_conditioning_scale=scales,
                        control_guidance_start=[w[0] for w in windows], control_guidance_end=[w[1] for w in windows])  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_guess_mode_matches_diffusers(generator, tiny, nets, maps):
    ours = generator.generate(PROMPT, conditions=[ControlNet(nets["b"], image=maps["photo"], guess_mode=True)], **RUN)
    ref = run_diffusers(tiny, ControlNetModel.from_pretrained(nets["b"]), maps["photo"], guess_mode=True)
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_union_matches_diffusers(generator, tiny, nets, maps):
    condition = ControlNetUnion(nets["union"], depth=maps["photo"], canny=maps["edges"], scale=0.7)
    ours = generator.generate(PROMPT, conditions=[condition], **RUN)
    ref = run_diffusers(tiny, ControlNetUnionModel.from_pretrained(nets["union"]), [maps["photo"], maps["edges"]],
                        union_modes=[1, 3], controlnet_conditioning_scale=0.7)  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_controlnet_with_refiner_handoff_matches_two_pipelines(generator, tiny, nets, maps):
    condition = ControlNet(nets["a"], image=maps["edges"], scale=0.9, window=(0.0, 0.5))
    ours = generator.generate(PROMPT, conditions=[condition], refiner_switch=0.75, **RUN)
    ref = run_diffusers(tiny, ControlNetModel.from_pretrained(nets["a"]), maps["edges"], switch=0.75,
                        controlnet_conditioning_scale=0.9, control_guidance_start=0.0, control_guidance_end=0.5)  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_batch_with_one_control_image_each(generator, nets, maps):
    condition = ControlNet(nets["a"], image=[maps["edges"], maps["noise"]], scale=1.0)
    both = generator.generate(PROMPT, conditions=[condition], num_images=2, **RUN)
    first = generator.generate(PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"])], num_images=2, **RUN)
    torch.testing.assert_close(both.latents[0], first.latents[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both.latents[1], first.latents[1], atol=1e-3)


def test_plain_run_after_controlnet_equals_fresh(generator, nets, maps):
    before = {k: v.clone() for k, v in generator.base.unet.state_dict().items()}
    plain = generator.generate(PROMPT, **RUN)
    generator.generate(
        PROMPT,
        conditions=[ControlNet(nets["a"], image=maps["edges"]), ControlNetUnion(nets["union"], pose=maps["noise"])],
        **RUN,
    )
    assert torch.equal(generator.generate(PROMPT, **RUN).latents, plain.latents)
    assert all(torch.equal(before[k], v) for k, v in generator.base.unet.state_dict().items())


def test_sd15_controlnet_is_refused_with_sizes(generator, nets, maps, tmp_path):
    sd15 = shutil.copytree(nets["a"], tmp_path / "sd15-canny")
    config = json.loads((sd15 / "config.json").read_text())
    config["cross_attention_dim"] = 768
    (sd15 / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        IncompatibleModelError,
        match=r"sd15-canny: this ControlNet's cross-attention size is 768 \(an SD 1.5 ControlNet\), but the SDXL UNet expects 64",
    ):
        generator.generate(PROMPT, conditions=[ControlNet(sd15, image=maps["edges"])], **RUN)


def test_a_loaded_controlnet_is_checked_against_every_unet_it_meets(generator, nets):
    """The process keeps a ControlNet once loaded; a later call on another base whose UNet it does not fit is
    refused as a fresh load would be, not run into a shape error."""
    from diffusers import UNet2DConditionModel

    from sdxl_control.adapters.controlnet import load_controlnet
    from sdxl_control.testing import tiny_models

    assert load_controlnet(str(nets["a"]), union=False, unet=generator.base.unet) is not None
    wider = UNet2DConditionModel.from_pretrained(tiny_models(seed=0, text_width=64).base, subfolder="unet")
    with pytest.raises(IncompatibleModelError, match="cross-attention size is 64.*expects 128"):
        load_controlnet(str(nets["a"]), union=False, unet=wider)


def test_union_model_in_plain_controlnet_is_refused(generator, nets, maps):
    with pytest.raises(IncompatibleModelError, match="ControlNetUnionModel: use ControlNetUnion"):
        generator.generate(PROMPT, conditions=[ControlNet(nets["union"], image=maps["edges"])], **RUN)


@pytest.mark.parametrize(
    "condition, message",
    [
        (lambda n, m: ControlNet(n["a"], image=m["photo"], preprocess="sobel"), "unknown preprocessor 'sobel'"),
        (lambda n, m: ControlNet(n["a"], image=Image.new("RGB", (1, 1))), "1x1 pixels: too small"),
        (lambda n, m: ControlNet(n["a"], image=np.zeros((0, 0, 3), np.uint8)), "image array is empty"),
        (lambda n, m: ControlNet(n["a"], image=[m["edges"]] * 3), "3 control images for a batch of 2"),
        (lambda n, m: ControlNet(n["a"], image=m["edges"], stage=Stage.REFINER), "trained against the base UNet"),
        (lambda n, m: ControlNetUnion(n["union"], tile=m["photo"]), "needs a ProMax model"),
    ],
)
def test_bad_control_inputs(generator, nets, maps, condition, message):
    with pytest.raises(ConditionError, match=message):
        generator.generate(PROMPT, conditions=[condition(nets, maps)], num_images=2, refiner_switch=0.5, **RUN)


def test_missing_control_image_is_an_input_error(generator, nets):
    with pytest.raises(InputError, match="ControlNet image: no such file or folder /nonexistent.png"):
        generator.generate(PROMPT, conditions=[ControlNet(nets["a"], image="/nonexistent.png")], **RUN)


def test_union_needs_a_control():
    with pytest.raises(ConditionError, match="at least one control image"):
        ControlNetUnion("x/y")
    with pytest.raises(ConditionError, match="no depth= image"):
        ControlNetUnion("x/y", canny=Image.new("RGB", (8, 8)), preprocess=("depth",))


def _first_step_residuals(generator, conditions):
    seen = []

    def keep(module, args, kwargs):
        seen.append(kwargs.get("down_block_additional_residuals"))

    hook = generator.base.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        generator.generate(PROMPT, conditions=conditions, **{**RUN, "steps": 1})
    finally:
        hook.remove()
    return seen[0]


def test_a_controlnet_may_attend_to_its_own_tokens(generator, nets, maps):
    """The ControlNet channel's own tokens (what IdentityNet's face tokens use): the prompt's own embeddings given as
    tokens change nothing, other tokens change the result, and misfits are refused."""
    from sdxl_control import Tokens
    from sdxl_control.protocol.text import encode_prompts

    positive, negative = encode_prompts(generator.base.text_encoders, [PROMPT], None, need_negative=True,
                                        zero_negative=generator.base.force_zeros_for_empty_prompt)  # fmt: skip
    plain = generator.generate(PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"])], **RUN)
    same = Tokens(positive.hidden, negative.hidden)
    ours = generator.generate(PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"], context=same)], **RUN)
    assert torch.equal(ours.latents, plain.latents)
    other = Tokens(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), torch.zeros(16, 64))
    moved = generator.generate(PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"], context=other)], **RUN)
    assert not torch.allclose(moved.latents, plain.latents, atol=1e-3)
    with pytest.raises(ConditionError, match="attends to 64-wide tokens; context tokens are 32 wide"):
        generator.generate(
            PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"], context=Tokens(torch.zeros(4, 32)))], **RUN
        )
    with pytest.raises(ConditionError, match="classifier-free guidance needs unconditional tokens"):
        generator.generate(
            PROMPT, conditions=[ControlNet(nets["a"], image=maps["edges"], context=Tokens(torch.zeros(4, 64)))], **RUN
        )


def test_a_region_mask_limits_a_controlnet(generator, nets, maps):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    whole = _first_step_residuals(generator, [ControlNet(nets["a"], image=maps["edges"])])
    masked = _first_step_residuals(generator, [ControlNet(nets["a"], image=maps["edges"], mask=Image.fromarray(mask))])
    for full, part in zip(whole, masked, strict=True):
        half = full.shape[-1] // 2
        assert part[..., half:].abs().max() == 0  # nothing on the right
        torch.testing.assert_close(part[..., :half], full[..., :half])  # the left as without the mask
