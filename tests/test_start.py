"""Images that start from an image, in the one loop: image-to-image (base alone and base -> refiner) and inpainting
(a regular UNet, and an inpainting UNet with 9 input channels) equal to diffusers' SDXL pipelines on the tiny models,
bit for bit; the area outside a mask keeps the original's latents; recipes name the images by content and re-make
the pixels; bad inputs are refused before anything runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from sdxl_control import GenerationRequest, Generator
from sdxl_control.base.errors import IncompatibleModelError, InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.records.recipe import parameters_text, read_recipe
from sdxl_control.testing.tiny import write_tiny_base

from .conftest import as_reference

PROMPT = "a lighthouse at dusk"
SIZE = 64


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("start")
    init = folder / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_equals_diffusers(generator, sdxl_pipes, pictures, scheduler, strength):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipes[0])
    cls = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    seeds = [7, 8]
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), strength=strength, steps=8,
                              size=(SIZE, SIZE), seed=7, num_images=2, scheduler=scheduler, progress_bar=False)  # fmt: skip
    ref = pipe(PROMPT, image=Image.open(pictures / "init.png"), strength=strength, num_inference_steps=8,
               guidance_scale=5.0, generator=_generators(seeds), num_images_per_prompt=2, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)


def test_img2img_hands_off_to_the_refiner_as_diffusers_does(generator, sdxl_pipes, pictures):
    base, refiner = sdxl_pipes
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), strength=0.6, steps=10,
                              refiner_switch=0.8, size=(SIZE, SIZE), seed=3, progress_bar=False)  # fmt: skip
    gens = _generators([3])
    common = {"num_inference_steps": 10, "guidance_scale": 5.0, "generator": gens, "output_type": "latent"}
    handed = img2img(PROMPT, image=Image.open(pictures / "init.png"), strength=0.6, denoising_end=0.8, **common).images
    ref = refiner(PROMPT, image=handed, denoising_start=0.8, **common).images
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_regular_unet_equals_diffusers(generator, sdxl_pipes, pictures, strength):
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                              strength=strength, steps=8, size=(SIZE, SIZE), seed=5, num_images=2, progress_bar=False)  # fmt: skip
    ref = pipe(PROMPT, image=Image.open(pictures / "init.png"), mask_image=Image.open(pictures / "mask.png"),
               strength=strength, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=5.0,
               generator=_generators([5, 6]), num_images_per_prompt=2, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)


def test_inpainting_with_an_ancestral_sampler_draws_as_diffusers_does(generator, sdxl_pipes, pictures):
    """Euler ancestral draws noise at every step, after the pipeline's encodes: equal only if the draws before it
    (the masked image's encode too, which a regular UNet never reads) are the same."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                              steps=6, size=(SIZE, SIZE), seed=5, scheduler="euler_a", progress_bar=False)  # fmt: skip
    ref = pipe(PROMPT, image=Image.open(pictures / "init.png"), mask_image=Image.open(pictures / "mask.png"),
               strength=1.0, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
               generator=_generators([5]), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)


def test_outside_the_mask_the_result_is_the_original(generator, pictures):
    """A regular UNet's last step puts the original's latents back outside the mask: they are the init image's own
    (encoded as the first image's generator draws them), exactly."""
    from diffusers.image_processor import VaeImageProcessor

    from sdxl_control.engine.vae import encode_pixels

    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                              steps=6, size=(SIZE, SIZE), seed=9, progress_bar=False)  # fmt: skip
    pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.open(pictures / "init.png"))
    original = encode_pixels(generator.base.vae, pixels, torch.Generator().manual_seed(9), torch.float32)
    keep = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(Image.open(pictures / "mask.png")) < 128).float()[None, None], size=(8, 8)
    )
    assert torch.equal(ours.latents * keep, original * keep)
    assert not torch.equal(ours.latents * (1 - keep), original * (1 - keep))


