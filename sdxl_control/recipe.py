"""The recipe of a generated image, and PNGs that carry it (JSON, plus an A1111-style ``parameters`` text)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, PngImagePlugin

from .errors import InvalidRequestError

__all__ = ["RECIPE_KEY", "RecipeImage", "Result", "read_recipe", "parameters_text"]

RECIPE_KEY = "sdxl-control"


def parameters_text(recipe: dict[str, Any]) -> str:
    """The recipe as the ``parameters`` text AUTOMATIC1111 writes, which most image tools display."""
    width, height = recipe["size"]
    fields = {
        "Steps": recipe["steps"],
        "Sampler": recipe["scheduler"]["name"],
        "CFG scale": recipe["guidance"],
        "Seed": recipe["seed"],
        "Size": f"{width}x{height}",
        "Model": recipe["models"]["base"]["name"],
        "Model hash": (recipe["models"]["base"].get("unet_sha256") or "")[:10] or None,
        "Refiner": (recipe["models"].get("refiner") or {}).get("name"),
        "Refiner switch at": recipe.get("refiner_switch"),
        "Version": f"sdxl-control {recipe['version']}",
    }
    lines = [recipe["prompt"]]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


class RecipeImage(Image.Image):
    """A PIL image that knows its recipe; saving it as PNG writes the recipe into the file.

    Example:
        >>> result.images[0].recipe["seed"]          # doctest: +SKIP
        7
        >>> result.images[0].save("out.png")        # doctest: +SKIP
    """

    recipe: dict[str, Any]

    @classmethod
    def wrap(cls, image: Image.Image, recipe: dict[str, Any]) -> RecipeImage:
        out = cls()
        out.__dict__.update(image.__dict__)
        out.recipe = recipe
        out.info = {**image.info, RECIPE_KEY: json.dumps(recipe), "parameters": parameters_text(recipe)}
        return out

    def annotate(self, **fields: Any) -> None:
        """Add measurements made after generation (``identity_similarity``, say) to the recipe this image carries."""
        self.recipe.update(fields)
        self.info[RECIPE_KEY] = json.dumps(self.recipe)

    def pnginfo(self) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters_text(self.recipe))
        info.add_itxt(RECIPE_KEY, json.dumps(self.recipe))
        return info

    def save(
        self,
        fp: str | bytes | os.PathLike[str] | os.PathLike[bytes] | IO[bytes],
        format: str | None = None,
        **params: Any,
    ) -> None:
        name = os.fsdecode(fp) if isinstance(fp, (str, bytes, os.PathLike)) else getattr(fp, "name", "")
        is_png = (format or "").upper() == "PNG" or (format is None and str(name).lower().endswith(".png"))
        if is_png and "pnginfo" not in params:
            params["pnginfo"] = self.pnginfo()
        super().save(fp, format, **params)


@dataclass(frozen=True)
class Result:
    """What a generation returns: images (each carrying its recipe) and the final latents.

    Example:
        >>> result = gen.generate("a lighthouse at dusk", seed=7)   # doctest: +SKIP
        >>> result.images[0].save("out.png")                         # doctest: +SKIP
    """

    images: list[RecipeImage]
    latents: torch.Tensor

    @property
    def recipes(self) -> list[dict[str, Any]]:
        return [image.recipe for image in self.images]


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe stored in a PNG written by sdxl-control."""
    with Image.open(Path(path)) as image:
        text = image.info.get(RECIPE_KEY)
    if text is None:
        raise InvalidRequestError(f"{path} carries no sdxl-control recipe")
    recipe: dict[str, Any] = json.loads(text)
    return recipe
