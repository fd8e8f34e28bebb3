"""The recipe of a generated image, and PNGs that carry it (JSON, plus an A1111-style ``parameters`` text)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from ..base.errors import InputError, InvalidRequestError
from ..base.files import Locator
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys
from .infotext import parameters_text

if TYPE_CHECKING:
    import torch

__all__ = [
    "RECIPE_KEY", "RecipeImage", "Result", "read_recipe", "check_recipe", "parameters_text", "recorded_model",
    "recipe_models", "recipe_unet",
]  # fmt: skip

RECIPE_KEY = "sdxl-control"
# What a recipe holds besides the request's own fields: what was run, what was measured afterwards, and (``job``) the
# fingerprint of the batch job that made it.
RECORD_KEYS = frozenset(
    {
        "version",
        "seed",
        "batch_seed",
        "batch_index",
        "scheduler",
        "models",
        "dtype",
        "weight_storage",
        "infotext",
        "measurements",
        "job",
    }
)


class RecipeImage(Image.Image):
    """A PIL image that knows its recipe; saving it as PNG writes the recipe into the file.

    Example:
        >>> result.images[0].recipe["seed"]          # doctest: +SKIP
        7
        >>> result.images[0].save("out.png")        # doctest: +SKIP
    """

    recipe: dict[str, Any]

    def __getstate__(self) -> list[Any]:
        # PIL pickles pixels, mode, size, palette and info; the recipe travels too (a Ray replica's images reach the
        # ingress with theirs).
        return [*super().__getstate__(), self.recipe]

    def __setstate__(self, state: list[Any]) -> None:
        super().__setstate__(state)
        self.recipe = state[5]

    @classmethod
    def wrap(cls, image: Image.Image, recipe: dict[str, Any]) -> RecipeImage:
        out = cls()
        out.__dict__.update(image.__dict__)
        out.recipe = recipe
        out.info = {**image.info, RECIPE_KEY: json.dumps(recipe), "parameters": parameters_text(recipe)}
        return out

    def annotate(self, **measurements: Any) -> None:
        """Add measurements made after generation (``identity_similarity``, say) to the recipe this image carries,
        under ``recipe["measurements"]``."""
        self.recipe = copy.deepcopy(self.recipe)
        self.recipe.setdefault("measurements", {}).update(measurements)
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


# The most text one chunk we read may hold: PIL's own bound on a decompressed zTXt/iTXt chunk (1 MiB), held to plain
# tEXt chunks too. Recipes are a few kB and ComfyUI's prompt graphs some 100 kB; a bound keeps the JSON parser and
# the prompt readers from a file made to exhaust them.
MAX_TEXT_CHARS = PngImagePlugin.MAX_TEXT_CHUNK
# The deepest nesting a JSON text read from a file may have: our recipe nests 5 deep, ComfyUI's graph 4, a job line
# about 5. Far under Python's recursion limit (1000), which json.loads and whatever walks the value (==, repr, copy)
# would otherwise hit with a RecursionError (a crash, exit 1).
MAX_JSON_DEPTH = 64


def png_texts(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of an image file (a PNG's tEXt/iTXt: our recipe, A1111's ``parameters``, ComfyUI's
    ``prompt``); a compressed chunk that would decompress beyond PIL's bound (a decompression bomb) is refused."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"recipe {file}: no such file")
    try:
        with Image.open(file) as image:
            return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    except Image.DecompressionBombError as exc:
        raise InputError(f"recipe {file}: refused as a decompression bomb ({exc})") from None
    except ValueError as exc:
        if "MAX_TEXT_CHUNK" in str(exc) or "text chunks" in str(exc):  # PIL's words for its text bounds
            raise InputError(
                f"recipe {file}: refused as a decompression bomb: a compressed text chunk (zTXt/iTXt) unpacks to "
                f"more than {MAX_TEXT_CHARS // 2**20} MiB, or all its text to more than "
                f"{PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB (PIL's PngImagePlugin.MAX_TEXT_CHUNK and "
                "MAX_TEXT_MEMORY); no image of ours, A1111's or ComfyUI's carries that much"
            ) from None
        raise InputError(f"recipe {file}: not a readable image ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise InputError(f"recipe {file}: not a readable image ({exc})") from None


def bounded_text(text: str, where: str) -> str:
    """``text`` (a file's text chunk or line, ``where`` naming it in the message) if it is no longer than
    :data:`MAX_TEXT_CHARS`."""
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(
            f"{where} holds {len(text):,} characters, more than the {MAX_TEXT_CHARS:,} read (recipes and prompt "
            "graphs are far smaller): refused"
        )
    return text


def json_text(text: str, where: str) -> Any:
    """The JSON value ``text`` holds, read with bounds: at most :data:`MAX_TEXT_CHARS` characters and
    :data:`MAX_JSON_DEPTH` levels of nesting; ``where`` names the file and the text in the message.

    Example:
        >>> json_text('{"a": [1, 2]}', "x.png's recipe")
        {'a': [1, 2]}
        >>> json_text("[" * 100 + "]" * 100, "x.png's recipe")
        Traceback (most recent call last):
        ...
        sdxl_control.base.errors.InputError: x.png's recipe nests deeper than 64 levels: refused (...)
    """
    bounded_text(text, where)
    too_deep = (
        f"{where} nests deeper than {MAX_JSON_DEPTH} levels: refused (recipes and prompt graphs nest a few levels; "
        "this one was made to exhaust the reader)"
    )
    try:
        value = json.loads(text)
    except RecursionError:  # json's own recursion, past Python's limit
        raise InputError(too_deep) from None
    except ValueError as exc:
        raise InputError(f"{where} is not valid JSON ({exc})") from None
    # Measured without recursion: a stack of (value, depth).
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_JSON_DEPTH:
                    raise InputError(too_deep)
                stack.append((child, depth + 1))
    return value


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe stored in a PNG written by sdxl-control."""
    file = Path(path)
    text = png_texts(file).get(RECIPE_KEY)
    if text is None:
        raise InputError(f"{file} carries no sdxl-control recipe (was it written by sdxl-control, and not re-saved?)")
    recipe = json_text(text, f"{file}: its sdxl-control recipe")
    if not isinstance(recipe, dict):
        raise InputError(f"{file}: its sdxl-control recipe is not a JSON object")
    return recipe


def check_recipe(recipe: Any, request_fields: Iterable[str]) -> None:
    """Refuse a recipe that is not one, or that was edited into something that would not mean what it says: unknown
    (misspelt) keys, and missing or mistyped record entries. The request's own values are checked by the request."""
    if not isinstance(recipe, Mapping):
        raise InvalidRequestError(f"a recipe is a JSON object, got {type(recipe).__name__}")
    message = unknown_keys(recipe, {*request_fields, *RECORD_KEYS}, "the recipe")
    if message:
        raise InvalidRequestError(message)
    shapes = {"prompt": str, "size": list, "scheduler": Mapping, "batch_seed": int, "models": Mapping}
    for key, kind in shapes.items():
        if key not in recipe:
            raise InvalidRequestError(f"the recipe has no {key!r}")
        if not isinstance(recipe[key], kind) or isinstance(recipe[key], bool):
            raise InvalidRequestError(
                f"the recipe's {key!r} should be a {_KIND_NAMES[kind]}, got {type(recipe[key]).__name__}"
            )
    if "requested" not in recipe["scheduler"]:
        raise InvalidRequestError("the recipe's 'scheduler' has no 'requested' entry")
    if not isinstance(recipe.get("conditions", []), list):
        raise InvalidRequestError("the recipe's 'conditions' should be a list")


_KIND_NAMES = {str: "string", list: "list", Mapping: "JSON object", int: "whole number"}


def recorded_model(source: Mapping[str, Any], locate: Locator, what: str) -> str:
    """A model a recipe names (``recipe["models"]["base"]``) as :func:`load_stage` takes it: the hub id, or the local
    file or folder found again by ``locate``."""
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"the recipe's {what} has no name")
    if not source.get("local"):
        return name
    key = "file" if source["local"] == "file" else "folder"
    ref = {key: name, **{k: source[k] for k in ("sha256", "fingerprint", "path") if source.get(k)}}
    return str(locate.find(ref, f"the recipe's {what}"))