def test_paste_back_is_diffusers_overlay_of_the_plain_result(generator, pictures):
    """``paste_back`` (A1111's inpainting, which pastes the original back outside the feathered mask) is diffusers'
    ``VaeImageProcessor.apply_overlay`` of the result without it, with the same blurred mask: every pixel outside the
    mask is the init image's own. Without a mask it is refused, naming what to give."""
    from diffusers.image_processor import VaeImageProcessor

    from sdxl_control.engine.start import read_mask

    args = dict(init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"), mask_blur=3, steps=4,
                size=(SIZE, SIZE), seed=9, progress_bar=False)  # fmt: skip
    plain = generator.generate(PROMPT, **args).images[0]
    pasted = generator.generate(PROMPT, paste_back=True, **args).images[0]
    init = Image.open(pictures / "init.png").convert("RGB")
    mask = read_mask(str(pictures / "mask.png"), (SIZE, SIZE), 3)
    expected = VaeImageProcessor(vae_scale_factor=8).apply_overlay(mask, init, plain)
    assert np.array_equal(np.asarray(pasted), np.asarray(expected))
    outside = np.asarray(mask) == 0
    assert outside.any() and np.array_equal(np.asarray(pasted)[outside], np.asarray(init)[outside])
    assert not np.array_equal(np.asarray(plain)[outside], np.asarray(init)[outside])
    assert pasted.recipe["paste_back"] is True and "paste_back" not in plain.recipe
    with pytest.raises(InvalidRequestError, match="paste_back pastes the init image back outside a mask: give a mask"):
        GenerationRequest(PROMPT, init_image=str(pictures / "init.png"), paste_back=True)


@pytest.fixture(scope="module")
def inpainting_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("inpainting") / "base", seed=2, inpainting=True)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_an_inpainting_unet_equals_diffusers(inpainting_base, pictures, strength):
    ours = Generator.from_pretrained(inpainting_base, device="cpu").generate(
        PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"), strength=strength, steps=8,
        size=(SIZE, SIZE), seed=4, num_images=2, progress_bar=False,
    )  # fmt: skip
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(inpainting_base)
    as_reference(pipe)
    ref = pipe(PROMPT, image=Image.open(pictures / "init.png"), mask_image=Image.open(pictures / "mask.png"),
               strength=strength, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=5.0,
               generator=_generators([4, 5]), num_images_per_prompt=2, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)
    with pytest.raises(IncompatibleModelError, match="inpainting UNet"):
        Generator.from_pretrained(inpainting_base, device="cpu").generate(PROMPT, size=(SIZE, SIZE), steps=2)


@pytest.mark.parametrize("inpainting_unet", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_hands_off_to_the_refiner_as_diffusers_does(
    tiny, generator, sdxl_pipes, inpainting_base, pictures, strength, inpainting_unet
):
    """diffusers' refiner inpainting: the refiner pipeline is handed the base's latents (``denoising_start``) and the
    mask, and puts those latents back outside the mask, noised with noise of its own."""
    if inpainting_unet:
        ours_gen = Generator.from_pretrained(inpainting_base, tiny.refiner, device="cpu")
        base = StableDiffusionXLInpaintPipeline.from_pretrained(inpainting_base)
        as_reference(base)
    else:
        ours_gen, base = generator, StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    refiner = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[1])
    init, mask = Image.open(pictures / "init.png"), Image.open(pictures / "mask.png")
    ours = ours_gen.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                             strength=strength, steps=10, refiner_switch=0.8, size=(SIZE, SIZE), seed=5, num_images=2,
                             progress_bar=False)  # fmt: skip
    common = {"num_inference_steps": 10, "guidance_scale": 5.0, "generator": _generators([5, 6]), "height": SIZE,
              "width": SIZE, "num_images_per_prompt": 2, "output_type": "latent"}  # fmt: skip
    handed = base(PROMPT, image=init, mask_image=mask, strength=strength, denoising_end=0.8, **common).images
    ref = refiner(PROMPT, image=handed, mask_image=mask, denoising_start=0.8, **common).images
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)
    base_alone = ours_gen.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                                   strength=strength, steps=10, size=(SIZE, SIZE), seed=5, num_images=2,
                                   progress_bar=False)  # fmt: skip
    assert not torch.equal(ours.latents, base_alone.latents)


