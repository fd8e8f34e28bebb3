"""Our loop equals diffusers' SDXL pipelines: base alone, and base -> refiner via denoising_end/denoising_start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

PROMPT = "a portrait of an astronaut, studio light"
SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}


@torch.no_grad()
def reference(sdxl_pipes, scheduler, switch, guidance, seeds, negative=None, steps=8, size=64):
    base, refiner = sdxl_pipes
    base.scheduler = SCHEDULERS[scheduler].from_config(base.scheduler.config)
    refiner.scheduler = SCHEDULERS[scheduler].from_config(refiner.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    common = dict(
        num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative, generator=generators,
        num_images_per_prompt=len(seeds),
    )  # fmt: skip
    if switch is None:
        out = base(PROMPT, height=size, width=size, output_type="latent", **common)
        latents = out.images
        pixels = base.image_processor.postprocess(base.vae.decode(latents / base.vae.config.scaling_factor).sample)
        return latents, pixels
    latents = base(PROMPT, height=size, width=size, denoising_end=switch, output_type="latent", **common).images
    final = refiner(PROMPT, image=latents, denoising_start=switch, output_type="latent", **common).images
    pixels = refiner.image_processor.postprocess(refiner.vae.decode(final / refiner.vae.config.scaling_factor).sample)
    return final, pixels


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("switch", [None, 0.5, 0.8])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_matches_diffusers(generator, sdxl_pipes, scheduler, switch, guidance):
    ours = generator.generate(
        PROMPT, steps=8, guidance=guidance, refiner_switch=switch, size=(64, 64), seed=7, scheduler=scheduler,
        progress_bar=False,
    )  # fmt: skip
    ref_latents, ref_images = reference(sdxl_pipes, scheduler, switch, guidance, seeds=[7])
    torch.testing.assert_close(ours.latents, ref_latents, rtol=1e-4, atol=1e-5)
    diff = np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(ref_images[0], dtype=int))
    assert diff.max() <= 1


def test_batch_with_per_image_seeds_and_negative_prompt(generator, sdxl_pipes):
    ours = generator.generate(
        PROMPT, negative_prompt="blurry", steps=6, refiner_switch=0.7, size=(64, 64), seed=11, num_images=2,
        progress_bar=False,
    )  # fmt: skip
    ref_latents, _ = reference(sdxl_pipes, "euler", 0.7, 5.0, seeds=[11, 12], negative="blurry", steps=6)
    torch.testing.assert_close(ours.latents, ref_latents, rtol=1e-4, atol=1e-5)
    assert [r["seed"] for r in ours.recipes] == [11, 12]


def test_switch_changes_the_result(generator):
    a = generator.generate(PROMPT, steps=6, refiner_switch=0.5, size=(64, 64), seed=1, progress_bar=False)
    b = generator.generate(PROMPT, steps=6, refiner_switch=0.8, size=(64, 64), seed=1, progress_bar=False)
    c = generator.generate(PROMPT, steps=6, size=(64, 64), seed=1, progress_bar=False)
    assert not torch.allclose(a.latents, b.latents)
    assert not torch.allclose(b.latents, c.latents)
