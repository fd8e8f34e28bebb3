"""Every ``sdxl-control generate`` command the README prints runs offline with ``--tiny`` added, as printed: identity
methods and portrait presets included, with no face pack given by hand (``--tiny`` brings stand-in packs). The photos
they name are made here (random pictures: the stand-in detector finds a face in any photo); ``--size 64x64`` keeps the
run short. No ``../shared`` is needed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control.cli import main
from sdxl_control.presets import load_preset
from sdxl_control.recipe import read_recipe
from sdxl_control.testing.lora import write_tiny_lora

ROOT = Path(__file__).resolve().parents[1]


def readme_generate_commands() -> list[list[str]]:
    """The README's ``sdxl-control generate`` commands, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            for redirect in (">", ">>"):  # the shell's, not the command's
                argv = argv[: argv.index(redirect)] if redirect in argv else argv
            if argv[:2] == ["sdxl-control", "generate"]:
                commands.append(argv[1:])
    return commands


COMMANDS = readme_generate_commands()


def _inputs(argv: list[str], folder: Path, base: Path) -> None:
    """Make the files a command reads: photos and maps as random pictures, LoRA files for the tiny base."""
    for i, (flag, value) in enumerate(zip(argv, argv[1:], strict=False)):
        if flag in ("-o", "--recipe") or (folder / value).exists():
            continue
        if value.endswith((".jpg", ".png")):
            pixels = np.random.default_rng(i).integers(0, 255, (96, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / value)
        elif flag == "--lora" and ".safetensors" in value:
            write_tiny_lora(folder / value.partition(":")[0], base, "kohya", seed=i)


def test_the_readme_has_identity_and_preset_commands():
    flat = [" ".join(argv) for argv in COMMANDS]
    for needed in ("--identity instantid", "--identity pulid", "--identity photomaker", "--preset portrait ",
                   "--preset portrait-draft", "--recipe"):  # fmt: skip
        assert any(needed in command for command in flat), needed


def _matches_its_preset(argv: list[str], recipe: dict) -> None:
    """The recipe holds the preset's LoRAs, the templates whose inputs were given, and its settings."""
    preset = load_preset(argv[argv.index("--preset") + 1])
    given = {name for name in preset.inputs if f"--{name.replace('_', '-')}" in argv}
    expected = ["lora"] * len(preset.loras) + [t["kind"] for t in preset.templates.values()
                                               if any(v == f"${i}" for v in t.values() for i in given)]  # fmt: skip
    assert sorted(c["kind"] for c in recipe["conditions"]) == sorted(expected)
    for key in ("steps", "guidance", "negative_prompt", "refiner_switch"):
        assert recipe[key] == preset.settings.get(key, recipe[key])
    assert recipe["scheduler"]["requested"] == preset.settings.get("scheduler")


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_runs_offline_with_tiny(argv, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--recipe" in argv:  # re-makes the image an earlier command printed
        source = argv[argv.index("--recipe") + 1]
        earlier = next(a for a in COMMANDS if "-o" in a and a[a.index("-o") + 1] == source)
        assert main([*earlier, "--tiny", "--size", "64x64", "-q"]) == 0
    _inputs(argv, tmp_path, tiny.base)
    extra = [] if "--tiny" in argv else ["--tiny"]
    # An outpainted canvas is the image's size and the padding: the photos made here are small already.
    size = [] if "--outpaint" in argv else ["--size", "64x64"]
    assert main([*argv, *extra, *size, "-q"]) == 0
    if "--dry-run" in argv:
        return
    recipe = read_recipe(tmp_path / argv[argv.index("-o") + 1])
    assert recipe["size"] == (
        [64, 64] if size else [80 + sum(recipe["outpaint"][::2]), 96 + sum(recipe["outpaint"][1::2])]
    )
    kinds = {c["kind"] for c in recipe["conditions"]}
    if "--preset" in argv:
        _matches_its_preset(argv, recipe)
    if "--identity" in argv:
        assert argv[argv.index("--identity") + 1] in kinds
    elif "--face" in argv and "--preset" not in argv:
        assert "faceid" in kinds
    for flag, kind in (("--style", "ip-adapter"), ("--lora", "lora"), ("--edges", "controlnet")):
        if flag in argv:
            assert kind in kinds, (flag, kinds)
