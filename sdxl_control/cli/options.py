"""What every subcommand shares: option types that refuse bad text at parse time, output paths checked before any
work, the libraries' progress bars, and the images a command reads checked before any model loads."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from ..base.errors import OutputError

__all__ = [
    "DTYPES",
    "size",
    "number",
    "count",
    "window",
    "output_paths",
    "save",
    "dtype",
    "library_output",
    "image_flags",
    "check_inputs",
]

DTYPES = ("fp16", "bf16", "fp32")


class Once(argparse.Action):
    """A flag that takes one value and is refused when given again (the last would silently win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option: str | None = None) -> None:  # fmt: skip
        seen: set[str] = getattr(namespace, "_given_once", set())
        if self.dest in seen:
            parser.error(f"{option} was given twice: it takes one value (several ControlNets: different flags)")
        namespace._given_once = seen | {self.dest}
        setattr(namespace, self.dest, values)


def size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        value = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    if min(value) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def request_size(text: str) -> tuple[int, int]:
    """An image size as a request takes it, checked as it is read (not after the seconds torch takes to import)."""
    from ..base.defaults import MAX_SIDE

    width, height = size(text)
    if width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"size must be positive multiples of 8, got {width}x{height}")
    if max(width, height) > MAX_SIDE:
        raise argparse.ArgumentTypeError(
            f"size {width}x{height} is beyond {MAX_SIDE} pixels a side, which SDXL cannot fill"
        )
    return width, height


def number(text: str) -> float:
    """A float option: NaN and infinities are refused here (argparse's float takes them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def window(text: str) -> tuple[float, float]:
    try:
        start, _, end = text.partition(":")
        value = number(start or "0"), number(end or "1")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"window must look like 0:0.7, got {text!r}") from None
    if not 0.0 <= value[0] < value[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"a window needs 0 <= start < end <= 1, got {text!r}")
    return value


def outpaint(text: str) -> tuple[int, int, int, int]:
    """``left=256,right=256``: pixels added on each named side (the others get none)."""
    sides = {"left": 0, "top": 0, "right": 0, "bottom": 0}
    given: set[str] = set()
    for part in text.split(","):
        side, sep, value = part.partition("=")
        side = side.strip()
        if not sep or side not in sides:
            raise argparse.ArgumentTypeError(
                f"outpaint takes SIDE=PIXELS pairs (left, top, right, bottom), got {text!r}"
            )
        if side in given:  # keeping the last would drop the first without a word
            raise argparse.ArgumentTypeError(f"outpaint names {side} twice in {text!r}: give each side once")
        given.add(side)
        sides[side] = count(value.strip())
    return (sides["left"], sides["top"], sides["right"], sides["bottom"])


def output_paths(output: str, images: int) -> list[Path]:
    """Where the images go, checked before anything is generated: a finished image must not be lost to a typo."""
    path = Path(output).expanduser()
    if path.suffix.lower() != ".png":
        raise OutputError(f"-o {output}: the output must be a .png file (it carries the recipe)")
    paths = [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(images)]
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"-o {output}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"-o {output}: the folder {folder} is not writable")
    for target in paths:
        if target.is_dir():
            raise OutputError(f"-o {output}: {target} is a folder")
        if target.exists() and not os.access(target, os.W_OK):
            raise OutputError(f"-o {output}: {target} exists and is not writable")
    return paths


def save(image: Any, path: Path) -> None:
    try:
        image.save(path)
    except OSError as exc:
        raise OutputError(f"{path}: could not be written ({exc})") from None


def dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def library_output(verbose: bool) -> None:
    """transformers' and diffusers' own bars and notes while models load ("Loading weights", "Loading pipeline
    components"): shown with ``-v``, else off; the generation's own progress bar is not theirs (``-q`` hides it)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        if verbose:
            library.utils.logging.enable_progress_bar()
            library.utils.logging.set_verbosity_info()
        else:
            library.utils.logging.disable_progress_bar()
            library.utils.logging.set_verbosity_error()


def image_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of every image file the command reads."""
    from ..adapters import CONDITION_KINDS, input_slots
    from ..base.defaults import STRUCTURE_CONTROLS

    family_images = [
        f.name.replace("-", "_") for fam in CONDITION_KINDS.values() for f in fam.flags if f.type == "image"
    ]
    # Every input slot of images has its --NAME (the command's own, or the one made from the registry).
    family_images += [s.name.replace("-", "_") for _, s in input_slots().values() if s.images and s.files]
    family_images += [f.name.replace("-", "_") for _, s in input_slots().values() for f in s.flags if f.type == "image"]
    names = (
        *STRUCTURE_CONTROLS,
        *(f"{n}_map" for n in STRUCTURE_CONTROLS),
        "style",
        "reference",
        "face",
        *family_images,
        "photo",
        "images",
        "structure",
        "init_image",
        "mask",
    )
    found = []
    for name in dict.fromkeys(names):  # a name once, however many lists hold it
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if path:
                found.append((f"--{name.replace('_', '-')}", str(path)))
    texts = _text_inputs(getattr(args, "preset", None)) if getattr(args, "input", None) else set()
    for text in getattr(args, "input", []):
        name, _, path = text.partition("=")
        if path and name not in texts:  # a preset's text input (a person's description) is no file
            found.append((f"--input {name}", path))
    return found


def _text_inputs(preset: str | None) -> set[str]:
    """The inputs of ``preset`` that take a text; none where it names no preset that loads (said later, by the
    preset's own reading)."""
    from ..base.errors import SdxlControlError
    from ..presets import load_preset

    if preset is None:
        return set()
    try:
        return {name for name, spec in load_preset(preset, check=False).inputs.items() if spec.text}
    except SdxlControlError:
        return set()


def check_inputs(args: argparse.Namespace) -> None:
    """Every image the command reads opens as an image, before any model loads."""
    flags = image_flags(args)
    if not flags:  # the image readers import numpy: a tenth of a second for an error that needs none
        return
    from ..base.images import check_image_file

    for flag, path in flags:
        check_image_file(path, flag.lstrip("-") if flag in ("--photo", "--images") else flag)