def test_the_steps_run_are_the_entered_part_and_windows_count_them(generator, pictures):
    events = []
    generator.generate(PROMPT, init_image=str(pictures / "init.png"), strength=0.5, steps=10, size=(SIZE, SIZE),
                       seed=1, progress=events.append, progress_bar=False)  # fmt: skip
    assert [(e.step, e.steps, e.index, e.total) for e in events] == [(k + 1, 5, k, 5) for k in range(5)]


def test_the_cli_recipe_names_the_images_by_content_and_re_makes_the_pixels(tiny, pictures, tmp_path):
    out, again = tmp_path / "paint.png", tmp_path / "again.png"
    args = ["generate", PROMPT, "--tiny", "--size", f"{SIZE}x{SIZE}", "--steps", "6", "--seed", "2", "-q",
            "--init-image", str(pictures / "init.png"), "--mask", str(pictures / "mask.png"), "--strength", "0.8",
            "--mask-blur", "2"]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    recipe = read_recipe(out)
    assert recipe["init_image"]["file"] == "init.png" and len(recipe["init_image"]["sha256"]) == 64
    assert (recipe["mask"]["file"], recipe["strength"], recipe["mask_blur"]) == ("mask.png", 0.8, 2)
    assert "path" not in recipe["init_image"]  # no private path by default
    text = Image.open(out).info["parameters"]
    assert "Denoising strength: 0.8" in text and "Mask blur: 2" in text
    assert main(["generate", "--recipe", str(out), "--inputs-from", str(pictures), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_a_text_to_image_recipe_records_no_start_fields(generator):
    recipe = generator.generate(PROMPT, steps=2, size=(SIZE, SIZE), seed=1, progress_bar=False).recipes[0]
    assert not {"init_image", "strength", "mask", "mask_blur"} & set(recipe)
    assert "Denoising strength" not in parameters_text(recipe)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strength": 0.5}, "strength is for a request that starts from an image"),
        ({"mask": "IMG"}, "mask is for a request that starts from an image"),
        ({"init_image": "IMG", "strength": 0.0}, "strength 0 keeps the init image as it is: give a hires fix"),
        ({"init_image": "IMG", "strength": 1.5}, r"strength must lie in \[0, 1\]"),
        ({"init_image": "IMG", "strength": -0.1}, r"strength must lie in \[0, 1\]"),
        ({"init_image": "IMG", "mask": "IMG", "mask_blur": -1}, "mask_blur is a radius"),
        ({"init_image": "IMG", "mask": "IMG", "padding_mask_crop": 8, "refiner_switch": 0.8}, "base alone"),
    ],
)
def test_bad_start_requests_are_refused(pictures, options, message):
    options = {k: str(pictures / "init.png") if v == "IMG" else v for k, v in options.items()}
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, **options)


def test_an_all_black_mask_and_a_mask_of_another_size(generator, pictures, tmp_path, caplog):
    black = tmp_path / "black.png"
    Image.new("L", (SIZE, SIZE)).save(black)
    with pytest.raises(InvalidRequestError, match=r"black.png: nothing to repaint"):
        generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(black), steps=2,
                           size=(SIZE, SIZE), progress_bar=False)  # fmt: skip
    big = tmp_path / "big.png"
    Image.open(pictures / "mask.png").resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST).save(big)
    with caplog.at_level(logging.WARNING):
        resized = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(big), steps=3,
                                     size=(SIZE, SIZE), seed=2, progress_bar=False)  # fmt: skip
    assert "resized to its init image's 64x64" in caplog.text
    same = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"), steps=3,
                              size=(SIZE, SIZE), seed=2, progress_bar=False)  # fmt: skip
    assert torch.equal(resized.latents, same.latents)


