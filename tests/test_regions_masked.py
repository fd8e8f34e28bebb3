"""Regional prompts by masked conditioning (``Region(mode="masked")``), as ComfyUI computes a list of conditionings.

ComfyUI (Comfy-Org/ComfyUI @ a125cd84b054a57729b5eecab930ca9408719832, comfy/samplers.py ``get_area_and_mult`` and
``_calc_cond_batch``) predicts every conditioning of the prompt list and averages the predictions per pixel,
``sum(mult * p) / (1e-37 + sum(mult))`` with ``mult = mask * strength``; the negative list the same way. A workflow
that ConditioningCombine's the prompt (no mask: mult 1) with masked regions gives the request's prompt weight 1
everywhere. ``sdxl_control.protocol.guidance._blended`` was checked against that real ``_calc_cond_batch``, run in a
scratch folder outside the repository with a stand-in model on random tensors (a prompt, two masked regions of
strengths 0.7 and 1.5, a masked negative): equal to 1.2e-7 (the order of the sums). ComfyUI averages the denoised
estimates; they are affine in the noise prediction with the same coefficients for every conditioning, so averaging the
noise predictions is the same where the weights' sum is above 0 — always here, the prompt covering every pixel.

The loop is checked against a reference written here from diffusers' own pieces (its ``encode_prompt``, UNet and
scheduler, as ``StableDiffusionXLPipeline`` runs them) with that average in place of its CFG input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sdxl_control import ConditionError, GenerationRequest
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.regions import Region
from sdxl_control.protocol.conditions import Crop
from sdxl_control.protocol.guidance import Blend, _blended
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

PROMPT = "a cat on a sofa"
STEPS = 4
RUN = dict(steps=STEPS, size=(64, 64), seed=3, progress_bar=False, guidance=5.0)
CLOSE = dict(rtol=1e-4, atol=1e-5)


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _soft_mask(size: int = 64) -> Image.Image:
    """A soft left-to-right ramp: grey levels, not binarised (ComfyUI reads a mask's grey levels as weights)."""
    ramp = np.tile(np.linspace(255, 0, size), (size, 1)).astype(np.uint8)
    return Image.fromarray(ramp, "L")


def comfy_average(base: torch.Tensor, weighed: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A transcription of _calc_cond_batch's average for one list: sums from 0 and counts from 1e-37."""
    out, counts = torch.zeros_like(base), torch.ones_like(base) * 1e-37
    for mult, prediction in [(torch.ones_like(base), base), *weighed]:
        out += prediction * mult
        counts += mult
    return out / counts


def test_the_blend_is_comfyuis_average_overlaps_included():
    g = torch.Generator().manual_seed(0)
    base, r1, r2, neg, rn = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(5))
    w1, w2 = torch.rand(1, 1, 8, 8, generator=g) * 0.7, torch.ones(1, 1, 8, 8) * 1.5  # overlapping everywhere
    uncond, cond = _blended(neg, base, [Blend(w1, r1, rn), Blend(w2, r2)])
    torch.testing.assert_close(cond, comfy_average(base, [(w1, r1), (w2, r2)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, comfy_average(neg, [(w1, rn)]), rtol=0, atol=1e-6)
    # Where regions overlap, each prediction counts by its weight: (base + 0.7 r1 + 1.5 r2) / 3.2 at full weight.


def reference(pipe, region_prompt: str | None, weight: torch.Tensor | None) -> torch.Tensor:
    """diffusers' SDXL loop (its encode_prompt, UNet, scheduler) with ComfyUI's average of the prompt's and the
    region's noise predictions before CFG."""
    from diffusers import EulerDiscreteScheduler

    device = torch.device("cpu")
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=None)  # fmt: skip
    rows = [neg, pos]
    pools = [neg_pooled, pooled]
    if region_prompt is not None:
        r_pos, _, r_pooled, _ = pipe.encode_prompt(region_prompt, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)  # fmt: skip
        rows.append(r_pos)
        pools.append(r_pooled)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=pos.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)  # fmt: skip
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * len(rows)), t)
            eps = pipe.unet(x, t, encoder_hidden_states=torch.cat(rows),
                            added_cond_kwargs={"text_embeds": torch.cat(pools), "time_ids": ids.repeat(len(rows), 1)},
                            return_dict=False)[0]  # fmt: skip
            uncond, cond, *region = eps.chunk(len(rows))
            if region:
                cond = comfy_average(cond, [(weight, region[0])])
            latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
    return latents


def test_a_region_equals_the_reference_loop(generator, sdxl_pipes):
    pipe = sdxl_pipes[0]
    # The reference loop without a region is diffusers' own pipeline: it is the loop the region's test trusts.
    with torch.no_grad():
        plain = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(3), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(reference(pipe, None, None), plain, **CLOSE)
    region = Region("a dog in a red coat", mask=_soft_mask(), scale=0.8)
    ours = generator.generate(PROMPT, conditions=[region], **RUN)
    weight = region.weight((64, 64))
    torch.testing.assert_close(ours.latents, reference(pipe, "a dog in a red coat", weight), **CLOSE)
    assert not torch.allclose(ours.latents, plain, atol=1e-3)


