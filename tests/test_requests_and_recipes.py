"""Requests are validated; results are reproducible; PNGs carry a recipe that re-makes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import ConditionError, GenerationRequest, InvalidRequestError, read_recipe
from sdxl_control.engine.vae import decode_latents

ARGS = dict(steps=5, size=(64, 64), progress_bar=False)


def pixels(image):
    return np.asarray(image, dtype=np.uint8)


def test_same_recipe_and_seed_give_identical_pixels(generator):
    a = generator.generate("a lighthouse", seed=42, refiner_switch=0.6, **ARGS)
    b = generator.generate("a lighthouse", seed=42, refiner_switch=0.6, **ARGS)
    c = generator.generate("a lighthouse", seed=43, refiner_switch=0.6, **ARGS)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def test_png_recipe_round_trips_and_reproduces(generator, tmp_path):
    result = generator.generate(
        "a lighthouse", negative_prompt="fog", seed=9, refiner_switch=0.6, scheduler="dpmpp_2m", **ARGS
    )
    path = tmp_path / "out.png"
    result.images[0].save(path)
    recipe = read_recipe(path)
    assert recipe == json.loads(json.dumps(result.images[0].recipe))
    assert (
        recipe["seed"] == 9
        and recipe["refiner_switch"] == 0.6
        and recipe["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    )
    assert recipe["models"]["base"]["unet_sha256"] and recipe["models"]["refiner"]["tiny_seed"] == 0
    text = Image.open(path).info["parameters"]
    assert text.startswith(
        "a lighthouse\nNegative prompt: fog\nSteps: 5, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 9, Size: 64x64, "
        "Model: base, Refiner: refiner, Refiner switch at: 0.6"
    )
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert np.array_equal(pixels(again.images[0]), pixels(Image.open(path).convert("RGB")))


def test_an_image_pickles_with_its_recipe(generator):
    """A generated image sent to another process (a Ray replica's answer) keeps its recipe and its PNG texts."""
    import pickle

    image = generator.generate("a lighthouse", seed=4, **ARGS).images[0]
    copy = pickle.loads(pickle.dumps(image))
    assert type(copy) is type(image) and copy.recipe == image.recipe and copy.info == image.info
    assert np.array_equal(pixels(copy), pixels(image))


def test_recipe_of_a_batch_image_names_its_own_seed(generator):
    result = generator.generate("a lighthouse", seed=100, num_images=3, **ARGS)
    assert [r["seed"] for r in result.recipes] == [100, 101, 102]
    recipe = result.recipes[2]
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert np.array_equal(pixels(again.images[recipe["batch_index"]]), pixels(result.images[2]))


def test_random_seed_is_drawn_and_recorded(generator):
    result = generator.generate("a lighthouse", **ARGS)
    assert isinstance(result.recipes[0]["seed"], int)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(size=(60, 64)), "multiples of 8"),
        (dict(size=(0, 64)), "multiples of 8"),
        (dict(steps=0), "steps must be"),
        (dict(refiner_switch=1.0), "strictly between 0 and 1"),
        (dict(refiner_switch=0.0), "strictly between 0 and 1"),
        (dict(num_images=0), "num_images"),
        (dict(guidance=-1.0), "guidance"),
        (dict(scheduler="warp-drive"), "unknown scheduler 'warp-drive'"),
    ],
)
def test_bad_requests_are_refused(generator, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        generator.generate("x", **{**ARGS, **options})


def test_switch_that_leaves_a_stage_no_step(generator):
    with pytest.raises(InvalidRequestError, match="leaves the base no step"):
        generator.generate("x", steps=2, refiner_switch=0.4, size=(64, 64), progress_bar=False)


def test_switch_without_refiner(tiny):
    from sdxl_control import Generator

    gen = Generator.from_pretrained(tiny.base, device="cpu")
    with pytest.raises(InvalidRequestError, match="no refiner is loaded"):
        gen.generate("x", refiner_switch=0.5, **ARGS)


def test_recipe_conditions_with_in_memory_inputs_need_them_again():
    from sdxl_control.adapters import condition_from_settings

    settings = {"kind": "controlnet", "model": "m", "image": {"image": [64, 64], "mode": "RGB"}}
    with pytest.raises(ConditionError, match="controlnet condition got its image as an in-memory image"):
        condition_from_settings(settings)
    with pytest.raises(ConditionError, match="unknown condition kind 'warp'"):
        condition_from_settings({"kind": "warp"})


def test_progress_reports_every_step_of_both_stages(generator):
    events = []
    generator.generate("x", steps=8, refiner_switch=0.75, size=(64, 64), progress=events.append, progress_bar=False)
    assert [e.index for e in events] == list(range(8))
    assert [e.stage.label for e in events] == ["base"] * 6 + ["refiner"] * 2
    assert all(e.total == 8 for e in events)


def test_fp16_vae_is_decoded_in_fp32_and_left_as_it_was(generator):
    vae = generator.base.vae
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = decode_latents(vae, latents)
    fp32 = {k: v.clone() for k, v in vae.state_dict().items()}  # the session's VAE: fp16 and back is not lossless
    vae.to(torch.float16)
    try:
        state = {k: v.clone() for k, v in vae.state_dict().items()}
        upcast = decode_latents(vae, latents)
        assert vae.dtype == torch.float16
        assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    finally:
        vae.to(torch.float32)
        vae.load_state_dict(fp32)
    # fp32 decode of fp16-rounded weights: close to the fp32 reference, not fp16-coarse.
    torch.testing.assert_close(upcast, reference, rtol=0, atol=2e-2)
