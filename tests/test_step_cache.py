"""Step caching equals DeepCache's own helper (``DeepCacheSDHelper`` from the ``DeepCache`` package, wrapping
diffusers' SDXL pipelines) on the tiny models: base alone, base -> refiner, several intervals and branches, with a
ControlNet; off is absent bit for bit; the models are as before after any call; the recipe re-makes the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from sdxl_control import GenerationRequest, InvalidRequestError
from sdxl_control.engine.step_cache import cached_steps, reused_modules

from .conftest import as_reference

DeepCache = pytest.importorskip("DeepCache")

PROMPT = "a portrait of an astronaut, studio light"
RUN = dict(steps=7, size=(64, 64), seed=5, guidance=5.0, negative_prompt="blurry", progress_bar=False)


def _helped(pipe, interval, branch):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return helper


@torch.no_grad()
def reference(sdxl_pipes, interval, branch, switch):
    base, refiner = sdxl_pipes
    common = dict(num_inference_steps=RUN["steps"], guidance_scale=RUN["guidance"],
                  negative_prompt=RUN["negative_prompt"], generator=[torch.Generator().manual_seed(RUN["seed"])])  # fmt: skip
    helpers = [_helped(base, interval, branch)] + ([_helped(refiner, interval, branch)] if switch else [])
    try:
        if switch is None:
            return base(PROMPT, height=64, width=64, output_type="latent", **common).images
        latents = base(PROMPT, height=64, width=64, denoising_end=switch, output_type="latent", **common).images
        return refiner(PROMPT, image=latents, denoising_start=switch, output_type="latent", **common).images
    finally:
        for helper in helpers:
            helper.disable()


@pytest.mark.parametrize(
    ("interval", "branch", "switch"),
    [(3, 0, None), (2, 0, None), (5, 0, None), (3, 1, None), (3, 3, None), (2, 5, None), (3, 0, 0.6), (2, 4, 0.6)],
)
def test_equals_deepcache(generator, sdxl_pipes, interval, branch, switch):
    ours = generator.generate(PROMPT, refiner_switch=switch, step_cache=interval, step_cache_branch=branch, **RUN)
    plain = generator.generate(PROMPT, refiner_switch=switch, **RUN)
    theirs = reference(sdxl_pipes, interval, branch, switch)
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-4, atol=1e-5)
    assert (ours.latents - plain.latents).abs().max() > 1e-3  # the cache changed something, as the reference's did


def test_equals_deepcache_with_a_controlnet(tiny, generator, tmp_path):
    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.testing import write_tiny_controlnet

    folder = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=4)
    edges = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    ours = generator.generate(PROMPT, conditions=[ControlNet(str(folder), image=edges, scale=0.8)], step_cache=3, **RUN)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny.base, controlnet=ControlNetModel.from_pretrained(folder)
    )
    as_reference(pipe)
    helper = _helped(pipe, 3, 0)
    try:
        with torch.no_grad():
            theirs = pipe(PROMPT, image=edges, controlnet_conditioning_scale=0.8, num_inference_steps=RUN["steps"],
                          guidance_scale=RUN["guidance"], negative_prompt=RUN["negative_prompt"], height=64, width=64,
                          generator=[torch.Generator().manual_seed(RUN["seed"])], output_type="latent").images  # fmt: skip
    finally:
        helper.disable()
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-4, atol=1e-5)


def _instance_forwards(unet):
    return [name for name, m in unet.named_modules() if "forward" in m.__dict__]


def test_off_is_absent_and_the_models_are_as_before(generator):
    plain = generator.generate(PROMPT, **RUN)
    off = generator.generate(PROMPT, step_cache=1, **RUN)
    with pytest.raises(InvalidRequestError, match=r"step_cache_branch \(--step-cache-branch\) 4 .* step_cache is 1"):
        generator.generate(PROMPT, step_cache=1, step_cache_branch=4, **RUN)  # a branch with nothing cached
    assert torch.equal(plain.latents, off.latents)
    assert "step_cache" not in plain.recipes[0] and "step_cache" not in off.recipes[0]
    generator.generate(PROMPT, step_cache=3, **RUN)
    assert _instance_forwards(generator.base.unet) == []

    def fail(event):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generator.generate(PROMPT, step_cache=2, progress=fail, **RUN)
    assert _instance_forwards(generator.base.unet) == []


def test_the_recipe_remakes_a_cached_image(generator):
    made = generator.generate(PROMPT, step_cache=3, step_cache_branch=1, **RUN)
    recipe = made.recipes[0]
    assert (recipe["step_cache"], recipe["step_cache_branch"]) == (3, 1)
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert torch.equal(made.latents, again.latents)


def test_reused_modules_follow_deepcaches_numbering(generator):
    unet = generator.base.unet  # SDXL's levels: 2 ResNets per down block, 3 per up block
    down, up = unet.down_blocks, unet.up_blocks
    assert set(map(id, reused_modules(unet, 0))) == set(map(id, [unet.mid_block, *down, *up[:2], *up[2].resnets[:2]]))
    branch_4 = [unet.mid_block, down[2], *up[:1], down[1].resnets[1], down[1].attentions[1], *down[1].downsamplers,
                up[1].resnets[0], up[1].attentions[0]]  # fmt: skip
    assert set(map(id, reused_modules(unet, 4))) == set(map(id, branch_4))
    with pytest.raises(InvalidRequestError, match="beyond this UNet's 9 skip branches"):
        reused_modules(unet, 9)
    with cached_steps(unet, None) as steps:
        steps.at(1)
        assert _instance_forwards(unet) == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"step_cache": 0}, "step_cache must be a whole number of steps >= 1"),
    ({"step_cache": 2.5}, "step_cache must be"),
    ({"step_cache_branch": -1}, "step_cache_branch must be a whole number >= 0"),
])  # fmt: skip
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, **fields)


def test_a_branch_beyond_the_unet_is_refused_before_any_step(generator):
    with pytest.raises(InvalidRequestError, match="beyond this UNet's"):
        generator.generate(PROMPT, step_cache=2, step_cache_branch=12, **RUN)
    assert _instance_forwards(generator.base.unet) == []