def test_an_init_image_of_another_aspect_is_cropped_not_stretched(generator, tmp_path, caplog):
    wide = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    wide[:, SIZE // 2 : SIZE // 2 + SIZE] = 200  # the centre square is light, the sides dark
    Image.fromarray(wide).save(tmp_path / "wide.png")
    from sdxl_control.engine.start import read_init_image

    with caplog.at_level(logging.WARNING):
        image = read_init_image(str(tmp_path / "wide.png"), (SIZE, SIZE))
    assert image.size == (SIZE, SIZE) and np.asarray(image).min() == 200
    assert "cropped about its centre" in caplog.text


@pytest.fixture(scope="module")
def edges(tiny, tmp_path_factory):
    from sdxl_control.testing import write_tiny_controlnet

    net = write_tiny_controlnet(tmp_path_factory.mktemp("start-controlnet") / "net", tiny.base, seed=3)
    pattern = np.zeros((SIZE, SIZE, 3), np.uint8)
    pattern[::8] = 255
    return net, Image.fromarray(pattern)


def test_a_windowed_controlnet_stacks_with_img2img_as_in_diffusers(generator, tiny, edges, pictures):
    """Windows count the steps actually run, as diffusers' ControlNet image-to-image pipeline counts them."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    from sdxl_control.adapters.controlnet import ControlNet

    net, pattern = edges
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), strength=0.6, steps=10,
                              size=(SIZE, SIZE), seed=6, progress_bar=False,
                              conditions=[ControlNet(net, image=pattern, scale=0.7, window=(0.0, 0.5))])  # fmt: skip
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(tiny.base,
                                                                      controlnet=ControlNetModel.from_pretrained(net))  # fmt: skip
    as_reference(pipe)
    ref = pipe(PROMPT, image=Image.open(pictures / "init.png"), control_image=pattern, strength=0.6, height=SIZE,
               width=SIZE, num_inference_steps=10, guidance_scale=5.0, controlnet_conditioning_scale=0.7,
               control_guidance_start=0.0, control_guidance_end=0.5, generator=_generators([6]),
               output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_the_refiner_alone_polishes_an_image_as_diffusers_refiner_does(generator, tiny, sdxl_pipes, pictures, tmp_path):
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.base.errors import ConditionError
    from sdxl_control.testing.lora import write_tiny_lora

    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), strength=0.3, refiner_only=True, steps=10,
                              size=(SIZE, SIZE), seed=8, num_images=2, progress_bar=False)  # fmt: skip
    ref = sdxl_pipes[1](PROMPT, image=Image.open(pictures / "init.png"), strength=0.3, num_inference_steps=10,
                   guidance_scale=5.0, generator=_generators([8, 9]), num_images_per_prompt=2,
                   output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)
    assert ours.recipes[0]["models"]["refiner"] is not None and ours.recipes[0]["refiner_only"] is True
    with pytest.raises(InvalidRequestError, match="refiner_only polishes an image"):
        GenerationRequest(PROMPT, refiner_only=True)
    write_tiny_lora(tmp_path / "x.safetensors", tiny.base, "kohya")
    with pytest.raises(ConditionError, match="runs the refiner alone"):
        generator.generate(PROMPT, init_image=str(pictures / "init.png"), refiner_only=True, steps=2,
                           size=(SIZE, SIZE), conditions=[LoRA(str(tmp_path / "x.safetensors"))])  # fmt: skip


def test_outpainting_extends_the_canvas_as_inpainting_a_padded_image(generator, sdxl_pipes, pictures, tmp_path):
    """The canvas grows by the padding (the request's size defaults to the image's plus it); the border starts
    mid-grey and is repainted as diffusers' inpainting pipeline repaints the same canvas and mask."""
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), outpaint=(16, 0, 24, 8), steps=6,
                              seed=12, progress_bar=False)  # fmt: skip
    assert ours.images[0].size == (SIZE + 40, SIZE + 8)
    canvas = Image.new("RGB", (SIZE + 40, SIZE + 8), (128, 128, 128))
    canvas.paste(Image.open(pictures / "init.png").convert("RGB"), (16, 0))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (16, 0, 16 + SIZE, SIZE))
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    ref = pipe(PROMPT, image=canvas, mask_image=mask, strength=1.0, height=SIZE + 8, width=SIZE + 40,
               num_inference_steps=6, guidance_scale=5.0, generator=_generators([12]), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)
    assert ours.recipes[0]["outpaint"] == [16, 0, 24, 8] and ours.recipes[0]["size"] == [SIZE + 40, SIZE + 8]


