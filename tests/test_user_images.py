"""Images as the user sees them (issue 34, part 3): EXIF orientation applied before anything measures an image, a
stated policy for transparent init images, masks cut and resized exactly as their image, sizes that are not multiples
of 8 handled as diffusers does, outpainting options that do what their help says, and the page's editor without an
image. References: PIL's ImageOps.exif_transpose, diffusers' VaeImageProcessor and inpainting pipeline, masks cut by
hand."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from sdxl_control import GenerationRequest, Generator
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.base.images import load_image
from sdxl_control.cli import main
from sdxl_control.engine.start import image_size, start_images
from sdxl_control.preprocessors import preprocess
from sdxl_control.records.recipe import read_recipe
from sdxl_control.testing.tiny import write_tiny_base

PROMPT = "a lighthouse at dusk"
RNG = np.random.default_rng(34)


def _noise(width: int, height: int) -> np.ndarray:
    return RNG.integers(0, 255, (height, width, 3), dtype=np.uint8)


def _save_oriented(array: np.ndarray, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_anything_measures_an_image(tmp_path, orientation):
    """Every orientation, for the init image, its mask and the default size, equals PIL's exif_transpose of the
    same file; the request's size is the image as shown, not its stored pixels."""
    stored = _noise(48, 24)  # landscape as stored: orientations 5-8 show it as a portrait
    painted = np.zeros((24, 48), np.uint8)
    painted[2:10, 30:44] = 255  # an asymmetric mark, so any wrong flip or turn moves it
    _save_oriented(stored, tmp_path / "photo.png", orientation)
    _save_oriented(painted, tmp_path / "mask.png", orientation)
    with Image.open(tmp_path / "photo.png") as opened:
        shown = ImageOps.exif_transpose(opened).convert("RGB")
    with Image.open(tmp_path / "mask.png") as opened:
        shown_mask = ImageOps.exif_transpose(opened).convert("L")
    assert shown.size == ((24, 48) if orientation >= 5 else (48, 24))
    for given in (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.open(tmp_path / "photo.png")):
        assert np.array_equal(np.asarray(load_image(given)), np.asarray(shown))
        assert image_size(given) == shown.size
    # A control image is read the same way: its edge map is the shown image's.
    assert np.array_equal(
        np.asarray(preprocess("canny", tmp_path / "photo.png")), np.asarray(preprocess("canny", shown))
    )
    request = GenerationRequest(PROMPT, init_image=str(tmp_path / "photo.png"), mask=str(tmp_path / "mask.png"))
    assert request.size == shown.size  # both sides are multiples of 8 already
    start = start_images(request)
    assert np.array_equal(np.asarray(start.image), np.asarray(shown))
    assert start.mask is not None and np.array_equal(np.asarray(start.mask), np.asarray(shown_mask))


def test_a_size_not_a_multiple_of_8_is_resized_as_diffusers_preprocesses_it(tmp_path, caplog):
    """75x41 is rounded down to 72x40 and resized, as diffusers' VaeImageProcessor does with no size given — not
    cropped by a column as if its aspect were wrong."""
    photo = Image.fromarray(_noise(75, 41))
    photo.save(tmp_path / "odd.png")
    request = GenerationRequest(PROMPT, init_image=str(tmp_path / "odd.png"))
    assert request.size == (72, 40)
    with caplog.at_level(logging.WARNING):
        ours = start_images(request).image
    assert "cropped" not in caplog.text
    processor = VaeImageProcessor(vae_scale_factor=8)
    theirs = processor.preprocess(photo)  # diffusers' own default: get_default_height_width, then resize
    assert theirs.shape[-2:] == (40, 72)
    assert torch.equal(processor.preprocess(ours, height=40, width=72), theirs)


def test_a_mask_goes_through_exactly_its_images_crop_and_resize(tmp_path):
    """An init image of another aspect is cut about its centre; its mask is cut by the same box, so the repaint lands
    where it was painted (checked against cutting the mask by hand), at the request's size and at a smaller one."""
    photo = _noise(128, 64)
    painted = np.zeros((64, 128), np.uint8)
    painted[10:40, 70:100] = 255  # inside the centre square 32..96 on its right, and past it
    Image.fromarray(photo).save(tmp_path / "wide.png")
    Image.fromarray(painted).save(tmp_path / "mask.png")
    request = GenerationRequest(PROMPT, init_image=str(tmp_path / "wide.png"), mask=str(tmp_path / "mask.png"),
                                size=(64, 64))  # fmt: skip
    start = start_images(request)
    assert np.array_equal(np.asarray(start.image), photo[:, 32:96])
    assert start.mask is not None and np.array_equal(np.asarray(start.mask), painted[:, 32:96])
    half = start_images(GenerationRequest(PROMPT, init_image=str(tmp_path / "wide.png"),
                                          mask=str(tmp_path / "mask.png"), size=(32, 32)))  # fmt: skip
    by_hand = Image.fromarray(painted[:, 32:96]).resize((32, 32), Image.Resampling.LANCZOS)
    assert half.mask is not None
    assert np.array_equal(np.asarray(half.mask) > 0, np.asarray(by_hand) >= 128)
    assert set(np.unique(np.asarray(half.mask))) == {0, 255}  # binarized, as diffusers' mask processor does