def test_a_region_over_the_whole_image_with_the_prompts_own_text_is_the_prompt(generator):
    plain = generator.generate(PROMPT, **RUN)
    for region in (Region(PROMPT, box=(0.0, 0.0, 1.0, 1.0)), Region(PROMPT, mask=Image.new("L", (64, 64), 255))):
        torch.testing.assert_close(generator.generate(PROMPT, conditions=[region], **RUN).latents, plain.latents,
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_box_weights_and_the_regions_own_negative(generator):
    weight = Region("x", box=(0.0, 0.0, 0.5, 1.0), scale=0.5).weight((64, 96))
    assert weight.shape == (1, 1, 12, 8) and weight[..., :4].eq(0.5).all() and weight[..., 4:].eq(0).all()
    plain = generator.generate(PROMPT, **RUN)
    left = generator.generate(PROMPT, conditions=[Region("a dog", box=(0.0, 0.0, 0.5, 1.0))], **RUN)
    negative = generator.generate(PROMPT, conditions=[Region("a dog", box=(0.0, 0.0, 0.5, 1.0),
                                                             negative_prompt="blurry, dark")], **RUN)  # fmt: skip
    assert not torch.allclose(left.latents, plain.latents, atol=1e-3)
    assert not torch.allclose(negative.latents, left.latents, atol=1e-4)
    # The left half is the region's; the right half changes far less (only through the UNet's reach).
    change = (left.latents - plain.latents).abs()
    assert change[..., :4].mean() > 2 * change[..., 4:].mean()


def test_regions_stack_with_a_controlnet_an_ip_adapter_and_the_refiner(generator, tiny, tmp_path_factory):
    net = write_tiny_controlnet(tmp_path_factory.mktemp("region-cn") / "net", tiny.base, seed=4)
    repo = write_tiny_ip_adapter_repo(tmp_path_factory.mktemp("region-ip") / "h94-IP-Adapter", tiny.base)
    others = [ControlNet(net, image=_photo(5), scale=0.8), IPAdapter("plus", _photo(6), source=str(repo), scale=0.6)]
    region = Region("a dog", box=(0.0, 0.0, 0.5, 1.0))
    without = generator.generate(PROMPT, conditions=others, **RUN)
    absent = generator.generate(PROMPT, conditions=[*others, Region("a dog", box=(0.0, 0.0, 0.5, 1.0), scale=0.0)],
                                **RUN)  # fmt: skip
    assert torch.equal(absent.latents, without.latents)
    together = generator.generate(PROMPT, conditions=[*others, region], **RUN)
    assert not torch.allclose(together.latents, without.latents, atol=1e-3)
    base_only = generator.generate(PROMPT, conditions=[region], refiner_switch=0.5, **RUN)
    both = generator.generate(PROMPT, conditions=[Region("a dog", box=(0.0, 0.0, 0.5, 1.0), stage="both")],
                              refiner_switch=0.5, **RUN)  # fmt: skip
    assert not torch.allclose(both.latents, base_only.latents, atol=1e-4)


def test_the_rows_each_step_runs(generator):
    """One UNet call a step: [negative, prompt] plus the region's prompt (and its negative), only where it acts."""
    calls: list[int] = []
    hook = generator.base.unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    try:
        generator.generate(PROMPT, conditions=[Region("a dog", box=(0.0, 0.0, 0.5, 1.0), negative_prompt="blurry",
                                                      window=(0.5, 1.0))], num_images=2, **RUN)  # fmt: skip
    finally:
        hook.remove()
    assert calls == [4, 4, 8, 8]


def test_bad_regions_are_refused_or_stated(generator, caplog):
    with pytest.raises(ConditionError, match="a mask or a box"):
        Region("a dog")
    with pytest.raises(ConditionError, match="box is"):
        Region("a dog", box=(0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ConditionError, match="mask is empty"):
        generator.generate(PROMPT, conditions=[Region("a dog", mask=Image.new("L", (64, 64), 0))], **RUN)
    with caplog.at_level(logging.INFO, logger="sdxl_control.adapters.regions"):
        generator.generate(PROMPT, conditions=[Region("a dog", mask=_soft_mask(128))], **RUN)
    assert "Region mask of 128x128 resized to the 64x64 image" in caplog.text


def test_the_recipe_re_makes_a_region_with_a_mask_file(generator, tmp_path):
    path = tmp_path / "left.png"
    _soft_mask().save(path)
    made = generator.generate(PROMPT, conditions=[Region("a dog", mask=str(path), window=(0.0, 0.75))], **RUN)
    recipe = made.images[0].recipe
    assert recipe["conditions"][0]["kind"] == "region" and recipe["conditions"][0]["prompt"] == "a dog"
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert again.images[0].tobytes() == made.images[0].tobytes()


def test_a_crop_takes_the_part_of_the_box_it_holds():
    region = Region("a dog", box=(0.0, 0.0, 0.5, 1.0))
    crop = Crop((16, 0, 48, 32), (64, 64), (64, 64))
    assert region.in_crop(crop).box == (0.0, 0.0, 0.5, 1.0)
    assert region.in_crop(Crop((40, 0, 64, 32), (64, 64), (64, 64))) is None
