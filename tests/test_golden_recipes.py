"""Recipes written by an earlier version re-make their images. The PNGs in ``golden/recipes/`` were made by
sdxl-control 0.1.0 on the tiny models (PhotoMaker whose ``scale`` then weighed its LoRA, FaceID with its attention
LoRA through base and refiner, a LoRA with text-encoder parts beside a windowed ControlNet); their inputs lie beside
them, and the tiny stand-ins they name are rebuilt from their seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control import GenerationRequest, Generator, Locator, read_recipe
from sdxl_control.testing import tiny_control_models

GOLDEN = Path(__file__).parent / "golden" / "recipes"
CASES = sorted(p.stem for p in GOLDEN.glob("*.png") if p.name != "photo.png")


def test_there_are_golden_recipes():
    assert {"photomaker-0.1", "faceid-refiner-0.1", "lora-controlnet-0.1"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_an_old_recipe_makes_the_same_pixels(name, tiny):
    image = GOLDEN / f"{name}.png"
    recipe = read_recipe(image)
    assert recipe["version"] == "0.1.0"
    built = {kind: tiny_control_models(kind) for kind in ("photomaker", "ip-adapter-faceid", "ip-adapter",
                                                           "controlnet-edges")}  # fmt: skip
    folders = [GOLDEN, built["controlnet-edges"].parent, built["photomaker"], built["ip-adapter"] / "models"]
    request = GenerationRequest.from_recipe(recipe, locate=Locator(folders))
    # A fresh load: the session's shared generator may carry another test's fast path.
    generator = Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")
    made = np.asarray(generator.run(request, progress_bar=False).images[recipe["batch_index"]], dtype=np.int16)
    kept = np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)
    difference = np.abs(made - kept)
    # Bit-exact on the machine that made them; another CPU's kernels may round a last bit differently.
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())