def test_a_mask_of_another_size_is_resized_as_diffusers_and_of_another_aspect_refused(tmp_path, caplog):
    photo = _noise(64, 32)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    big = Image.fromarray(np.where(RNG.random((96, 192)) > 0.7, 255, 0).astype(np.uint8))  # 3x, a speckled mask
    big.save(tmp_path / "big.png")
    with caplog.at_level(logging.WARNING):
        start = start_images(GenerationRequest(PROMPT, init_image=str(tmp_path / "photo.png"),
                                               mask=str(tmp_path / "big.png")))  # fmt: skip
    assert "big.png is 192x96: resized to its init image's 64x32" in caplog.text
    diffusers_mask = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    theirs = diffusers_mask.preprocess(big, height=32, width=64)[0, 0].numpy()
    assert start.mask is not None and np.array_equal(np.asarray(start.mask) / 255.0, theirs)
    Image.new("L", (64, 64), 255).save(tmp_path / "square.png")
    with pytest.raises(InvalidRequestError, match=r"mask .*square.png is 64x64 but its init image is 64x32"):
        GenerationRequest(PROMPT, init_image=str(tmp_path / "photo.png"), mask=str(tmp_path / "square.png"))
    edge = np.zeros((32, 64), np.uint8)
    edge[:, :8] = 255  # painted only on the left edge, which a square crop cuts away
    Image.fromarray(edge).save(tmp_path / "edge.png")
    with pytest.raises(InvalidRequestError, match="edge.png: nothing to repaint in the part of the init image"):
        start_images(GenerationRequest(PROMPT, init_image=str(tmp_path / "photo.png"),
                                       mask=str(tmp_path / "edge.png"), size=(32, 32)))  # fmt: skip