def test_the_cli_outpaints_and_an_image_names_its_own_size(tiny, pictures, tmp_path):
    out = tmp_path / "wider.png"
    args = ["generate", PROMPT, "--tiny", "--steps", "3", "--seed", "1", "-q", "--init-image",
            str(pictures / "init.png"), "--outpaint", "left=16,right=16", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out).size == (SIZE + 32, SIZE) and read_recipe(out)["outpaint"] == [16, 0, 16, 0]
    odd = tmp_path / "odd.png"
    Image.new("RGB", (75, 41), (90, 20, 200)).save(odd)
    assert GenerationRequest(PROMPT, init_image=str(odd)).size == (72, 40)  # whole multiples of 8
    assert GenerationRequest(PROMPT).size == (1024, 1024)
    with pytest.raises(SystemExit):
        main(["generate", "x", "--init-image", str(odd), "--outpaint", "middle=8", "--tiny"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"outpaint": (8, 0, 0, 0)}, "outpaint is for a request that starts from an image"),
        ({"init_image": "IMG", "outpaint": (12, 0, 0, 0)}, "each a multiple of 8"),
        ({"init_image": "IMG", "outpaint": (0, 0, 0, 0)}, "one above 0"),
        ({"init_image": "IMG", "outpaint": (8, 0, 0, 0), "mask": "IMG"}, "outpaint makes its own mask"),
        ({"init_image": "IMG", "outpaint": (64, 0, 0, 0), "size": (64, 64)}, "leaves no room"),
    ],
)
def test_bad_outpaint_requests_are_refused(pictures, options, message):
    options = {k: str(pictures / "init.png") if v == "IMG" else v for k, v in options.items()}
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, **options)


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    """A tiny ESRGAN ×2 in the original ESRGAN layout (``model.0.weight``, ``model.1.sub.0.RDB1...``), as upscaler
    .pth files are kept in ComfyUI's models/upscale_models."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("upscalers") / "2x-tiny.pth"
    torch.save(ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def swinir(tmp_path_factory):
    """A tiny SwinIR ×2 (pixel-shuffle) in the original SwinIR layout (``conv_first``, ``layers.0.residual_group``...,
    ``upsample.0``), as ``001_classicalSR_*.pth`` files are kept."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(1)
    model = SwinIR(img_size=32, embed_dim=12, depths=[1], num_heads=[2], window_size=8, upscale=2,
                   upsampler="pixelshuffle", mlp_ratio=2.0)  # fmt: skip
    path = tmp_path_factory.mktemp("upscalers") / "2x-swinir-tiny.pth"
    torch.save({"params": model.state_dict()}, path)  # the published files wrap the weights in "params"
    return path