def recipe_models(recipe: Mapping[str, Any], locate: Locator, refiner: bool) -> tuple[str, str | None, ModelRef | None]:
    """(base, refiner, UNet checkpoint) a recipe recorded, as :meth:`Generator.from_pretrained` takes them; the
    refiner only when ``refiner`` (the request switches to one). A recipe made on the tiny models names them by seed."""
    models = recipe.get("models") or {}
    base = models.get("base") or {}
    unet = recipe_unet(recipe, locate)
    if base.get("tiny_seed") is not None:
        # Named as recorded, not looked for: a resolver rebuilds the tiny models from their seed (jobs.spec passes it).
        named = base.get("name") or f"tiny SDXL (seed {base['tiny_seed']})"
        return named, f"{named} (refiner)" if refiner else None, unet
    recorded = models.get("refiner")
    if refiner and not recorded:
        raise InvalidRequestError("the recipe switches to a refiner but names none")
    return (
        recorded_model(base, locate, "base model"),
        recorded_model(recorded, locate, "refiner") if refiner and recorded else None,
        unet,
    )


def recipe_unet(recipe: Mapping[str, Any], locate: Locator) -> ModelRef | None:
    """The UNet-only checkpoint a recipe's base recorded, its local file found again; also as 0.1 recorded it (a
    ``[repo, file]`` pair, or the local file's reference itself)."""
    unet = ((recipe.get("models") or {}).get("base") or {}).get("unet_weights")
    # A ref resolves to its path; so do the refs inside {"source": ...}.
    return ModelRef.parse(locate.resolve(unet, "the recipe's UNet checkpoint"), "the recipe's UNet checkpoint")
