"""Live previews: TAESD-XL's real single files decode a real photo's latents close to the photo, previews arrive in
both stages from the step's denoised estimate, and they leave the image unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import Stage
from sdxl_control.cli import main
from sdxl_control.engine.preview import Previews, latents_to_image
from sdxl_control.engine.vae import taesd_from_files
from sdxl_control.testing.stand_ins import tiny_decoder

RUN = {"size": (64, 64), "seed": 5, "progress_bar": False}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_real_taesd_xl_files_round_trip_a_photo(shared_dir):
    """ComfyUI's single files (raw TAESD keys) load into our decoder path; encode -> preview decode of a real photo
    comes back close to it (TAESD-XL's published quality is about 25 dB)."""
    models = shared_dir / "models"
    taesd = taesd_from_files(models / "taesdxl_decoder.safetensors", models / "taesdxl_encoder.safetensors").eval()
    photo = Image.open(shared_dir / "images" / "obama.jpg").convert("RGB")
    # Half size (still a portrait of 450x570): the round trip's quality shows as well, in a quarter of the time.
    photo = photo.resize((photo.width // 16 * 8, photo.height // 16 * 8), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = taesd.encode(pixels).latents
    decoded = latents_to_image(taesd, latents)
    assert decoded.size == photo.size
    assert psnr(np.asarray(decoded), np.asarray(photo)) > 24.0
    # A decoder-only load gives the same decoder.
    alone = taesd_from_files(models / "taesdxl_decoder.safetensors")
    assert np.array_equal(np.asarray(latents_to_image(alone, latents)), np.asarray(decoded))


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_previews_in_both_stages_end_at_the_image(generator, tiny, scheduler):
    decoder = tiny_decoder("madebyollin/taesdxl")
    shown = []
    previews = Previews(lambda image, event: shown.append((event, image)), every=3, decoder=decoder)
    request = {"steps": 8, "refiner_switch": 0.5, "scheduler": scheduler, **RUN}
    result = generator.generate("a lighthouse", progress=previews, **request)
    # Every third step and each stage's last: base steps 3, 4 (its last); refiner steps 3, 4.
    assert [(e.stage, e.step) for e, _ in shown] == [(Stage.BASE, 3), (Stage.BASE, 4), (Stage.REFINER, 3),
                                                     (Stage.REFINER, 4)]  # fmt: skip
    last, image = shown[-1]
    # At the last step the denoised estimate is the finished latent, so the last preview is the draft decode of it.
    torch.testing.assert_close(last.denoised, result.latents, rtol=1e-4, atol=1e-4)
    from sdxl_control.engine.vae import load_decoder

    expected = latents_to_image(load_decoder(decoder, 4, result.latents.device, result.latents.dtype), result.latents)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1
    # Previews do not change the image.
    plain = generator.generate("a lighthouse", **request)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))


def test_previews_from_the_comfyui_single_file(generator, shared_dir):
    shown = []
    decoder = str(shared_dir / "models" / "taesdxl_decoder.safetensors")
    generator.generate(
        "a fox", steps=2, progress=Previews(lambda i, e: shown.append(i), every=1, decoder=decoder), **RUN
    )
    assert [image.size for image in shown] == [(64, 64), (64, 64)]


def test_cli_writes_the_preview_file(tiny, tmp_path):
    out = tmp_path / "fox.png"
    argv = ["generate", "a fox", "--tiny", "--size", "64x64", "--steps", "4", "--preview-every", "2", "-q"]
    assert main([*argv, "-o", str(out)]) == 0
    preview = Image.open(tmp_path / "fox-preview.png")
    assert preview.size == (64, 64)


def test_without_the_decoder_previews_are_the_latents_colours(generator, tiny, caplog):
    """A decoder that is not here (offline, nothing cached) gives colour previews and one warning; `decoder=None`
    asks for them. The colours are ComfyUI's latent2rgb map, checked channel by channel on uniform latents."""
    from sdxl_control.engine.preview import SDXL_RGB_BIAS, SDXL_RGB_FACTORS, latents_to_colours

    shown = []
    with caplog.at_level("WARNING"):
        previews = Previews(lambda image, event: shown.append((event, image)), every=2, decoder="nobody/no-taesd")
    assert previews.source is None and "nobody/no-taesd" in caplog.text and "hf download" in caplog.text
    result = generator.generate("a lighthouse", steps=4, progress=previews, **RUN)
    assert [e.step for e, _ in shown] == [2, 4] and all(i.size == (64, 64) for _, i in shown)
    # The last step's estimate is the finished latent: the last preview is its colour map.
    assert (
        np.abs(np.asarray(shown[-1][1], np.int16) - np.asarray(latents_to_colours(result.latents), np.int16)).max() <= 1
    )
    # One channel at a time: each latent channel's factor row, through the clamp.
    for channel in range(4):
        latent = torch.zeros(1, 4, 2, 2)
        latent[0, channel] = 1.0
        colour = np.asarray(latents_to_colours(latent))[8, 8].astype(np.float64)
        row = np.clip(np.array(SDXL_RGB_FACTORS[channel]) + SDXL_RGB_BIAS, -1, 1) * 127.5 + 127.5
        assert np.abs(colour - row).max() <= 1.0
    with pytest.raises(ValueError, match="4-channel"):
        latents_to_colours(torch.zeros(1, 16, 2, 2))
    assert Previews(lambda i, e: None, decoder=None).source is None