@pytest.mark.parametrize("upscaler", ["lanczos", "esrgan", "swinir"])
def test_hires_fix_is_a_draft_enlarged_then_redrawn(generator, esrgan, swinir, upscaler):
    """One request equals its two passes done by hand: the draft, enlarged (Lanczos, or the upscaler model through
    spandrel, then Lanczos to the size), redrawn by image-to-image from the image's own seed."""
    import spandrel

    files = {"esrgan": esrgan, "swinir": swinir}
    chosen = str(files[upscaler]) if upscaler in files else "lanczos"
    ours = generator.generate(PROMPT, steps=4, size=(SIZE, SIZE), seed=21, num_images=2, hires_scale=1.5,
                              hires_strength=0.6, hires_steps=5, upscaler=chosen, progress_bar=False)  # fmt: skip
    assert ours.images[0].size == (96, 96)
    draft = generator.generate(PROMPT, steps=4, size=(SIZE, SIZE), seed=21, num_images=2, progress_bar=False)
    for i, image in enumerate(draft.images):
        if upscaler in files:
            model = spandrel.ModelLoader().load_from_file(str(files[upscaler])).eval()
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            with torch.no_grad():
                big = (model(pixels).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            enlarged = Image.fromarray(big).resize((96, 96), Image.Resampling.LANCZOS)
        else:
            enlarged = image.resize((96, 96), Image.Resampling.LANCZOS)
        by_hand = generator.generate(PROMPT, init_image=enlarged, strength=0.6, steps=5, size=(96, 96),
                                     seed=21 + i, progress_bar=False)  # fmt: skip
        assert torch.equal(ours.latents[i : i + 1], by_hand.latents)
    recipe = ours.recipes[1]
    assert (recipe["hires_scale"], recipe["hires_strength"], recipe["seed"], recipe["size"]) == (1.5, 0.6, 22, [64, 64])
    text = parameters_text(recipe)
    assert "Hires upscale: 1.5" in text and "Hires steps: 5" in text and "Denoising strength: 0.6" in text
    named = {"esrgan": "2x-tiny", "swinir": "2x-swinir-tiny", "lanczos": "Lanczos"}[upscaler]
    assert f"Hires upscaler: {named}" in text


def test_the_cli_hires_fix_re_makes_its_pixels_from_the_recipe(tiny, esrgan, tmp_path):
    out, again = tmp_path / "big.png", tmp_path / "again.png"
    args = ["generate", PROMPT, "--tiny", "--size", "64x64", "--steps", "3", "--seed", "4", "-q", "--hires", "2",
            "--hires-strength", "0.4", "--upscaler", str(esrgan)]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    recipe = read_recipe(out)
    assert Image.open(out).size == (128, 128) and recipe["upscaler"]["file"] == "2x-tiny.pth"
    assert main(["generate", "--recipe", str(out), "--inputs-from", str(esrgan.parent), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main(["generate", PROMPT, "--tiny", "--hires", "2", "--upscaler", str(tmp_path / "none.pth"), "-q",
                 "-o", str(tmp_path / "x.png")]) == 4  # fmt: skip
    notes = tmp_path / "notes.pth"
    torch.save({"weight": torch.zeros(3)}, notes)
    assert main(["generate", PROMPT, "--tiny", "--size", "64x64", "--steps", "2", "--hires", "2", "--upscaler",
                 str(notes), "-q", "-o", str(tmp_path / "y.png")]) == 4  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hires_strength": 0.3}, "hires_strength: for a hires fix: give hires_scale"),
        ({"upscaler": "x.pth"}, "upscaler: for a hires fix"),
        ({"hires_scale": 1.0}, r"hires_scale must lie in \(1, 4\]"),
        ({"hires_scale": 2.0, "hires_strength": 0.0}, r"hires_strength must lie in \(0, 1\]"),
        ({"hires_scale": 4.0, "size": (4096, 1024)}, "beyond 8192"),
    ],
)
def test_bad_hires_requests_are_refused(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, **options)


def test_a_job_file_starts_from_images_beside_it(tiny, pictures, tmp_path):
    """A job's init image and mask are read from the job file's folder; the job makes the CLI's pixels."""
    import json
    import shutil

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("init.png", "mask.png"):
        shutil.copy(pictures / name, jobs / name)
    line = {"id": "paint", "prompt": PROMPT, "init_image": "init.png", "mask": "mask.png", "strength": 0.9, "seed": 3,
            "steps": 3, "size": [SIZE, SIZE]}  # fmt: skip
    (jobs / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["batch", str(jobs / "jobs.jsonl"), "-o", str(tmp_path / "out"), "--tiny", "-q"]) == 0
    cli = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--init-image", str(pictures / "init.png"), "--mask", str(pictures / "mask.png"),
                 "--strength", "0.9", "--seed", "3", "--steps", "3", "--size", f"{SIZE}x{SIZE}", "--tiny", "-q",
                 "-o", str(cli)]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "paint.png")), np.asarray(Image.open(cli)))


def test_a_mask_crop_repaints_a_small_area_at_full_size_and_pastes_it_back(generator, sdxl_pipes, tmp_path):
    """``padding_mask_crop``: the mask's area (grown by the padding, to the request's aspect) is repainted at the
    request's size and pasted back into the larger original, which keeps its size — diffusers' pixels exactly."""
    photo = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (96, 112, 3), dtype=np.uint8)).save(photo)
    mask = np.zeros((96, 112), np.uint8)
    mask[8:24, 64:88] = 255
    Image.fromarray(mask).save(tmp_path / "small-mask.png")
    ours = generator.generate(PROMPT, init_image=str(photo), mask=str(tmp_path / "small-mask.png"),
                              padding_mask_crop=8, size=(SIZE, SIZE), steps=6, seed=13, progress_bar=False)  # fmt: skip
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    ref = pipe(PROMPT, image=Image.open(photo), mask_image=Image.open(tmp_path / "small-mask.png"), strength=1.0,
               height=SIZE, width=SIZE, padding_mask_crop=8, num_inference_steps=6, guidance_scale=5.0,
               generator=_generators([13])).images[0]  # fmt: skip
    assert ours.images[0].size == (112, 96)
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(ref))
    outside = np.asarray(ours.images[0])[mask == 0]
    assert np.array_equal(outside, np.asarray(Image.open(photo))[mask == 0])  # untouched pixels are the photo's
    with pytest.raises(InvalidRequestError, match="padding_mask_crop is the margin"):
        GenerationRequest(PROMPT, init_image=str(photo), padding_mask_crop=8)


