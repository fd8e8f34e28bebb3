"""Command line: ``sdxl-control generate``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequestError, SdxlControlError
from .generator import GenerationRequest, Generator
from .models import DEFAULT_BASE, DEFAULT_REFINER
from .presets import available_presets, load_preset
from .recipe import read_recipe

__all__ = ["main", "build_parser"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TINY_SIZE = (128, 128)


def _size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-control", description="Controllable SDXL generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt (or re-run a PNG's recipe)")
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --recipe)")
    gen.add_argument("-n", "--negative-prompt", help="negative prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG; image i of a batch gets -i before .png")
    gen.add_argument("--seed", type=int, help="seed of the first image (random if not given)")
    gen.add_argument("--steps", type=int, help="denoising steps over both stages (default 30)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 turns it off (default 5)")
    gen.add_argument("--refiner-switch", type=float, help="fraction of the schedule the base runs before the refiner")
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of 8 (default 1024x1024)")
    gen.add_argument("--num-images", type=int, help="images in the batch, seeds seed, seed+1, ...")
    gen.add_argument("--scheduler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, heun, ... or a class")
    gen.add_argument("--preset", choices=available_presets(), help="named settings; explicit options win")
    gen.add_argument("--base", help=f"base model: hub id, local folder or .safetensors (default {DEFAULT_BASE})")
    gen.add_argument("--refiner", help=f"refiner model, used with --refiner-switch (default {DEFAULT_REFINER})")
    gen.add_argument("--tiny", action="store_true", help="use built-in tiny random models (offline demo)")
    gen.add_argument("--recipe", type=Path, help="re-run the recipe stored in a PNG written by sdxl-control")
    gen.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--variant", help="weights variant to load, e.g. fp16")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "refiner_switch": args.refiner_switch,
        "size": args.size,
        "num_images": args.num_images,
        "scheduler": args.scheduler,
    }
    return {k: v for k, v in given.items() if v is not None}


def _models(args: argparse.Namespace, recipe: dict[str, Any] | None, switch: float | None) -> tuple[str, str | None]:
    if args.tiny or (recipe and args.base is None and recipe["models"]["base"].get("tiny_seed") is not None):
        from .testing import tiny_models

        seed = recipe["models"]["base"].get("tiny_seed", 0) if recipe else 0
        tiny = tiny_models(seed=seed)
        return str(tiny.base), str(tiny.refiner) if switch is not None else None
    base = args.base or (recipe["models"]["base"]["name"] if recipe else DEFAULT_BASE)
    refiner = None
    if switch is not None:
        recorded = (recipe["models"].get("refiner") or {}).get("name") if recipe else None
        refiner = args.refiner or recorded or DEFAULT_REFINER
    return base, refiner


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InvalidRequestError(f"output must be a .png file (it carries the recipe), got {output}")
    return [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    options = _request_options(args)
    recipe = read_recipe(args.recipe) if args.recipe else None
    if recipe is not None:
        request = GenerationRequest.from_recipe(recipe, **({"prompt": args.prompt} if args.prompt else {}), **options)
    else:
        if not args.prompt:
            raise InvalidRequestError("a prompt is required (or --recipe PNG)")
        settings = load_preset(args.preset) if args.preset else {}
        if args.tiny:
            settings.setdefault("size", TINY_SIZE)
        settings.update(options)
        request = GenerationRequest(args.prompt, **settings)
    base, refiner = _models(args, recipe, request.refiner_switch)
    generator = Generator.from_pretrained(
        base, refiner, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None, variant=args.variant
    )
    result = generator.run(request, progress_bar=not args.quiet)
    images = result.images
    if recipe is not None and "num_images" not in options:
        images = [images[recipe["batch_index"]]]  # the batch was re-run only to re-make this image exactly
    for image, path in zip(images, _output_paths(args.output, len(images)), strict=True):
        image.save(path)
        sys.stdout.write(f"{path}  seed={image.recipe['seed']}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdxl-control`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _generate(args)
    except SdxlControlError as exc:
        sys.stderr.write(f"sdxl-control: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