def _rgba_with_hole(tmp_path, size=64):
    """A photo whose centre is cut out (fully transparent), and the same flattened by hand on white and on grey."""
    rgb = _noise(size, size)
    alpha = np.full((size, size), 255, np.uint8)
    alpha[16:40, 24:48] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "cutout.png")
    hole = alpha == 0
    flat = {}
    for name, colour in (("white", 255), ("grey", 128)):
        flat[name] = rgb.copy()
        flat[name][hole] = colour
        Image.fromarray(flat[name]).save(tmp_path / f"on-{name}.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "hole.png")
    return rgb, hole


def test_a_transparent_init_image_is_flattened_on_white_for_img2img_and_a_given_mask(generator, tmp_path, caplog):
    """Image-to-image keeps what it is given, so transparency is flattened on white (A1111's img2img background),
    with a warning — not black; with a mask given, the mask says what is repainted and the rest is flattened too."""
    _rgba_with_hole(tmp_path)
    mask = np.zeros((64, 64), np.uint8)
    mask[40:60, 8:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = {"steps": 2, "size": (64, 64), "seed": 3, "progress_bar": False}
    for extra in ({"strength": 0.6}, {"mask": str(tmp_path / "mask.png")}):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours = generator.generate(PROMPT, init_image=str(tmp_path / "cutout.png"), **extra, **common)
        assert "cutout.png is 14.1% transparent: flattened on white" in caplog.text
        flat = generator.generate(PROMPT, init_image=str(tmp_path / "on-white.png"), **extra, **common)
        assert torch.equal(ours.latents, flat.latents)


def test_an_outpainting_repaints_the_transparent_areas_with_the_border(generator, sdxl_pipes, tmp_path):
    """Outpainting says nothing of what to keep but the image: its transparent areas join the mask and start
    mid-grey as the new border does — equal to diffusers' inpainting of that canvas and mask."""
    rgb, hole = _rgba_with_hole(tmp_path)
    ours = generator.generate(PROMPT, init_image=str(tmp_path / "cutout.png"), outpaint=(16, 0, 0, 8), steps=4,
                              seed=5, progress_bar=False)  # fmt: skip
    canvas = np.full((72, 80, 3), 128, np.uint8)
    canvas[:64, 16:] = np.where(hole[..., None], 128, rgb)
    mask = np.full((72, 80), 255, np.uint8)
    mask[:64, 16:] = hole * 255
    start = start_images(GenerationRequest(PROMPT, init_image=str(tmp_path / "cutout.png"), outpaint=(16, 0, 0, 8)))
    assert np.array_equal(np.asarray(start.image), canvas)
    assert start.mask is not None and np.array_equal(np.asarray(start.mask), mask)
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipes[0])
    ref = pipe(PROMPT, image=Image.fromarray(canvas), mask_image=Image.fromarray(mask), strength=1.0, height=72,
               width=80, num_inference_steps=4, guidance_scale=5.0, generator=[torch.Generator().manual_seed(5)],
               output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-5)


def test_an_inpainting_unet_with_no_mask_repaints_the_transparent_areas(tmp_path, caplog):
    """With no mask, an inpainting UNet repaints what is transparent (ComfyUI's LoadImage makes 1 - alpha the mask):
    the same as giving that mask and the image flattened on grey."""
    _rgba_with_hole(tmp_path)
    inpainting = Generator.from_pretrained(write_tiny_base(tmp_path / "inpainting", seed=2, inpainting=True),
                                           device="cpu")  # fmt: skip
    common = {"steps": 3, "seed": 4, "strength": 1.0, "progress_bar": False}
    with caplog.at_level(logging.WARNING):
        ours = inpainting.generate(PROMPT, init_image=str(tmp_path / "cutout.png"), **common)
    assert "no mask is given: the inpainting UNet repaints them" in caplog.text
    given = inpainting.generate(PROMPT, init_image=str(tmp_path / "on-grey.png"), mask=str(tmp_path / "hole.png"),
                                **common)  # fmt: skip
    assert torch.equal(ours.latents, given.latents)


def test_outpaint_names_each_side_once_and_grows_the_output_beyond_size(tiny, tmp_path, capsys):
    from sdxl_control.cli.options import outpaint

    with pytest.raises(argparse.ArgumentTypeError, match=r"outpaint names left twice in 'left=8,top=8,left=16'"):
        outpaint("left=8,top=8,left=16")
    photo = _noise(64, 64)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--tiny", "--init-image", str(tmp_path / "photo.png"), "--outpaint",
              "left=8,left=16", "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert "names left twice" in capsys.readouterr().err
    out = tmp_path / "wider.png"
    args = ["generate", PROMPT, "--tiny", "--steps", "2", "--seed", "1", "-q", "--init-image",
            str(tmp_path / "photo.png"), "--size", "32x32", "--outpaint", "left=16,right=8", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    recipe = read_recipe(out)
    assert Image.open(out).size == (56, 32) and recipe["size"] == [56, 32] and recipe["outpaint"] == [16, 0, 8, 0]
    # The whole photo, fitted to --size (not half of it cut away), sits between the new borders.
    start = start_images(GenerationRequest(PROMPT, init_image=str(tmp_path / "photo.png"), size=(56, 32),
                                           outpaint=(16, 0, 8, 0)))  # fmt: skip
    whole = Image.fromarray(photo).resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(start.image)[:, 16:48], np.asarray(whole))
    capsys.readouterr()
    assert main(["generate", PROMPT, "--tiny", "--init-image", str(tmp_path / "photo.png"), "--size", "8192x8192",
                 "--outpaint", "left=8", "-o", str(tmp_path / "x.png")]) == 2  # fmt: skip
    assert "--size 8192x8192 grown by --outpaint is 8200x8192" in capsys.readouterr().err


def test_strokes_painted_with_no_image_under_them_are_refused_in_the_pages_status(tmp_path):
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import PageForm, UiConfig, _Page, form_spec

    strokes = np.zeros((32, 32, 4), np.uint8)
    strokes[4:12, 4:20] = (255, 255, 255, 255)
    Image.fromarray(strokes).save(tmp_path / "layer.png")
    Image.new("RGBA", (32, 32)).save(tmp_path / "empty-layer.png")
    config = UiConfig(resolver=TinyResolver(), outputs=tmp_path)
    painted = {"background": None, "layers": [str(tmp_path / "layer.png")], "composite": None}
    with pytest.raises(InvalidRequestError, match="strokes were painted with no image under them"):
        form_spec(PageForm("a red door", init_image=painted), config, seed=1)
    nothing = {"background": None, "layers": [str(tmp_path / "empty-layer.png")], "composite": None}
    assert "init_image" not in form_spec(PageForm("a red door", init_image=nothing), config, seed=1).settings
    form = PageForm("a red door", init_image=painted)
    values = [getattr(form, name) for name in PageForm.__dataclass_fields__]
    answers = list(_Page(config).generate(*values, None))
    assert len(answers) == 1 and answers[0][1].startswith("**error:**")
    assert "strokes were painted with no image under them" in answers[0][1]