@pytest.mark.parametrize("start", ["img2img", "inpainting"])
@pytest.mark.parametrize("kind", ["controlnet", "controlnet-union", "ip-adapter", "faceid", "instantid", "pulid",
                                  "photomaker", "lora", "lora-text"])  # fmt: skip
def test_every_condition_kind_stacks_with_a_start_image(kind, start, generator, fresh, tiny, pictures, tmp_path):
    from sdxl_control.testing.stand_ins import tiny_condition
    from tests.test_absent import CASES
    from tests.test_absent import PROMPT as WITH_TRIGGER  # PhotoMaker's trigger word
    from tests.test_conditions import assert_same_as_fresh

    condition = tiny_condition(CASES[kind][0](tmp_path, tiny))
    options = {"init_image": str(pictures / "init.png"), "strength": 0.7, "steps": 6, "size": (SIZE, SIZE), "seed": 4,
               "progress_bar": False, **({"mask": str(pictures / "mask.png")} if start == "inpainting" else {})}  # fmt: skip
    absent = generator.generate(WITH_TRIGGER, **options).latents
    with_it = generator.generate(WITH_TRIGGER, conditions=[condition], **options).latents
    assert not torch.equal(with_it, absent), f"{kind} does nothing from a start image"
    assert_same_as_fresh(generator, fresh)


@pytest.mark.parametrize("mode", ["latent", "latent-bicubic"])
def test_a_latent_hires_fix_redraws_the_interpolated_latents_as_diffusers_img2img(generator, sdxl_pipes, mode):
    """A1111's latent upscaler: the first pass's latents interpolated (no VAE round trip), then image-to-image from
    them, as diffusers' image-to-image pipeline takes latents for its image."""
    draft = generator.generate(PROMPT, steps=4, size=(SIZE, SIZE), seed=12, progress_bar=False)
    ours = generator.generate(PROMPT, steps=4, size=(SIZE, SIZE), seed=12, hires_scale=1.5, hires_strength=0.55,
                              upscaler=mode, progress_bar=False)  # fmt: skip
    interpolation = {"latent": "bilinear", "latent-bicubic": "bicubic"}[mode]
    enlarged = torch.nn.functional.interpolate(draft.latents, size=(12, 12), mode=interpolation)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipes[0])
    ref = pipe(PROMPT, image=enlarged, strength=0.55, num_inference_steps=4, guidance_scale=5.0, height=96, width=96,
               generator=_generators([12]), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)
    assert ours.images[0].size == (96, 96) and ours.images[0].recipe["upscaler"] == mode
    again = generator.run(GenerationRequest.from_recipe(ours.images[0].recipe), progress_bar=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(ours.images[0]))


def test_the_upscale_preset_enlarges_an_image_you_have(generator, pictures):
    """strength 0 keeps the init image as it is; the preset's hires fix enlarges and redraws it: the same as
    image-to-image on the image enlarged by hand."""
    from sdxl_control.presets import load_preset

    request = load_preset("upscale").request(PROMPT, {"init_image": str(pictures / "init.png")}, steps=4, seed=3)
    assert (request.strength, request.hires_scale, request.size) == (0.0, 2.0, (SIZE, SIZE))
    ours = generator.run(request, progress_bar=False).images[0]
    enlarged = Image.open(pictures / "init.png").convert("RGB").resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS)
    by_hand = generator.generate(PROMPT, init_image=enlarged, strength=0.35, steps=4, size=(2 * SIZE, 2 * SIZE),
                                 seed=3, vae_tiling=True, progress_bar=False).images[0]  # fmt: skip
    assert ours.size == (2 * SIZE, 2 * SIZE)
    assert np.array_equal(np.asarray(ours), np.asarray(by_hand))
    again = generator.run(GenerationRequest.from_recipe(ours.recipe), progress_bar=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(ours))


@pytest.mark.parametrize(
    ("options", "message"),
    [({}, "give a hires fix or face detailer"), ({"hires_scale": 2.0, "mask": "IMG"}, "no mask, outpaint or refiner")],
)
def test_strength_0_only_keeps_an_image_for_a_later_pass(pictures, options, message):
    options = {k: str(pictures / "mask.png") if v == "IMG" else v for k, v in options.items()}
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, init_image=str(pictures / "init.png"), strength=0.0, **options)


@pytest.fixture(scope="module")
def promax(tiny, tmp_path_factory):
    from sdxl_control.testing.annotators import write_tiny_controlnet

    return write_tiny_controlnet(tmp_path_factory.mktemp("promax") / "union", tiny.base, seed=3, union=True,
                                 promax=True)  # fmt: skip


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_union_inpaint_control_equals_diffusers_union_inpainting(generator, sdxl_pipes, pictures, promax, strength):
    """ControlNet-Union ProMax's repaint type with ``inpaint="start"``: the control image is the init image with the
    mask's area black, as diffusers' union inpainting example makes it by hand."""
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionInpaintPipeline

    from sdxl_control.adapters.controlnet import ControlNetUnion

    init, mask = Image.open(pictures / "init.png").convert("RGB"), Image.open(pictures / "mask.png")
    union = ControlNetUnion(str(promax), inpaint="start", scale=0.9)
    ours = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                              strength=strength, steps=6, size=(SIZE, SIZE), seed=8, conditions=[union],
                              progress_bar=False)  # fmt: skip
    control = np.array(init)
    control[np.asarray(mask) > 0] = 0
    pipe = StableDiffusionXLControlNetUnionInpaintPipeline.from_pipe(
        sdxl_pipes[0], controlnet=ControlNetUnionModel.from_pretrained(promax)
    )
    ref = pipe(PROMPT, image=init, mask_image=mask, control_image=[Image.fromarray(control)], control_mode=[7],
               controlnet_conditioning_scale=0.9, strength=strength, height=SIZE, width=SIZE, num_inference_steps=6,
               guidance_scale=5.0, generator=_generators([8]), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=1e-4)
    plain = generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                               strength=strength, steps=6, size=(SIZE, SIZE), seed=8, progress_bar=False)  # fmt: skip
    assert (plain.latents - ours.latents).abs().max() > 1e-2  # the control does act
    with pytest.raises(Exception, match="init image with a mask"):
        generator.generate(PROMPT, steps=2, size=(SIZE, SIZE), conditions=[union], progress_bar=False)


def test_a_controlnet_stacks_with_inpainting_as_in_diffusers(generator, sdxl_pipes, edges, pictures):
    """A ControlNet on an inpainting call equals diffusers' SDXL ControlNet inpainting pipeline; a small change of
    its scale shows in the result."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetInpaintPipeline

    from sdxl_control.adapters.controlnet import ControlNet

    net, pattern = edges
    init, mask = Image.open(pictures / "init.png").convert("RGB"), Image.open(pictures / "mask.png")

    def ours(scale):
        return generator.generate(PROMPT, init_image=str(pictures / "init.png"), mask=str(pictures / "mask.png"),
                                  strength=0.9, steps=6, size=(SIZE, SIZE), seed=13, progress_bar=False,
                                  conditions=[ControlNet(str(net), image=pattern, scale=scale)]).latents  # fmt: skip

    pipe = StableDiffusionXLControlNetInpaintPipeline.from_pipe(
        sdxl_pipes[0], controlnet=ControlNetModel.from_pretrained(net)
    )
    ref = pipe(PROMPT, image=init, mask_image=mask, control_image=pattern, controlnet_conditioning_scale=0.7,
               strength=0.9, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
               generator=_generators([13]), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours(0.7), ref, rtol=0, atol=1e-4)
    assert (ours(0.72) - ref).abs().max() > 1e-4
